"""sandbox.py: the near pair built offline (toy scale, seconds), and train.py's teacher-free --lam 0 mode."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT

import data
import models
import sandbox
import train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sandbox"))
    logs = []
    return sandbox.build(root, scale="toy", log=logs.append), logs


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_parts_are_disjoint_and_deterministic():
    assert sandbox.part_of("json/decoder.py") == sandbox.part_of("json/decoder.py")
    _, files = data.stdlib_files()
    parts = [sandbox.part_of(os.path.basename(p) + str(i)) for i, p in enumerate(files)]
    share = {name: parts.count(name) / len(parts) for name, _ in sandbox.PARTS}
    for name, pct in sandbox.PARTS:  # the hash spreads files as PARTS says, within sampling noise
        assert abs(share[name] - pct / 100) < 0.08, share


def test_toy_build(toy):
    p, logs = toy
    assert sandbox.is_built(p["root"])
    ids = {}
    for name, _ in sandbox.PARTS:
        with open(os.path.join(p["root"], "corpus", f"{name}.jsonl")) as f:
            ids[name] = {json.loads(line)["id"] for line in f}
        assert ids[name], name
    assert not (ids["pretrain"] & ids["kd"]) and not (ids["kd"] & ids["probe"])  # distilled text never pretrained on
    teacher, tok = models.load_model(p["teacher"])
    student, s_tok = models.load_model(p["student"])
    assert len(tok) == sandbox.SCALES["toy"]["vocab"] and models.check_vocab(tok, s_tok) == len(tok)
    n = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    assert n(teacher) > n(student)
    enc, backend = data.make_encoder(tok, "auto", sample=["def f(x):\n    return x + 1\n"])
    assert backend == "tiktoken"  # served through the exact tiktoken twin
    # pretraining (train.py --lam 0) lowered each model's held-out CE below its random init's
    for role in ("teacher", "student"):
        s = summary_of(os.path.join(p["root"], f"pretrain-{role}"))
        assert s["student_after"]["loss"] < s["student_before"]["loss"] - 0.1, role
        assert s["teacher_loaded"] is False and "kl_to_teacher" not in s["student_after"]
    rows = [json.loads(line) for line in open(p["probe"])]
    assert 0 < len(rows) <= sandbox.SCALES["toy"]["probe_examples"]
    for row in rows:
        ctx, word = row["text"].rsplit(" ", 1)
        assert sandbox.WORD.fullmatch(word) and word in ctx  # the target is carried over from the context


def test_build_is_reused(toy):
    p, _ = toy
    mtime = os.path.getmtime(os.path.join(p["teacher"], "config.json"))
    logs = []
    sandbox.build(p["root"], scale="toy", log=logs.append)
    assert os.path.getmtime(os.path.join(p["teacher"], "config.json")) == mtime
    assert not any(line.startswith("$") for line in logs)  # nothing retrained


def test_probe_examples_need_the_word_in_context():
    text = "x = 1\n" * 40 + "value = compute()\nresult = other\nreturn value\n"
    rows = sandbox.probe_examples([text], 10)
    assert [r["text"].rsplit(" ", 1)[1] for r in rows] == ["value"]  # 'other' never appeared before


def test_lam0_trains_plain_ce_without_a_teacher(toy, tmp_path):
    p, _ = toy
    out = tmp_path / "ce"
    # lr 0: the logged loss of step 1 is the plain CE of that batch, computed densely here
    train.main(["--lam", "0", "--student", p["student"], "--data", p["kd"], "--seq-len", "32", "--tokens", "256",
                "--eval-tokens", "64", "--batch-size", "4", "--lr", "0", "--max-steps", "1", "--out-dir", str(out),
                "--no-save-model", "--dtype", "fp32"])
    s = summary_of(out)
    assert s["teacher_loaded"] is False and s["teacher_val_loss"] is None
    assert "kl_to_teacher" not in s["student_after"] and not any(k.startswith("val_kl") for k in s)  # no KL named
    row = json.loads(open(out / "metrics.jsonl").readline())
    student, tok = models.load_model(p["student"])
    splits = data.load_splits(tok, p["kd"], 32, 256, 64)
    r = SimpleNamespace(args=SimpleNamespace(grad_accum=1, seed=0, batch_size=4), world=1, rank=0,
                        train=splits["train"], steps_per_epoch=len(splits["train"]) // 4)
    idx = train.batch_indices(r, 0, 0)  # step 1's rows
    x, y, valid = (t[idx] for t in (splits["train"].input_ids, splits["train"].targets, splits["train"].valid))
    with torch.no_grad():
        logits = student(x).logits[..., :len(tok)]
    ce = torch.nn.functional.cross_entropy(logits[valid], y[valid])
    assert row["kd"] == 0.0 and abs(row["loss"] - float(ce)) < 1e-4


def test_probe_flag(toy, tmp_path):
    p, _ = toy
    out = tmp_path / "kd"
    train.main(["--teacher", p["teacher"], "--student", p["student"], "--data", p["kd"], "--probe", p["probe"],
                "--seq-len", "32", "--tokens", "256", "--eval-tokens", "64", "--batch-size", "4", "--k", "0.5",
                "--out-dir", str(out), "--no-save-model"])
    s = summary_of(out)
    n = sum(1 for _ in open(p["probe"]))
    for when in ("student_before", "student_after"):
        assert s[when]["probe_n"] == n and 0.0 <= s[when]["probe_acc"] <= 1.0
    # the untrained student's probe numbers equal eval.py's LAMBADA scorer run on it directly
    import eval as eval_
    student, tok = models.load_model(p["student"])
    ref, _ = eval_.score_lambada(student, tok, [eval_.lambada_example(r) for r in eval_.read_jsonl(p["probe"])],
                                 progress=False)
    assert s["student_before"]["probe_acc"] == ref["acc"]
    assert abs(s["student_before"]["probe_ppl"] - ref["ppl"]) < 1e-6 * ref["ppl"]
    assert s["teacher_loaded"] is True and s["student_after"]["kl_to_teacher"] > 0


def run_cli(argv, env=None):
    return subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("argv,needle", [
    (["--lam", "0", "--student", "S", "--pos-metric", "kl", "--k", "0.2"], "--pos-metric kl needs a teacher"),
    (["--lam", "0", "--student", "S", "--cache-dir", "C"], "--cache-dir needs a teacher"),
    (["--probe", "/nonexistent/probe.jsonl", "--lam", "0", "--student", "S"], None),
])
def test_lam0_refusals(argv, needle, tmp_path):
    res = run_cli(argv + ["--out-dir", str(tmp_path / "o")])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert (needle or "--probe") in res.stderr.strip().splitlines()[-1]  # argparse: usage, then our line


def test_sandbox_preset_unbuilt_says_how_to_build(tmp_path):
    res = run_cli(["--preset", "sandbox", "--out-dir", str(tmp_path / "o")], env={"NANO_SEKD_HOME": str(tmp_path)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "python sandbox.py" in res.stderr.strip().splitlines()[-1], res.stderr


def test_eval_every_records_the_curve_without_changing_the_run(toy, tmp_path):
    p, _ = toy
    base = ["--teacher", p["teacher"], "--student", p["student"], "--data", p["kd"], "--seq-len", "32",
            "--tokens", "512", "--eval-tokens", "64", "--batch-size", "4", "--no-save-model"]
    train.main(base + ["--out-dir", str(tmp_path / "a")])
    train.main(base + ["--out-dir", str(tmp_path / "b"), "--eval-every", "2"])
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    curve = [r for r in rows if "val_kl" in r]
    assert [r["step"] for r in curve] == list(range(2, len(rows), 2)) and all(r["val_kl"] > 0 for r in curve)
    a, b = summary_of(tmp_path / "a"), summary_of(tmp_path / "b")
    assert a["student_after"] == b["student_after"] and a["config_key"] == b["config_key"]


def test_build_is_deterministic(toy, tmp_path):
    p, _ = toy
    q = sandbox.build(str(tmp_path / "again"), scale="toy", log=lambda *a: None)
    assert open(os.path.join(p["root"], "tokenizer", "tokenizer.json")).read() == \
        open(os.path.join(q["root"], "tokenizer", "tokenizer.json")).read()
    assert open(p["probe"]).read() == open(q["probe"]).read()
    for role in ("teacher", "student"):
        a, b = models.load_model(p[role])[0].state_dict(), models.load_model(q[role])[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role


def test_root_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "root"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        sandbox.main(["--root", str(f), "--scale", "toy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"--root {f}" in err[0]


def test_read_only_root_is_one_line(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode: refuse writes there as a read-only mount would
        import errno
        import tempfile
        real = tempfile.mkstemp

        def read_only(*a, dir=None, **k):
            if dir and os.path.abspath(dir).startswith(str(ro)):
                raise PermissionError(errno.EACCES, "Permission denied", dir)
            return real(*a, dir=dir, **k)
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    try:
        with pytest.raises(SystemExit) as e:
            sandbox.main(["--root", str(ro), "--scale", "toy"])
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"--root {ro}" in err[0] and "Permission denied" in err[0]


def test_study_flag_hands_over_to_study_py(monkeypatch, tmp_path):
    """sandbox.py --study builds, then runs study.py's CLI: sandbox.py imports neither study nor config
    (config imports sandbox), so the imports stay a DAG."""
    calls = []
    monkeypatch.setattr(sandbox, "build", lambda root, scale: calls.append(("build", root)))
    monkeypatch.setattr(sandbox.subprocess, "run", lambda cmd, cwd: calls.append(cmd) or SimpleNamespace(returncode=0))
    sandbox.main(["--study", "--study-dir", str(tmp_path), "--matrices", "table3", "--seeds", "0,1"])
    assert calls[0] == ("build", sandbox.default_root())
    assert calls[1][1:] == [os.path.join(ROOT, "study.py"), "--out-dir", str(tmp_path), "--matrices", "table3",
                            "--seeds", "0,1"]
    src = open(os.path.join(ROOT, "sandbox.py")).read()
    assert not re.search(r"^\s*(import|from)\s+(study|config|train)\b", src, re.M)


def test_study_cli_refuses_an_unknown_matrix(tmp_path):
    res = subprocess.run([sys.executable, "study.py", "--matrices", "table2,tabel3", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "tabel3" in err[0] and "--matrices" in err[0]
    assert not os.listdir(tmp_path)
