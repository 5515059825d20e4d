"""Tests for report.py: the compare table and the figures from fake run dirs (no model trained)."""
import importlib.util
import json
import math
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import report as R  # noqa: E402
import selection  # noqa: E402
from common import UserError  # noqa: E402


def fake_run(root, name, run_name, seed, loss, cfg=None, ev=None, after=None, **summary_keys):
    d = root / name
    d.mkdir(parents=True)
    config = dict({"run_name": run_name, "seed": seed, "k": 1.0, "l": 1.0, "policy": "top_k",
                   "pos_metric": "student_entropy", "sample_metric": "none"}, **(cfg or {}))
    student_after = dict({"loss": loss, "ppl": math.exp(loss), "kl_to_teacher": 0.5, "top1_agree": 0.6,
                          "ece": 0.05, "tokens": 100}, **(after or {}))
    summary = dict({"wall_time_s": 100.0 + seed, "sup_frac_positions": config["k"],
                    "sup_frac_samples": config["l"],
                    "peak_mem_bytes": {"student": 2 * 2 ** 30, "teacher": 4 * 2 ** 30},
                    "student_after": student_after}, **summary_keys)
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps(summary))
    if ev is not None:
        (d / "eval.json").write_text(json.dumps(ev))
    return str(d)


def table_rows(table):
    lines = table.strip().split("\n")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return head, {r["run"]: r for r in rows}


EVAL = {"hellaswag": {"acc": 0.3, "acc_norm": 0.4, "ece_choice_softmax": 0.1},
        "piqa": {"acc": 0.6, "acc_norm": 0.6, "ece_choice_softmax": 0.2},
        "arc_easy": {"acc": 0.5, "acc_norm": 0.45, "ece_choice_softmax": 0.3},
        "lambada": {"acc": 0.35, "ppl": 20.0, "ece_greedy_word": 0.15},
        "gsm8k": {"strict_match": 0.1, "flexible_extract": 0.2},
        "ifeval": {"prompt_strict": 0.2, "prompt_loose": 0.25}}


def test_compare_table(tmp_path, capsys):
    runs = [fake_run(tmp_path, "a0", "se-k0.25", 0, 2.0, {"k": 0.25}, EVAL),
            fake_run(tmp_path, "a1", "se-k0.25", 1, 2.2, {"k": 0.25}),
            fake_run(tmp_path, "full", "full-kd", 0, 1.9)]
    out = tmp_path / "t" / "table.md"
    table = R.main(["--compare", *runs, "--compare-out", str(out)])
    assert out.read_text() == table and table in capsys.readouterr().out
    lines = table.strip().split("\n")
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    head, rows = table_rows(table)
    se, full = rows["se-k0.25"], rows["full-kd"]
    assert se["n"] == "2"
    assert se["held-out loss"] == f"2.1000 ± {math.sqrt(0.02):.4f}"  # sample std of (2.0, 2.2)
    assert se["Acc"] == f"{(0.4 + 0.6 + 0.45 + 0.35 + 0.1) / 5:.4f} ± 0.0000"  # only seed 0 has eval.json
    # the paper's PPL / ECE columns are LAMBADA's, next to (not instead of) the held-out text's
    assert se["LAMBADA PPL"] == "20.00 ± 0.00" and se["LAMBADA ECE"] == "0.1500 ± 0.0000"
    assert se["held-out PPL"].startswith(f"{(math.exp(2.0) + math.exp(2.2)) / 2:.2f}")
    assert se["ECE choices"] == "0.2000 ± 0.0000" and se["GSM8K flexible"] == "0.2000 ± 0.0000"
    assert se["IFEval S"] == "0.2000 ± 0.0000" and se["mem T (GiB)"] == "4.00 ± 0.00"
    assert se["wall (s)"] == "100.5 ± 0.7"
    assert full["n"] == "1" and full["held-out loss"] == "1.9000 ± 0.0000" and full["Acc"] == "-"
    assert "KL est. (RS cache)" not in head  # no cache run here


def test_cache_estimate_never_shares_the_true_kl_column(tmp_path):
    runs = [fake_run(tmp_path, "live", "live", 0, 2.0),
            # a cache run as the lead writes it now: the estimate under its own name
            fake_run(tmp_path, "new", "cache_new", 0, 2.0, val_kl_rs_estimate=6.73, val_kl_to_teacher=None,
                     after={"kl_to_teacher": 6.73, "kl_estimator": "rs_kd_sampled_target"}),
            # an older cache run: the estimate sat in kl_to_teacher, tagged by kl_estimator
            fake_run(tmp_path, "old", "cache_old", 0, 2.0, val_kl_to_teacher=6.5,
                     after={"kl_to_teacher": 6.5, "kl_estimator": "rs_kd_sampled_target"})]
    head, rows = table_rows(R.compare_runs(runs))
    assert "KL(p‖q)" in head and "KL est. (RS cache)" in head
    assert rows["live"]["KL(p‖q)"] == "0.5000 ± 0.0000" and rows["live"]["KL est. (RS cache)"] == "-"
    for name, est in (("cache_new", "6.7300"), ("cache_old", "6.5000")):
        assert rows[name]["KL(p‖q)"] == "-" and rows[name]["KL est. (RS cache)"] == f"{est} ± 0.0000"
    with pytest.raises(UserError):  # and the budget figure's KL axis never plots an estimate
        R.budget_data([runs[1]], metric="kl")


def test_compare_skips_runs_it_cannot_rank(tmp_path):
    good = fake_run(tmp_path, "good", "good", 0, 2.0)
    empty = fake_run(tmp_path, "empty", "empty", 0, 0.0, after={"tokens": 0})  # single-file data: no held-out
    killed = fake_run(tmp_path, "killed", "killed", 0, 1.0)
    os.utime(os.path.join(killed, "summary.json"), (time.time() - 60, time.time() - 60))  # older than config
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"run_name": "unfinished", "seed": 0}))
    flagged = fake_run(tmp_path, "flagged", "flagged", 0, 1.0, complete=False)
    lines = []
    table = R.compare_runs([good, empty, killed, str(unfinished), flagged], log=lines.append)
    _, rows = table_rows(table)
    assert list(rows) == ["good"]  # the 0.0-loss run would have ranked first
    assert len(lines) == 4 and all(line.startswith("report.py: skipping ") for line in lines)
    assert "0 held-out tokens" in lines[0] and "config.json is newer" in lines[1]
    assert "no summary.json" in lines[2] and "complete: false" in lines[3]
    with pytest.raises(UserError, match="no complete run"):
        R.compare_runs([empty], log=lines.append)
    with pytest.raises(UserError, match="not found"):
        R.compare_runs([str(tmp_path / "typo")])


def test_compare_adds_reference_rows_and_drops_empty_columns(tmp_path):
    def with_refs(d, before_loss, teacher_loss):
        p = os.path.join(d, "summary.json")
        s = json.load(open(p))
        s["student_before"] = {"loss": before_loss, "ppl": math.exp(before_loss), "kl_to_teacher": 9.0,
                               "top1_agree": 0.01, "ece": 0.3}
        s["teacher"] = {"loss": teacher_loss, "ppl": math.exp(teacher_loss), "ece": 0.02}
        open(p, "w").write(json.dumps(s))
        return d
    runs = [with_refs(fake_run(tmp_path, "a0", "se", 0, 2.0), 11.0, 1.5),
            with_refs(fake_run(tmp_path, "b0", "full", 0, 1.9), 11.0, 1.5),  # same seed: counted once
            with_refs(fake_run(tmp_path, "a1", "se", 1, 2.2), 12.0, 1.7)]
    head, rows = table_rows(R.compare_runs(runs))
    assert "Acc" not in head and "IFEval S" not in head and "held-out loss" in head  # no eval.json
    assert list(rows) == ["se", "full", "student, no KD (reference)", "teacher (reference)"]
    st, te = rows["student, no KD (reference)"], rows["teacher (reference)"]
    assert st["n"] == "2" and st["held-out loss"] == f"11.5000 ± {math.sqrt(0.5):.4f}"
    assert st["KL(p‖q)"] == "9.0000 ± 0.0000"
    assert te["n"] == "2" and te["held-out loss"] == f"1.6000 ± {math.sqrt(0.02):.4f}" and te["KL(p‖q)"] == "-"
    assert te["wall (s)"] == "-" and rows["se"]["wall (s)"] == "100.5 ± 0.7"
    assert "reference" not in R.compare_runs(runs, refs=False)


def test_compare_baseline_gives_paired_differences(tmp_path):
    runs = [fake_run(tmp_path, "f0", "full", 0, 2.0), fake_run(tmp_path, "f1", "full", 1, 3.0),
            fake_run(tmp_path, "s0", "se", 0, 2.1), fake_run(tmp_path, "s1", "se", 1, 3.3)]
    head, rows = table_rows(R.compare_runs(runs, baseline="full"))
    assert head[:5] == ["run", "n", "held-out loss", "Δheld-out loss vs full", "held-out PPL"]
    assert "ΔKL(p‖q) vs full" in head
    assert "Δtop-1 agree vs full" in head and "probe acc" not in head  # no run was given --probe
    # per seed: +0.1 and +0.3 -> mean +0.2, sd 0.1414, half-width t(0.975, 1) * sd / sqrt(2) = 12.7062 * 0.1
    # (the plain loss std is 0.85): two seeds cannot call a difference this noisy
    assert rows["se"]["Δheld-out loss vs full"] == "+0.2000 [-1.0706, +1.4706]"
    assert rows["se"]["ΔKL(p‖q) vs full"] == "+0.0000 [+0.0000, +0.0000]"  # [0, 0] contains 0: not called
    assert rows["full"]["Δheld-out loss vs full"] == "+0.0000 [+0.0000, +0.0000]"
    with pytest.raises(UserError, match="not a run name"):
        R.compare_runs(runs, baseline="nope")


def test_t_quantile_matches_the_t_table():
    # two-sided 95% critical values of Student's t (any printed t table)
    for df, t in ((1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (9, 2.262157),
                  (30, 2.042272), (100, 1.983972)):
        assert R.t_quantile(df) == pytest.approx(t, abs=1e-6)
    assert R.t_quantile(1, 0.75) == pytest.approx(1.0)  # Cauchy: P(T < 1) = 3/4
    assert R.t_quantile(10 ** 4) == pytest.approx(1.959964, abs=1e-3)  # -> the normal's 1.96


def test_paired_stats_by_hand():
    # diffs 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.4841
    st = R.paired_stats([1, 2, None, 3])  # None = a seed without a baseline run: skipped
    assert st["n"] == 3 and st["mean"] == 2.0
    assert st["lo"] == pytest.approx(2 - 2.4841, abs=1e-4) and st["hi"] == pytest.approx(2 + 2.4841, abs=1e-4)
    assert st["called"] is False  # [-0.48, 4.48] contains 0
    st = R.paired_stats([2, 3, 4])  # same spread, shifted: [0.52, 5.48] excludes 0
    assert st["lo"] == pytest.approx(3 - 2.4841, abs=1e-4) and st["called"] is True
    assert R.paired_stats([-0.5, -0.5])["called"] is True  # sd 0: the interval is the nonzero mean
    assert R.paired_stats([0.0, 0.0])["called"] is False
    assert R.paired_stats([0.7]) == {"mean": 0.7, "lo": None, "hi": None, "n": 1, "called": False}
    assert R.paired_stats([None]) is None and R.paired_stats([]) is None


def test_compare_baseline_calls_only_intervals_that_exclude_zero(tmp_path):
    better = (-0.05, -0.052, -0.048, -0.051, -0.049)  # loss diffs to full per seed: clearly below 0
    noise = (0.02, -0.03, 0.01, -0.02, 0.025)  # mean +0.001, spread across 0
    runs = []
    for s in range(5):
        base = 2.0 + 0.1 * s  # the seed-to-seed spread (0.16) dwarfs the differences; pairing removes it
        runs += [fake_run(tmp_path, f"f{s}", "full", s, base, after={"probe_acc": 0.30 + 0.01 * s}),
                 fake_run(tmp_path, f"b{s}", "better", s, base + better[s],
                          after={"probe_acc": 0.34 + 0.01 * s + noise[s] / 10}),
                 fake_run(tmp_path, f"n{s}", "noisy", s, base + noise[s], after={"probe_acc": 0.30 + 0.01 * s})]
    runs.append(fake_run(tmp_path, "o0", "one-seed", 0, 1.9))  # no probe, one seed: no interval
    head, rows = table_rows(R.compare_runs(runs, baseline="full"))
    assert head[head.index("probe acc") + 1] == "Δprobe acc vs full"
    assert rows["full"]["probe acc"] == "0.3200 ± 0.0158" and rows["one-seed"]["probe acc"] == "-"
    loss, probe = "Δheld-out loss vs full", "Δprobe acc vs full"
    st = R.paired_stats(better)
    assert rows["better"][loss] == f"-0.0500 [{st['lo']:+.4f}, {st['hi']:+.4f}] *" and st["hi"] < 0
    assert rows["better"][probe].startswith("+0.0401 [+0.03") and rows["better"][probe].endswith(" *")
    assert rows["noisy"][loss].startswith("+0.0010 [-0.") and not rows["noisy"][loss].endswith("*")
    assert rows["noisy"][probe] == "+0.0000 [+0.0000, +0.0000]"
    assert rows["one-seed"][loss] == "-0.1000 [n=1]" and rows["one-seed"][probe] == "-"
    assert rows["full"]["n"] == "5" and rows["full"]["held-out loss"] == "2.2000 ± 0.1581"  # not a Δ: ± std


def test_compare_never_averages_two_configurations(tmp_path):
    # two runs' dirs end in seed0 and neither has a run name: one row per configuration, named by its flag
    a = fake_run(tmp_path, "a/seed0", None, 0, 2.0, cfg={"k": 0.2})
    b = fake_run(tmp_path, "b/seed0", None, 0, 3.0, cfg={"k": 1.0})
    _, rows = table_rows(R.compare_runs([a, b], refs=False))
    assert set(rows) == {"seed0 (k=0.2)", "seed0 (k=1.0)"}
    assert rows["seed0 (k=0.2)"]["n"] == "1" and rows["seed0 (k=0.2)"]["held-out loss"] == "2.0000 ± 0.0000"
    # one run name, two learning rates: two rows; two seeds of one configuration: one row, n = 2
    runs = [fake_run(tmp_path, f"full{s}", "full", s, 2.0 + s, cfg={"lr": 1e-3, "config_key": f"k{s}",
                                                                     "out_dir": f"o{s}", "git_hash": f"g{s}"})
            for s in (0, 1)] + [fake_run(tmp_path, "full_lr", "full", 0, 9.0, cfg={"lr": 1e-4})]
    _, rows = table_rows(R.compare_runs(runs, refs=False))
    assert set(rows) == {"full (lr=0.001)", "full (lr=0.0001)"} and rows["full (lr=0.001)"]["n"] == "2"


def test_not_config_holds_every_run_only_flag():
    import config
    assert set(config.RUN_ONLY) <= R.NOT_CONFIG and "seed" in R.NOT_CONFIG and "k" not in R.NOT_CONFIG


def test_reference_rows_per_heldout_setting_and_a_note(tmp_path):
    def with_refs(d, before_loss, teacher_loss):
        p = os.path.join(d, "summary.json")
        s = json.load(open(p))
        s["student_before"] = {"loss": before_loss, "ppl": math.exp(before_loss)}
        s["teacher"] = {"loss": teacher_loss, "ppl": math.exp(teacher_loss)}
        open(p, "w").write(json.dumps(s))
        return d
    runs = [with_refs(fake_run(tmp_path, f"t{T}", f"T{T}", 0, 2.0, cfg={"seq_len": T}), 10.0 + T, T / 100)
            for T in (32, 64)]
    lines = []
    _, rows = table_rows(R.compare_runs(runs, log=lines.append))
    assert lines == ["report.py: note: these runs differ in --seq-len 32, 64: their held-out numbers come from "
                     "different text or teachers, so the reference rows are given per setting"]
    assert rows["student, no KD (reference, seq_len=32)"]["held-out loss"] == "42.0000 ± 0.0000"
    assert rows["student, no KD (reference, seq_len=64)"]["held-out loss"] == "74.0000 ± 0.0000"
    assert rows["teacher (reference, seq_len=64)"]["held-out loss"] == "0.6400 ± 0.0000"
    lines.clear()
    R.compare_runs(runs[:1], log=lines.append)
    assert lines == []  # one setting: no note


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(R.__file__), "report.py"), "--compare",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == f"report.py: error: run directory not found: {tmp_path}/nope"


# -----------------------------------------------------------------------------
# figures

def test_plot_budget(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [fake_run(tmp_path, "full0", "full", 0, 1.9), fake_run(tmp_path, "full1", "full", 1, 1.9),
            fake_run(tmp_path, "k25s0", "se25", 0, 2.0, {"k": 0.25}),
            fake_run(tmp_path, "k25s1", "se25", 1, 2.2, {"k": 0.25}),
            fake_run(tmp_path, "k50", "se50", 0, 1.95, {"k": 0.5}),
            fake_run(tmp_path, "rnd", "rnd", 0, 2.5, {"k": 0.25, "policy": "random"}),
            fake_run(tmp_path, "l50", "sl50", 0, 2.05, {"k": 0.25, "l": 0.5, "sample_metric": "student_entropy"}),
            fake_run(tmp_path, "l25", "sl25", 0, 2.3, {"k": 0.25, "l": 0.25, "sample_metric": "student_entropy"})]
    path = tmp_path / "figs" / "budget.png"
    d = R.main(["--plot", str(path), "--plot-kind", "budget", *runs])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(path.parent) if p != "budget.png"]  # no temp file left
    assert d["metric"] == "loss"  # no eval.json anywhere
    k = d["axes"]["k"]
    (x1, m1, s1, n1), (x2, m2, s2, n2) = k["series"]["student_entropy / top_k"]
    assert (x1, n1, x2, n2) == (0.25, 2, 0.5, 1)
    assert m1 == pytest.approx(2.1) and s1 == pytest.approx(math.sqrt(0.02)) and m2 == pytest.approx(1.95)
    assert k["full"] == (pytest.approx(1.9), 0.0) and k["random"] == [(0.25, 2.5, 0.0, 1)]
    assert [p[:2] for p in d["axes"]["l"]["series"]["student_entropy"]] == [(0.25, 2.3), (0.5, 2.05)]


def test_plot_entropy_tokens(tmp_path):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    tokens = [["The", " cat", " sat", " on", "\n", " $5", " mat", "."][i % 8] for i in range(40)]
    H = torch.rand(40, generator=g) * 3
    sel = torch.arange(40) % 3 == 0
    path = tmp_path / "tokens.png"
    info = R.plot_entropy_tokens(tokens, H, sel, str(path), title="demo", width=30)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert info["outlined"] == int(sel.sum()) and info["lines"] > 1
    with pytest.raises(ValueError, match="length"):
        R.plot_entropy_tokens(tokens, H[:5], sel, str(path))


def test_figure_selection_is_selection_py(tmp_path):
    # k = 0.7 of 10 valid positions: selection.num_selected keeps 7, where a plain
    # math.ceil(0.7 * 10) keeps 8 (0.7 * 10 = 7.000000000000001 in floating point)
    H = torch.arange(12, dtype=torch.float32)
    valid = torch.ones(12, dtype=torch.bool)
    valid[:2] = False
    selected = R.entropy_selection(H, valid, 0.7)
    assert int(selected.sum()) == int(selection.num_selected(valid[None], 0.7)[0]) == 7
    assert selected[5:].all() and not selected[:5].any()  # the 7 highest-entropy valid positions


def test_token_entropy_matches_dense():
    from test_eval import byte_tokenizer, tiny_llama
    tok = byte_tokenizer()
    model = tiny_llama(tok)
    ids = torch.randint(0, len(tok), (17,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lp = model(ids[None]).logits[0].float().log_softmax(-1)
    dense = -(lp.exp() * lp).sum(-1)
    assert torch.allclose(R.token_entropy(model, ids, chunk_size=5), dense, atol=1e-5)


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UserError, match="--plot needs matplotlib: pip install matplotlib"):
        R.plot_entropy_tokens(["a"], [0.5], [True], str(tmp_path / "x.png"))


def suite_eval(acc):
    return {"next_indent": {"acc": acc}, "line_end": {"acc_norm": acc}}


def test_lr_sweep_chooses_on_validation_and_pairs_by_seed(tmp_path):
    # (method, lr) -> per seed (val acc, test acc): SE-KD is best at 1e-4 on val, Full KD at 1e-3
    accs = {("full_kd", 1e-3): [(0.60, 0.50), (0.62, 0.52)], ("full_kd", 1e-4): [(0.55, 0.60), (0.55, 0.61)],
            ("se", 1e-3): [(0.40, 0.70), (0.40, 0.72)], ("se", 1e-4): [(0.65, 0.55), (0.66, 0.58)]}
    runs = []
    for (m, lr), seeds in accs.items():
        for seed, (val, test) in enumerate(seeds):
            d = fake_run(tmp_path, f"{m}_lr{lr:g}/seed{seed}", f"{m}_lr{lr:g}", seed, 2.0,
                         {"lr": lr, "k": 0.2 if m == "se" else 1.0}, ev=suite_eval(test), after={"kl_to_teacher": lr})
            (tmp_path / f"{m}_lr{lr:g}/seed{seed}" / "eval_validation.json").write_text(json.dumps(suite_eval(val)))
            runs.append(d)
    data, chosen = R.lr_sweep_data(runs)
    assert chosen == {"full_kd": 1e-3, "se": 1e-4}  # on validation, although test would pick the others
    assert data["se"][1e-4][1] == {"val": 0.66, "test": 0.58, "kl": 1e-4}
    text = R.main(["--lr-sweep", *runs])
    best = text.split("Best against best")[1]
    # SE-KD at 1e-4 minus Full KD at 1e-3, per seed: +0.05, +0.06 -> mean +0.055
    se_row = [line for line in best.splitlines() if line.startswith("| se |")][0]
    assert "| 0.0001 | 2 | 0.5650 ± 0.0212 | +0.0550 [" in se_row
    same_lr = [line for line in text.splitlines() if line.startswith("| se | 0.001 |")][0]
    assert "+0.2000 [+0.2000, +0.2000] *" in same_lr  # identical differences: called
    with pytest.raises(UserError, match="--lr-baseline"):
        R.lr_sweep_data(runs, baseline="nope")
    if importlib.util.find_spec("matplotlib"):
        R.main(["--plot", str(tmp_path / "lr.png"), "--plot-kind", "lr", *runs])
        assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    os.remove(tmp_path / "se_lr0.0001/seed0/eval_validation.json")
    with pytest.raises(UserError, match="both parts"):
        R.lr_sweep_data(runs)


def test_a_copied_run_groups_with_the_runs_of_its_configuration(tmp_path):
    # study.copy_same_run writes same_as into the copy's config.json: it names the source, not a flag
    runs = [fake_run(tmp_path, "full_kd/seed0", "full_kd", 0, 1.9, {"same_as": "out/x_lr0.003/seed0"}),
            fake_run(tmp_path, "full_kd/seed1", "full_kd", 1, 1.8, {"same_as": "out/x_lr0.003/seed1"}),
            fake_run(tmp_path, "se/seed0", "se", 0, 2.0, {"k": 0.2}), fake_run(tmp_path, "se/seed1", "se", 1, 2.2, {"k": 0.2})]
    _, rows = table_rows(R.compare_runs(runs, refs=False, baseline="full_kd"))
    assert set(rows) == {"full_kd", "se"} and rows["full_kd"]["n"] == "2"
