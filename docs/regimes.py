"""The two regimes side by side (docs/results.md): per method, paired differences to Full KD with 95%
intervals in the far regime (the tiny preset's cut student) and the near one (the sandbox pair).

    python docs/regimes.py --far docs/results/runs --near docs/results/sandbox/runs > docs/results/regimes.md
    python docs/regimes.py --study out/study > docs/results/study.md   # the near study with the suite
    python docs/regimes.py --curve RUN... --curve-png docs/results/sandbox_curve.png   # runs with --eval-every

A run directory is RUN_ROOT/<run name>/seed<k>/summary.json (train.py --matrix layout). A cell is the mean of
per-seed differences (method - full_kd, same seed) with its two-sided 95% Student-t interval
(report.paired_stats); `*` marks an interval that excludes 0, the only differences the reading calls.
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import report  # noqa: E402
import study  # noqa: E402

ROWS = [name for m in ("table2", "table3", "table4", "budget") for name, _ in study.MATRICES[m]]


def load(root):
    """{run name: {seed: summary}} for every finished run under root."""
    out = {}
    for path in glob.glob(os.path.join(root, "*", "seed*", "summary.json")):
        name, seed = path.split(os.sep)[-3], int(path.split(os.sep)[-2][len("seed"):])
        with open(path) as f:
            out.setdefault(name, {})[seed] = json.load(f)
    return out


METRICS = {  # column -> value from a summary (None when absent)
    "ΔKL": lambda s: s["student_after"].get("kl_to_teacher"),
    "Δloss": lambda s: s["student_after"].get("loss"),
    "Δprobe acc": lambda s: s["student_after"].get("probe_acc"),
    # the downstream suite (train.py --suite sandbox): its average accuracy on each part
    "Δsuite acc (test)": lambda s: (s.get("suite_acc") or {}).get("test"),
    "Δsuite acc (val)": lambda s: (s.get("suite_acc") or {}).get("validation"),
    # the probe's mean NLL per target word (log of its word PPL): finer than the accuracy
    "Δprobe NLL": lambda s: math.log(s["student_after"]["probe_ppl"]) if "probe_ppl" in s["student_after"] else None,
}


def cell(runs, name, get, fmt="+.4f"):
    base, rows = runs.get("full_kd", {}), runs.get(name, {})
    diffs = [get(rows[s]) - get(base[s]) for s in sorted(rows) if s in base
             and get(rows[s]) is not None and get(base[s]) is not None]
    return report.format_paired(report.paired_stats(diffs), fmt) if diffs else "-"


def train_ratio(runs, name):
    """Training-loop time relative to Full KD (mean of per-seed ratios): the efficiency column."""
    base, rows = runs.get("full_kd", {}), runs.get(name, {})
    r = [rows[s]["wall_time_split"]["train_s"] / base[s]["wall_time_split"]["train_s"]
         for s in rows if s in base and not rows[s].get("same_as")]
    return f"{statistics.mean(r):.2f}" if r else "(same run)" if rows else "-"


def table(far, near, times=None, times_label=""):
    """times: the run root the efficiency column comes from (default `near`), e.g. a study whose runs had
    the cores to themselves when `near`'s shared them."""
    times = near if times is None else times
    head = ["method", "sup. pos", "sup. samples", "far ΔKL", "far Δloss", "near ΔKL", "near Δloss",
            "near Δprobe acc", "near Δprobe NLL", f"near train time / Full KD{times_label}", "seeds far / near"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    seen = set()
    for name in ROWS:
        if name in seen or name == "full_kd" or not (far.get(name) or near.get(name)):
            continue
        seen.add(name)
        any_run = next(iter((near.get(name) or far.get(name)).values()))
        lines.append("| " + " | ".join([
            name, f"{any_run['sup_frac_positions']:.2f}", f"{any_run['sup_frac_samples']:.2f}",
            cell(far, name, METRICS["ΔKL"]), cell(far, name, METRICS["Δloss"]),
            cell(near, name, METRICS["ΔKL"]), cell(near, name, METRICS["Δloss"]),
            cell(near, name, METRICS["Δprobe acc"]), cell(near, name, METRICS["Δprobe NLL"]),
            train_ratio(times, name),
            f"{len(far.get(name, {}))} / {len(near.get(name, {}))}"]) + " |")
    return "\n".join(lines) + "\n"


def study_table(near):
    """The near study with the suite: per method its downstream suite accuracy (test part) beside the held-out
    KL and loss, each a paired difference to Full KD; Full KD's own values in its row. No time column: a
    study that shares its cores says nothing about cost (the 64-step study's column does, in table())."""
    cols = ["Δsuite acc (test)", "Δsuite acc (val)", "ΔKL", "Δloss"]
    head = ["method", "sup. pos", "sup. samples", "suite acc (test)", *cols, "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    seen = set()
    for name in ["full_kd"] + ROWS:
        if name in seen or not near.get(name):
            continue
        seen.add(name)
        runs = near[name]
        any_run = next(iter(runs.values()))
        acc = report.mean_std([METRICS["Δsuite acc (test)"](r) for r in runs.values()])
        cells = ["-"] * len(cols) if name == "full_kd" else [cell(near, name, METRICS[c]) for c in cols]
        lines.append("| " + " | ".join([
            name, f"{any_run['sup_frac_positions']:.2f}", f"{any_run['sup_frac_samples']:.2f}",
            report.format_mean_std(acc, ".4f"), *cells, str(len(runs))]) + " |")
    return "\n".join(lines) + "\n"


def curve(run_dir):
    """[(training tokens, held-out KL)] of a run with --eval-every, from before training to the end."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        seq = json.load(f)["seq_len"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    tokens = s["global_batch_seqs"] * seq
    return ([(0, s["student_before"]["kl_to_teacher"])]
            + [(r["step"] * tokens, r["val_kl"]) for r in rows if "val_kl" in r]
            + [(s["steps"] * tokens, s["student_after"]["kl_to_teacher"])])


def plot_curves(run_dirs, path, mark=None):
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for d in run_dirs:
        xs, ys = zip(*curve(d))
        ax.plot([x / 1000 for x in xs], ys, marker=".", label=os.path.basename(os.path.normpath(d)))
    if mark:
        ax.axvline(mark / 1000, color="grey", ls="--", lw=1, label="the study's budget")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("held-out KL(p || q), nats")
    ax.legend(fontsize=7)
    report.save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--far", help="run root of the far regime (tiny preset study)")
    ap.add_argument("--near", help="run root of the near regime (sandbox study)")
    ap.add_argument("--times", help="run root for the train-time column (default: --near)")
    ap.add_argument("--times-label", default="", help="--times: what to append to that column's header")
    ap.add_argument("--study", help="run root of a sandbox study with the suite: its table alone")
    ap.add_argument("--curve", nargs="+", help="runs made with --eval-every: print their held-out KL curves")
    ap.add_argument("--curve-png", help="--curve: also draw them here")
    ap.add_argument("--mark", type=float, help="--curve-png: a vertical line at this many tokens")
    args = ap.parse_args(argv)
    if args.curve:
        for d in args.curve:
            print(os.path.basename(os.path.normpath(d)), " ".join(f"{t // 1024}k:{v:.3f}" for t, v in curve(d)))
        if args.curve_png:
            plot_curves(args.curve, args.curve_png, args.mark)
    if args.study:
        sys.stdout.write(study_table(load(args.study)))
    if args.far and args.near:
        sys.stdout.write(table(load(args.far), load(args.near), load(args.times) if args.times else None,
                               args.times_label))


if __name__ == "__main__":
    main()
