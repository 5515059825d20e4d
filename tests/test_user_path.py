"""The real user's path on CPU stand-ins: a padded-vocabulary Qwen3 pair saved with save_pretrained,
bf16, torchrun with 2 processes, one local data file; and runs a user can trust after a kill, a rerun or
a typo: a finished run is never lost."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import config
import losses
import models
import selection
import study
import train
from conftest import ROOT, killed_run, train_args


def qwen_args(q, out, *extra, data="jsonl"):
    return ["--teacher", str(q["teacher"]), "--student", str(q["student"]), "--data", str(q[data]),
            "--seq-len", "32", "--tokens", "1024", "--eval-tokens", "64", "--batch-size", "4",
            "--out-dir", str(out), "--log-every", "1", "--entropy-chunk", "16", *extra]


def losses_of(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def sub(argv, n_proc=None, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if n_proc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_proc),
               "--master_port", "29519", os.path.join(ROOT, "train.py")]
    return subprocess.run(cmd + argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, **(env or {})))


# -----------------------------------------------------------------------------
# bf16: fp32 master weights under autocast

def test_bf16_updates_every_weight_at_the_papers_lr_and_tracks_fp32(qwen_pair, tmp_path):
    q = qwen_pair
    flags = ("--lr", "1e-5", "--max-steps", "4", "--warmup", "0", "--k", "0.2", "--save-model")
    train.main(qwen_args(q, tmp_path / "bf16", "--dtype", "bf16", *flags))
    train.main(qwen_args(q, tmp_path / "fp32", "--dtype", "fp32", *flags))
    before = load_file(q["student"] / "model.safetensors")
    after = {d: load_file(tmp_path / d / "model" / "model.safetensors") for d in ("bf16", "fp32")}
    assert after["bf16"]["model.norm.weight"].dtype == torch.float32  # master weights stay fp32
    # trainable entries = those fp32 moves (embedding rows of tokens absent from the batches get no gradient)
    moved = {k: after["fp32"][k] != before[k] for k in before}
    both = sum(int((moved[k] & (after["bf16"][k] != before[k])).sum()) for k in before)
    n_moved = sum(int(m.sum()) for m in moved.values())
    assert both / n_moved >= 0.99, f"bf16 moved only {both / n_moved:.1%} of what fp32 moves"
    norms = [k for k in before if k.endswith("norm.weight")]
    assert all(not torch.equal(after["bf16"][k], before[k]) for k in norms)  # bf16 weights rounded these away
    lb, lf = losses_of(tmp_path / "bf16"), losses_of(tmp_path / "fp32")
    assert lb == pytest.approx(lf, rel=0.03)  # bf16 autocast tracks fp32 within 3% per step
    cfg = json.load(open(tmp_path / "bf16" / "config.json"))
    assert cfg["precision"].startswith("bf16 autocast")


def test_padded_vocab_on_policy_never_emits_padding_ids(qwen_pair, tmp_path):
    # generation must never sample an id in [len(tok), padded): the head's padding rows are no tokens
    train.main(qwen_args(qwen_pair, tmp_path, "--on-policy", "--gen-prompt-len", "8", "--gen-tokens", "16",
                         "--max-steps", "3", "--lr", "1e-3", "--dtype", "bf16"))
    s = json.load(open(tmp_path / "summary.json"))
    assert s["steps"] == 3 and s["student_after"]["loss"] == s["student_after"]["loss"]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_one_local_file_has_a_heldout_split(qwen_pair, tmp_path, kind):
    train.main(qwen_args(qwen_pair, tmp_path, "--max-steps", "1", "--no-save-model", data=kind))
    s = json.load(open(tmp_path / "summary.json"))
    assert s["eval_tokens"] > 0 and s["val_loss"] > 0.5  # not the 0-token 'loss 0.0000, PPL 1.0' of before


# -----------------------------------------------------------------------------
# torchrun

def test_ddp_logs_the_global_loss_and_matches_one_process(tiny_dir, tmp_path):
    flags = ["--k", "0.2", "--max-steps", "3", "--save-model", "--tokens", "2048"]
    r = sub(train_args(tiny_dir, tmp_path / "ddp", *flags, "--batch-size", "2"), n_proc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 2 x 1 x 2 processes = 4 seqs" in r.stdout
    train.main(train_args(tiny_dir, tmp_path / "one", *flags, "--batch-size", "4"))
    # step 1 sees the same weights and the same 4 sequences: the all-reduced loss equals one process's
    assert losses_of(tmp_path / "ddp")[0] == pytest.approx(losses_of(tmp_path / "one")[0], rel=1e-6)
    # ... and so does the gradient the optimizer sees: the mean over ranks, not their sum
    norms = [json.loads(open(tmp_path / d / "metrics.jsonl").readline())["grad_norm"] for d in ("ddp", "one")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert json.load(open(tmp_path / "ddp" / "config.json"))["global_batch_seqs"] == 4
    a = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    # Gradients agree to float rounding (different summation order); Adam divides by sqrt(v), so a
    # rounding difference can move an entry by up to ~lr per step: the tolerance is steps x lr.
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=3 * 3e-3) for k in a)
    close = sum(int(torch.isclose(a[k], b[k], rtol=0, atol=1e-5).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert close > 0.95


def test_ddp_refuses_device_flags(tiny_dir, tmp_path):
    r = sub(train_args(tiny_dir, tmp_path, "--max-steps", "1", "--teacher-device", "cpu", "--batch-size", "2"),
            n_proc=2)
    assert r.returncode != 0 and "--teacher-device/--student-device: under torchrun" in r.stderr
    assert "train.py\", line" not in r.stderr  # our one line; torchrun then reports the failed child itself


# -----------------------------------------------------------------------------
# one class sampler: online and cached RS-KD train on the same classes

def test_online_and_cached_rs_kd_draw_the_same_classes(tiny_dir, tmp_path, capsys):
    flags = ("--k", "0.2", "--max-steps", "2", "--rs-u", "16", "--seed", "3")
    train.main(train_args(tiny_dir, tmp_path / "online", *flags))
    train.main(train_args(tiny_dir, tmp_path / "cached", *flags, "--cache-dir", str(tmp_path / "cache")))
    assert losses_of(tmp_path / "online") == pytest.approx(losses_of(tmp_path / "cached"), rel=1e-5)
    cached = json.load(open(tmp_path / "cached" / "summary.json"))
    assert "val_kl_rs_estimate" in cached and "val_kl_to_teacher" not in cached  # never one column with true KL
    assert "U = 16 sampled classes" in capsys.readouterr().out


def test_cache_dir_default_u_is_stated(tiny_dir, tmp_path, capsys):
    args = config.parse_args(train_args(tiny_dir, tmp_path, "--cache-dir", str(tmp_path / "c")))
    assert args.rs_u == 64  # and train.py prints it in the run header and config.json


# -----------------------------------------------------------------------------
# Eq. 4 in train.py: one step's logged KD loss equals the dense reference

def test_logged_kd_of_one_step_equals_the_dense_reference(tiny_dir, tmp_path):
    train.main(train_args(tiny_dir, tmp_path, "--k", "0.2", "--max-steps", "1", "--lr", "0"))
    logged = json.loads(open(tmp_path / "metrics.jsonl").readline())["kd"]
    args = config.parse_args(train_args(tiny_dir, tmp_path / "x", "--k", "0.2"))
    r, s = train.setup(args, study.Shared())
    train.load_models(r, s)
    train.load_data(r)
    train.open_teacher_cache(r, s)
    train.prepare_training(r, s)
    idx = train.batch_indices(r, 0, 0)
    x, y, valid = (t[idx] for t in (r.train.input_ids, r.train.targets, r.train.valid))
    with torch.no_grad():
        zs = models.trunk(r.student, x) @ r.Ws.T  # (B, T, V): the dense path the selective head avoids
        zt = models.trunk(r.teacher, x) @ r.Wt.T
        w = selection.top_k(losses.entropy(zs), valid, 0.2)
        ref = losses.selective_kd_loss(losses.kl_per_position(zs, zt), w)
    assert logged == pytest.approx(float(ref), rel=1e-5)
    # dividing by the number of selected tokens instead of sequences would be off by ~ceil(0.2 * 32)
    assert w.gt(0).sum() > 4 * 2


# -----------------------------------------------------------------------------
# runs a user can trust: a finished run is never lost

def test_resume_with_other_flags_is_refused_naming_them(tiny_dir, tmp_path):
    flags = ["--k", "1.0", "--max-steps", "4", "--ckpt-every", "1"]
    r = killed_run(train_args(tiny_dir, tmp_path, *flags), "save_checkpoint", 2)  # after step 2
    assert r.returncode == 17
    r = sub(train_args(tiny_dir, tmp_path, *flags, "--resume", "--k", "0.2", "--lr", "1e-2"))
    assert r.returncode == 2 and "--k 1.0 -> 0.2" in r.stderr and "--lr" in r.stderr
    assert "Traceback" not in r.stderr
    r = sub(train_args(tiny_dir, tmp_path, *flags, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["tokens_seen"] == 4 * 4 * 32 and len(losses_of(tmp_path)) == 4  # totals over the whole run


def finished(tiny_dir, out, *flags):
    """A finished run in `out`: the bytes and mtimes of its files."""
    train.main(train_args(tiny_dir, out, *flags))
    assert study.run_state(str(out)) == "done"
    return files_of(out)


def files_of(out):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir()) if p.is_file()}


def test_the_same_command_again_is_refused_and_the_run_kept(tiny_dir, tmp_path, capsys):
    flags = ["--max-steps", "2", "--ckpt-every", "1"]
    before = finished(tiny_dir, tmp_path, *flags)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, tmp_path, *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "finished run" in err[0]
    assert "--fresh" in err[0] and "another --out-dir" in err[0]
    assert files_of(tmp_path) == before  # untouched, not even rewritten


def test_resume_of_a_finished_run_has_nothing_to_do(tiny_dir, tmp_path, capsys):
    before = finished(tiny_dir, tmp_path, "--max-steps", "2")
    capsys.readouterr()
    train.main(train_args(tiny_dir, tmp_path, "--max-steps", "2", "--resume"))  # returns: exit 0
    assert "already finished" in capsys.readouterr().out and files_of(tmp_path) == before
    with pytest.raises(SystemExit) as e:  # --resume with other flags: refused, naming them
        train.main(train_args(tiny_dir, tmp_path, "--max-steps", "3", "--resume"))
    assert e.value.code == 2 and "--max-steps 2 -> 3" in capsys.readouterr().err
    assert files_of(tmp_path) == before


def test_fresh_keeps_the_finished_run_until_the_new_one_finishes(tiny_dir, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("".join(open(p).read() for p in sorted((tiny_dir / "corpus").glob("*.txt"))))
    out = tmp_path / "out"
    flags = ["--data", str(data), "--max-steps", "2", "--ckpt-every", "1"]
    before = finished(tiny_dir, out, *flags, "--save-model")
    # killed after "before:": the old run's files stay, and the out-dir still reads as finished
    r = killed_run(train_args(tiny_dir, out, *flags, "--fresh"), "train", 1)
    assert r.returncode == 17 and "before:" in r.stdout
    assert files_of(out) == before and study.run_state(str(out)) == "done"
    # the same command after its --data file was emptied: a clean error, the run still there
    data.write_text("")
    for extra in ([], ["--fresh"]):
        r = subprocess.run([sys.executable, "train.py", *train_args(tiny_dir, out, *flags, *extra)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert files_of(out) == before and (out / "model" / "config.json").exists()
    # --fresh that finishes: its files replace the old ones, the old model/ goes (--no-save-model)
    data.write_text("".join(open(p).read() for p in sorted((tiny_dir / "corpus").glob("*.txt"))))
    train.main(train_args(tiny_dir, out, "--data", str(data), "--max-steps", "3", "--fresh"))
    s = json.load(open(out / "summary.json"))
    assert s["steps"] == 3 and len(losses_of(out)) == 3 and study.run_state(str(out)) == "done"
    assert not (out / "model").exists() and not (out / study.STAGE).exists()
    assert json.load(open(out / "config.json"))["max_steps"] == 3


def test_a_killed_replacement_resumes_and_then_replaces(tiny_dir, tmp_path):
    flags = ["--max-steps", "3", "--ckpt-every", "1"]
    before = finished(tiny_dir, tmp_path, "--max-steps", "2")
    r = killed_run(train_args(tiny_dir, tmp_path, *flags, "--fresh"), "save_checkpoint", 2)  # after step 2
    assert r.returncode == 17 and files_of(tmp_path) == before
    train.main(train_args(tiny_dir, tmp_path, *flags, "--resume"))  # continues the replacement, not the old run
    s = json.load(open(tmp_path / "summary.json"))
    assert s["steps"] == 3 and s["tokens_seen"] == 3 * 4 * 32 and len(losses_of(tmp_path)) == 3
    assert not (tmp_path / study.STAGE).exists() and study.run_state(str(tmp_path)) == "done"


def test_a_move_cut_short_is_finished_by_the_next_start(tmp_path, monkeypatch):
    """publish() moves a replacing run's files over the old ones; a kill midway never leaves a mix that
    reads as finished, and the next start in the out-dir completes the move."""
    stage = tmp_path / study.STAGE
    for d, tag in ((tmp_path, "old"), (stage, "new")):
        d.mkdir(exist_ok=True)
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            (d / name).write_text(json.dumps({"config_key": tag}))
    (tmp_path / "model").mkdir()  # the old run saved a model, the new one did not
    real, moves = os.replace, []

    def killed(src, dst):
        if len(moves) == 2:
            raise KeyboardInterrupt  # a kill after the move list and the first file
        moves.append(src)
        real(src, dst)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        study.publish(str(tmp_path))
    monkeypatch.setattr(os, "replace", real)
    assert study.run_state(str(tmp_path)) != "done"  # half old, half new: not finished
    with pytest.raises(common.UserError, match="holds a finished run"):  # completes the move, then refuses
        study.prepare_out_dir(config.parse_args(["--out-dir", str(tmp_path)]), "another key")
    assert {p.name: json.loads(p.read_text()) for p in tmp_path.iterdir() if p.is_file()} == \
        {n: {"config_key": "new"} for n in ("config.json", "metrics.jsonl", "summary.json")}
    assert not (tmp_path / "model").exists() and not stage.exists()


def test_start_cleans_temp_files_of_killed_writes(tiny_dir, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    orphan = tmp_path / (common.TMP_PREFIX + "ckpt.pt.abc123")
    orphan.write_bytes(b"x" * 1000)
    train.main(train_args(tiny_dir, tmp_path, "--max-steps", "1"))
    assert not orphan.exists()


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(common.UserError, match="disk full"):
        common.atomic_torch_save({"a": 1}, str(tmp_path / "ckpt.pt"))
    assert os.listdir(tmp_path) == []  # no orphan temp file


def test_matrix_refuses_stale_runs_of_other_flags(tiny_dir, tmp_path):
    calls = []

    def fake_run(args, shared):  # stands in for train.run: writes a finished run
        calls.append(args.out_dir)
        os.makedirs(args.out_dir, exist_ok=True)
        common.atomic_json(os.path.join(args.out_dir, "config.json"), dict(vars(args), config_key=study.config_key(args)))
        common.atomic_json(os.path.join(args.out_dir, "summary.json"), {"val_loss": 1.0})

    base = train_args(tiny_dir, tmp_path / "m", "--matrix", "table3", "--seeds", "0", "--tokens", "512")
    study.run_matrix(config.parse_args(base, raw=True), fake_run, compare=False)
    assert len(calls) == 5
    study.run_matrix(config.parse_args(base, raw=True), fake_run, compare=False)
    assert len(calls) == 5  # same flags: all done, skipped
    other = base[:-1] + ["1024"]
    with pytest.raises(common.UserError, match="--tokens 512 -> 1024"):
        study.run_matrix(config.parse_args(other, raw=True), fake_run, compare=False)
    study.run_matrix(config.parse_args(other + ["--fresh"], raw=True), fake_run, compare=False)
    assert len(calls) == 10


BAD = [  # (flags, words the one-line message must contain)
    (["--max-steps", "0"], "--max-steps"), (["--seeds", "a,b"], "--seeds"), (["--lr", "nan"], "--lr"),
    (["--on-policy", "--gen-prompt-len", "0"], "--gen-prompt-len"),
    (["--on-policy", "--gen-prompt-len", "100"], "--gen-prompt-len"),
    (["--gls-queue", "0"], "--gls-queue"), (["--pos-rs-temp", "0"], "--pos-rs-temp"),
    (["--cache-shard-size", "0"], "--cache-shard-size"), (["--sample-frac", "0.5"], "--sample-frac"),
    (["--l", "0.2"], "--l"), (["--mat", "table2"], "--mat"),
    (["--teacher", "/nonexistent/model"], "/nonexistent/model"), (["--data", "/nonexistent.txt"], "/nonexistent.txt"),
    (["--student-layers", "0,99"], "--student-layers"), (["--optim", "adam8bit"], "adam8bit"),
]


@pytest.mark.parametrize("bad,words", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_input_is_one_line_naming_the_flag(tiny_dir, tmp_path, capsys, bad, words):
    if bad[:2] == ["--optim", "adam8bit"] and __import__("importlib").util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, tmp_path / "out", *bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_teacher_dir_that_is_no_model_is_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, tmp_path / "out", "--teacher", str(tmp_path / "notamodel")))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "notamodel" in err[-1] and len(err) == 1


def test_nothing_to_train_is_caught_before_training(tiny_dir, tmp_path, capsys):
    f = tmp_path / "eos.txt"
    f.write_text("<|endoftext|>" * 3000)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, tmp_path / "out", "--data", str(f)))
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_corrupt_weights_are_one_line_naming_the_model(tiny_dir, tmp_path, capsys):
    import shutil
    bad = tmp_path / "student"
    shutil.copytree(tiny_dir / "teacher", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:1000])  # a truncated download
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, tmp_path / "out", "--student", str(bad)))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"--student {bad}" in err[-1] and "corrupt" in err[-1]


def test_paper_preset_seeds(tiny_dir, tmp_path):
    args = config.parse_args(["--preset", "paper", "--matrix", "table3"], raw=True)
    assert study.seeds_of(args) == "1337,1338,1339"
    args = config.parse_args(["--preset", "paper", "--matrix", "table5"], raw=True)
    assert study.seeds_of(args) == "1340,1341,1342"  # the paper's GSM8K seeds
    args = config.parse_args(["--preset", "paper", "--matrix", "table5", "--seeds", "7"], raw=True)
    assert study.seeds_of(args) == "7"
    paper = config.parse_args(["--preset", "paper"])
    assert (paper.optim, paper.schedule, paper.curriculum_steps, paper.lr) == ("adam8bit", "constant", 4000, 1e-5)
