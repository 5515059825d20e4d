"""train.py end to end on tiny models: every method is a flag combination that runs, plus resume,
DDP, cache reuse and clear errors for bad flags."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import losses
import selection
import study
import train
from conftest import ROOT, killed_run, train_args


def run_inproc(tiny_dir, out, *extra):
    train.main(train_args(tiny_dir, out, *extra))
    return json.load(open(os.path.join(out, "summary.json")))


def run_sub(tiny_dir, out, *extra, env=None, n_proc=None):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if n_proc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_proc),
               "--master_port", "29517", os.path.join(ROOT, "train.py")]
    return subprocess.run(cmd + train_args(tiny_dir, out, *extra), capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), cwd=ROOT, timeout=300)


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_falls_on_a_repeated_batch(tiny_dir, tmp_path):
    # 4 sequences = one batch, seen 25 times: the KD loss must fall a lot
    s = run_inproc(tiny_dir, tmp_path, "--tokens", "128", "--max-steps", "25", "--warmup", "0")
    m = metrics(tmp_path)
    assert m[-1]["kd"] < 0.5 * m[0]["kd"]
    assert s["steps"] == 25 and s["tokens_seen"] == 25 * 4 * 32
    for key in ("wall_time_s", "peak_mem_bytes", "student_before", "student_after", "val_loss", "val_ppl",
                "val_kl_to_teacher", "teacher_val_loss"):
        assert key in s
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["k"] == 1.0 and "git_hash" in cfg


def test_default_se_kd_selects_20_percent(tiny_dir, tmp_path):
    s = run_inproc(tiny_dir, tmp_path, "--k", "0.2", "--max-steps", "3")
    assert 0.2 <= s["sup_frac_positions"] < 0.26  # ceil(0.2 * n_b) per sequence
    assert all(0.2 <= r["sel"] < 0.26 for r in metrics(tmp_path))


@pytest.mark.parametrize("metric", sorted(selection.METRICS))
def test_every_metric_runs(tiny_dir, tmp_path, metric):
    s = run_inproc(tiny_dir, tmp_path, "--pos-metric", metric, "--k", "0.2", "--max-steps", "2")
    assert s["steps"] == 2 and s["student_after"]["loss"] == s["student_after"]["loss"]  # not NaN


@pytest.mark.parametrize("policy", sorted(selection.POLICIES))
def test_every_policy_runs(tiny_dir, tmp_path, policy):
    s = run_inproc(tiny_dir, tmp_path, "--policy", policy, "--k", "0.3", "--max-steps", "3")
    assert 0 < s["sup_frac_positions"] <= 1.0


@pytest.mark.parametrize("extra", [["--loss", "weighted"], ["--loss", "atkd"], ["--loss", "dkd"],
                                   ["--loss", "reverse_kl"], ["--lam", "0.5"], ["--temperature", "2.0"],
                                   ["--rs-u", "8"], ["--no-selective-head", "--k", "0.2"],
                                   ["--sample-metric", "student_entropy", "--sample-frac", "0.5"],
                                   ["--sample-metric", "kl", "--sample-frac", "0.5"], ["--on-policy", "--gen-prompt-len", "8",
                                                                             "--gen-tokens", "8"]])
def test_methods_run(tiny_dir, tmp_path, extra):
    s = run_inproc(tiny_dir, tmp_path, "--max-steps", "2", *extra)
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["student_after"]["loss"]))
    if "--sample-frac" in extra:
        assert s["sup_frac_samples"] == 0.5


def test_selective_head_equals_dense_flow(tiny_dir, tmp_path):
    a = run_inproc(tiny_dir, tmp_path / "a", "--k", "0.2", "--max-steps", "3")
    b = run_inproc(tiny_dir, tmp_path / "b", "--k", "0.2", "--max-steps", "3", "--no-selective-head")
    la, lb = [r["loss"] for r in metrics(tmp_path / "a")], [r["loss"] for r in metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)
    assert a["student_after"]["loss"] == pytest.approx(b["student_after"]["loss"], rel=1e-4)


def test_gsm8k_task(tiny_dir, tmp_path):
    p = tmp_path / "gsm.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"})
                           for i in range(60)))
    s = run_inproc(tiny_dir, tmp_path / "o", "--task", "gsm8k", "--task-data", str(p), "--seq-len", "64",
                   "--max-steps", "2", "--k", "0.5")
    assert s["steps"] == 2


def test_resume_after_kill_equals_uninterrupted(tiny_dir, tmp_path):
    flags = ["--k", "0.3", "--policy", "gls", "--max-steps", "6", "--ckpt-every", "1", "--save-model"]
    r = run_sub(tiny_dir, tmp_path / "full", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    r = killed_run(train_args(tiny_dir, tmp_path / "cut", *flags), "save_checkpoint", 4)  # after step 4
    assert r.returncode == 17 and not (tmp_path / "cut" / "summary.json").exists()
    r = run_sub(tiny_dir, tmp_path / "cut", *flags, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(tmp_path / "full")] == [m["loss"] for m in metrics(tmp_path / "cut")]


def test_ddp_two_processes_match_single(tiny_dir, tmp_path):
    flags = ["--k", "0.2", "--max-steps", "3", "--save-model", "--tokens", "2048"]
    r = run_sub(tiny_dir, tmp_path / "ddp", *flags, "--batch-size", "2", n_proc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_sub(tiny_dir, tmp_path / "one", *flags, "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the gradient the optimizer sees is the mean over ranks, not their sum (clipping and Adam hide a scale)
    assert metrics(tmp_path / "ddp")[0]["grad_norm"] == pytest.approx(metrics(tmp_path / "one")[0]["grad_norm"],
                                                                      rel=1e-4)


@pytest.mark.parametrize("bad,msg", [(["--k", "0"], "--k must be in"), (["--k", "1.5"], "--k must be in"),
                                     (["--sample-frac", "2"], "--sample-frac must be in"), (["--seq-len", "1"], "--seq-len"),
                                     (["--on-policy", "--rs-u", "64"], "--on-policy cannot"),
                                     (["--pos-metric", "kl", "--cache-dir", "x"], "needs teacher logits"),
                                     (["--sample-frac", "0.5"], "--sample-frac < 1 needs --sample-metric"),
                                     (["--policy", "nope"], "invalid choice")])
def test_bad_flags_are_clear(tiny_dir, tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit):
        config.parse_args(train_args(tiny_dir, tmp_path, *bad))
    assert msg in capsys.readouterr().err


def test_cache_is_built_once_then_reused_without_teacher(tiny_dir, tmp_path):
    flags = ["--k", "0.2", "--max-steps", "3", "--cache-dir", str(tmp_path / "cache"), "--rs-u", "16"]
    a = run_inproc(tiny_dir, tmp_path / "a", *flags)
    assert a["teacher_loaded"] and a["cache_bytes"] > 0
    b = run_inproc(tiny_dir, tmp_path / "b", *flags)
    assert not b["teacher_loaded"]  # the reused cache replaces the teacher entirely
    assert 0.2 <= b["sup_frac_positions"] < 0.26  # selection still runs (student entropy) with the cache
    assert [r["loss"] for r in metrics(tmp_path / "a")] == pytest.approx([r["loss"] for r in metrics(tmp_path / "b")])
    # SE-KD_3X: positions x classes x samples, with its own (sample-selected) cache
    c = run_inproc(tiny_dir, tmp_path / "c", *flags, "--sample-metric", "student_entropy", "--sample-frac", "0.5")
    assert c["sup_frac_samples"] == 0.5 and c["teacher_loaded"]
    d = run_inproc(tiny_dir, tmp_path / "d", *flags, "--sample-metric", "student_entropy", "--sample-frac", "0.5")
    assert not d["teacher_loaded"] and d["wall_time_split"]["cache_s"] < c["wall_time_split"]["cache_s"] + 5


def test_matrix_runs_each_config_then_skips_finished(tiny_dir, tmp_path):
    flags = ["--matrix", "table3", "--seeds", "0,1", "--max-steps", "1", "--tokens", "256"]
    r = run_sub(tiny_dir, tmp_path / "m", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "m" / "table3.md").read_text()
    for name, _ in study.MATRICES["table3"]:
        assert name in table
        for seed in (0, 1):
            assert (tmp_path / "m" / name / f"seed{seed}" / "summary.json").exists()
    r = run_sub(tiny_dir, tmp_path / "m", *flags)
    assert r.returncode == 0 and r.stdout.count("done, skipping") == 2 * len(study.MATRICES["table3"])


def test_ddp_cache_build_is_sharded_across_ranks(tiny_dir, tmp_path):
    flags = ["--k", "0.2", "--max-steps", "2", "--rs-u", "8", "--cache-shard-size", "16",
             "--cache-dir", str(tmp_path / "cache"), "--tokens", "2048"]
    r = run_sub(tiny_dir, tmp_path / "ddp", *flags, "--batch-size", "2", n_proc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    import cache
    train_dir = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("train-")][0]
    c = cache.open_cache(str(train_dir))
    assert len(c.sample_ids) == 2048 // 32
    assert len(c.header["shards"]) == 4  # 64 sequences / 16: ranks 0 and 1 built two shards each
    # a single-process build of the same data gives the same cache: shards depend on sample ids only
    r = run_sub(tiny_dir, tmp_path / "one", *(flags[:-4] + ["--cache-dir", str(tmp_path / "cache1"), "--tokens", "2048"]))
    assert r.returncode == 0, r.stderr[-3000:]
    c1 = cache.open_cache(str([p for p in (tmp_path / "cache1").iterdir() if p.name.startswith("train-")][0]))
    ids = torch.arange(len(c.sample_ids))
    assert all(torch.equal(a, b) for a, b in zip(c.get(ids), c1.get(ids)))


def test_matrix_memo_runs_teacher_once_and_matches_a_plain_run(tiny_dir, tmp_path, capsys):
    flags = ("--k", "0.2", "--pos-metric", "kl", "--max-steps", "3")
    shared = study.Shared(memo_train_rows=True)  # as study.run_matrix makes it
    train.run(config.parse_args(train_args(tiny_dir, tmp_path / "a", *flags)), shared)
    train.run(config.parse_args(train_args(tiny_dir, tmp_path / "b", *flags)), shared)  # teacher, states reused
    assert capsys.readouterr().out.count("loading teacher") == 1
    memo, = shared.memos.values()
    assert len(memo.rows) == 1024 // 32 + 256 // 32  # one entry per train and val row
    a, b = (json.load(open(tmp_path / d / "summary.json")) for d in ("a", "b"))
    assert a["student_after"] == b["student_after"] and a["student_before"] == b["student_before"]
    assert a["wall_time_split"]["teacher_memo_s"] > 0 and b["wall_time_split"]["teacher_memo_s"] < \
        a["wall_time_split"]["teacher_memo_s"]
    plain = run_inproc(tiny_dir, tmp_path / "c", *flags)  # no memo: batched teacher calls
    for key in ("loss", "kl_to_teacher", "ece"):
        assert plain["student_after"][key] == pytest.approx(a["student_after"][key], rel=1e-4, abs=1e-5)
    assert "teacher_memo_s" not in plain["wall_time_split"]
    # a memo with room for 3 rows keeps 3, stops filling, and the numbers stay the same
    row_gb = memo.bytes / len(memo.rows) / 2 ** 30
    small = study.Shared(memo_train_rows=True)
    train.run(config.parse_args(train_args(tiny_dir, tmp_path / "d", *flags, "--teacher-memo-gb", str(3.5 * row_gb))),
              small)
    rows = next(iter(small.memos.values())).rows
    assert set(rows) <= set(memo.rows) and len(rows) == 3
    assert json.load(open(tmp_path / "d" / "summary.json"))["student_after"] == a["student_after"]


def test_matrices_sharing_an_out_dir_copy_identical_configs(tiny_dir, tmp_path):
    src = tmp_path / "top20_student_entropy" / "seed0"
    argv = train_args(tiny_dir, src, "--k", "0.2", "--max-steps", "1", "--seed", "0", "--run-name", "top20_student_entropy")
    train.main(argv)
    key = study.config_key(config.parse_args(argv))
    assert json.load(open(src / "config.json"))["config_key"] == key
    other = study.config_key(config.parse_args(argv + ["--k", "0.3"]))
    renamed = study.config_key(config.parse_args(argv + ["--out-dir", "elsewhere", "--run-name", "x", "--log-every", "5"]))
    assert other != key and renamed == key  # only flags that change the numbers count
    dst = tmp_path / "top_k_20" / "seed0"
    assert not study.copy_same_run(str(tmp_path), str(dst), "top_k_20", other)
    assert study.copy_same_run(str(tmp_path), str(dst), "top_k_20", key)
    s, s0 = json.load(open(dst / "summary.json")), json.load(open(src / "summary.json"))
    assert s["run_name"] == "top_k_20" and s["same_as"] == str(src) and s["student_after"] == s0["student_after"]
    assert json.load(open(dst / "config.json"))["run_name"] == "top_k_20"


# -----------------------------------------------------------------------------
# the step's own arithmetic: what the optimizer sees

def test_grad_accum_averages_micro_batches(tiny_dir, tmp_path):
    """Two micro-batches of 2 are one batch of 4 (the same rows, Eq. 4 per micro-batch): the gradient the
    optimizer sees (its norm before clipping, logged) is the same, not --grad-accum times larger."""
    flags = ("--k", "1.0", "--max-steps", "1")
    run_inproc(tiny_dir, tmp_path / "one", *flags, "--batch-size", "4")
    run_inproc(tiny_dir, tmp_path / "acc", *flags, "--batch-size", "2", "--grad-accum", "2")
    one, acc = metrics(tmp_path / "one")[0], metrics(tmp_path / "acc")[0]
    assert acc["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert acc["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_the_optimizer_sees_clipped_gradients(tiny_dir, tmp_path, monkeypatch):
    seen = []
    make = train.make_optimizer

    def recording(r):  # the run's own optimizer, its step wrapped to record the global gradient norm
        opt = make(r)
        step = opt.step

        def recorded(*a, **k):
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            return step(*a, **k)
        opt.step = recorded
        return opt
    monkeypatch.setattr(train, "make_optimizer", recording)
    run_inproc(tiny_dir, tmp_path, "--k", "0.5", "--max-steps", "3")
    logged = [m["grad_norm"] for m in metrics(tmp_path)]
    assert len(seen) == 3 and all(n > 1.0 for n in logged)  # every step's gradient is large enough to clip
    assert seen == pytest.approx([min(n, 1.0) for n in logged], rel=1e-4)


def test_online_rs_kd_target_is_count_over_u(tiny_dir):
    """teacher_target's online RS-KD: p~ = count / U of the classes losses.sample_classes draws, per row."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(0)
    B, T, d, V, U = 2, 5, 8, 30, 16
    ht, Wt = torch.randn(B, T, d, generator=g), 3 * torch.randn(V, d, generator=g)  # (B, T, d_t), (V, d_t)
    sel = torch.rand(B, T, generator=g) < 0.6
    r = SimpleNamespace(args=SimpleNamespace(lam=1.0, rs_u=U, seed=3, temperature=2.0), tcache=None, Wt=Wt,
                        s_dev="cpu")
    sample_ids = torch.tensor([7, 11])
    target = train.teacher_target(r, ht, sel, sample_ids, chunk=3)  # chunks that do not divide the rows
    u = losses.rs_uniforms(3, sample_ids, T, U)[sel]  # (N, U)
    ids, counts = losses.sample_classes(ht[sel] @ Wt.T, u, 2.0)
    assert torch.equal(target.ids, ids)
    assert torch.allclose(target.probs, counts.float() / U)
    assert torch.allclose(target.probs.sum(-1), torch.ones(int(sel.sum())))  # a distribution per row
