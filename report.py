"""Results at a glance: the paper-style compare table and the figures, from finished train.py runs.

    python report.py --compare RUN... [--compare-baseline NAME] [--compare-out table.md]
    python report.py --plot budget.png --plot-kind budget [--plot-metric auto|acc|loss|kl] RUN...
    python report.py --plot tokens.png --plot-kind entropy RUN
    python report.py --lr-sweep RUN... [--lr-baseline full_kd] [--compare-out lr.md]   # study.py's lr matrix
    python report.py --plot lr.png --plot-kind lr RUN...

A run is train.py's --out-dir: RUN/config.json, RUN/summary.json (written last: its presence marks
the run done), RUN/model/, and after `eval.py RUN` also RUN/eval.json (RUN/eval_validation.json for
--split validation). Nothing here trains or scores a benchmark; it only reads those files (and, for the
entropy figure, runs the run's model over one held-out sequence).

The table (--compare): one row per configuration, its seeds together: runs whose config.json agree in
every flag but the seed (and the flags that only place, name or log a run: NOT_CONFIG) are one group,
labelled by run_name (the label without the seed; the directory's name without one). Two
configurations under one label are two rows, each label followed by the flags it differs in: runs of
different flags are never averaged. Cells are mean ± sample std over the group's seeds (± 0 for one
seed). Columns, left out when no row has them (the headline, Acc or suite acc, first):
  held-out loss / PPL / top-1 agree / ECE  the student after distillation on the held-out split of
                                           the *training text* (summary.json's student_after)
  probe acc              LAMBADA-style last-word accuracy (a fraction) on train.py's --probe file
                         (summary.json's student_after.probe_acc)
  KL(p‖q)                the true forward KL to the teacher on that text (a live or memoised teacher)
  KL est. (RS cache)     the RS-KD estimate of a --cache-dir run (cached sampled targets): it exceeds
                         the true KL by a constant of the cache, so it is never shown as KL(p‖q)
  Acc                    paper_average: the paper's Acc (defined in eval.py's doc)
  suite acc              the sandbox suite's average (suite.suite_acc of eval.py --suite sandbox)
  LAMBADA PPL / ECE      the paper's PPL and ECE columns (eval.json), not the held-out text numbers
  ECE choices            choice_ece_average: 15-bin ECE of the softmax over answer choices,
                         averaged over ARC-E, HellaSwag and PIQA (the authors' evaluation code)
  GSM8K strict/flexible  exact match after the harness's two answer filters
  IFEval S / L           prompt-level strict / loose accuracy
  sup. pos / samples, wall (s), train (s), mem S / T (GiB)   from summary.json
With --compare-baseline NAME (e.g. Full KD), a Δ column follows each of held-out loss, KL(p‖q),
KL est., top-1 agree, probe acc and suite acc: the per-seed difference run − baseline (same seed = same data and
held-out split, so the split-to-split spread cancels), shown as the mean over the n paired seeds and a
two-sided 95% Student-t confidence interval, mean ± t(0.975, n−1)·sd/√n with sd the sample std of the
differences:  +0.0123 [+0.0050, +0.0196] *.  A trailing * marks a called difference: the interval
excludes 0 (with identical differences, sd = 0, any nonzero mean is called). One paired seed gives
only the mean and [n=1]: no interval, never called. The t quantile is computed exactly (the closed-form
Student-t CDF for integer df, inverted by bisection; see t_quantile), not from a table. paired_stats()
is the same computation for other callers. Two reference rows close the table: the student before
distillation and the teacher (no Δ), one per seed. Runs measured on different held-out text or
teachers (HELDOUT_FLAGS differ: --seq-len, --data, ...) get one pair of reference rows per setting,
labelled by it, and one line on stderr names the flags that differ.

Runs that cannot be compared are skipped with one line on stderr, never ranked: an incomplete run
(no summary.json, a summary.json older than config.json, or summary "complete": false: a rerun was
killed) and a run measured on 0 held-out tokens (or without a held-out loss).

Figures (--plot, needs matplotlib): `budget` draws y (Acc when every run has it, else held-out loss
or KL) against k and, for runs with a sample metric, against l, with Full KD and random selection as
reference lines (the paper's Figures 2-3); `entropy` colors the first held-out sequence's tokens by
the student entropy H(q_t) and outlines the positions top-k selects with the run's k (Figure 6),
through losses.chunked_entropy and selection.POLICIES["top_k"].
"""
import argparse
import functools
import json
import math
import os
import statistics
import sys

from common import ArgumentParser, UserError, run_cli, atomic_write, read_json
from suite import suite_acc

# -----------------------------------------------------------------------------
# reading runs


def eval_file(run_dir, split="test"):
    return os.path.join(run_dir, "eval.json" if split == "test" else f"eval_{split}.json")


def incomplete_reason(run_dir):
    """Why `run_dir` is not one finished run's consistent set of files, or None when it is."""
    config, summary = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "summary.json")
    if not os.path.isfile(summary):
        return "incomplete: no summary.json (still running, or killed)"
    if os.path.getmtime(config) > os.path.getmtime(summary):
        return "incomplete: config.json is newer than summary.json (a rerun started and did not finish)"
    if read_json(summary).get("complete") is False:
        return "incomplete: summary.json says complete: false"
    return None


def heldout_tokens(summary):
    """Held-out target tokens the summary's numbers were measured on (None when not recorded)."""
    for key in ("heldout_tokens", "eval_tokens"):
        if summary.get(key) is not None:
            return int(summary[key])
    return (summary.get("student_after") or {}).get("tokens")


def load_run(run_dir, split="test"):
    """{dir, config, summary, eval, heldout} of a finished run; raises UserError for a path that is
    not a run. `heldout` = the student's held-out metrics after distillation (see kl_columns)."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory not found: {run_dir}")
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UserError(f"{run_dir}: no config.json (not a train.py --out-dir)")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    ev = eval_file(run_dir, split)
    return {"dir": run_dir, "config": read_json(os.path.join(run_dir, "config.json")), "summary": summary,
            "eval": read_json(ev) if os.path.isfile(ev) else {},
            "heldout": kl_columns(summary.get("student_after") or {}, summary)}


def kl_columns(metrics, summary=None):
    """`metrics` (heldout.heldout_metrics output) with the KL under two names that never mix:
    kl_true = KL(p || q) to the real teacher, kl_rs_estimate = the RS-KD cache estimate.

    A --cache-dir run's summary carries val_kl_rs_estimate; older ones tag student_after with
    kl_estimator and put the estimate in kl_to_teacher (and in val_kl_to_teacher)."""
    summary = summary or {}
    out = dict(metrics)
    estimated = bool(metrics.get("kl_estimator"))
    if "val_kl_rs_estimate" in summary:
        out["kl_true"] = summary.get("val_kl_to_teacher")
        out["kl_rs_estimate"] = summary["val_kl_rs_estimate"]
    else:
        out["kl_true"] = None if estimated else metrics.get("kl_to_teacher")
        out["kl_rs_estimate"] = metrics.get("kl_rs_estimate", metrics.get("kl_to_teacher") if estimated else None)
    return out


def load_comparable_runs(run_dirs, split="test", log=None):
    """The runs of `run_dirs` that can be compared; every other one is reported by one line to `log`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    runs = []
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, "config.json")):
            load_run(d, split)  # raises the right error
        reason = incomplete_reason(d)
        if reason is None:
            run = load_run(d, split)
            if heldout_tokens(run["summary"]) == 0 or run["heldout"].get("loss") is None:
                reason = "measured on 0 held-out tokens (empty held-out split): not ranked"
        if reason:
            log(f"report.py: skipping {d}: {reason}")
            continue
        runs.append(run)
    if not runs:
        raise UserError("no complete run to compare among the given directories (see the lines above)")
    return runs


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _gib(nbytes):
    return None if nbytes is None else nbytes / 2 ** 30


def mean_std(vals):
    """(mean, sample std) of the non-None values; std = 0 for one value; None when there are none."""
    vals = [float(v) for v in vals if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _t_central_mass(theta, df):
    """P(|T| < t) for Student's T with integer `df` at t = sqrt(df)·tan(theta): the finite closed form
    of Abramowitz & Stegun 26.7.3 (odd df) / 26.7.4 (even df), so no scipy and no table is needed."""
    s, c, c2 = math.sin(theta), math.cos(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin θ · (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^(df-2)θ)
        term = total = 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return s * total
    series = 0.0  # odd df: 2/π · (θ + sin θ cos θ · (1 + 2/3 cos²θ + ... up to cos^(df-3)θ))
    if df > 1:
        term = series = 1.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            series += term
        series *= s * c
    return 2 / math.pi * (theta + series)


@functools.lru_cache(maxsize=None)
def t_quantile(df, p=0.975):
    """The p quantile (p > 0.5) of Student's t with integer `df` >= 1, exact to ~1e-12: bisection over
    θ in (0, π/2), where the central mass rises monotonically from 0 to 1 (t = sqrt(df)·tan θ)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, got df={df}, p={p}")
    target, lo, hi = 2 * p - 1, 0.0, math.pi / 2
    for _ in range(64):  # halves the bracket down to double precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central_mass(mid, df) < target else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def paired_stats(diffs):
    """Mean and two-sided 95% Student-t interval of per-seed differences (None values skipped):
    {mean, lo, hi, n, called}; lo = hi = None for one difference (no interval from one seed), and
    called = the interval excludes 0. None when there is no difference at all."""
    diffs = [float(d) for d in diffs if d is not None]
    if not diffs:
        return None
    n, mean = len(diffs), sum(diffs) / len(diffs)
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "called": False}
    half = t_quantile(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "called": lo > 0 or hi < 0}


# -----------------------------------------------------------------------------
# the paper's averages of eval.py's benchmark numbers (eval.json); eval.py's doc says why these metrics

CHOICE_TASKS = ("arc_easy", "hellaswag", "piqa")
ACC_AVERAGE = [("hellaswag", "acc_norm"), ("piqa", "acc_norm"), ("arc_easy", "acc_norm"),
               ("lambada", "acc"), ("gsm8k", "strict_match")]


def paper_average(results):
    """The paper's Acc: the mean of ACC_AVERAGE's five metrics of eval.json; None if any is missing."""
    values = [(results or {}).get(task, {}).get(metric) for task, metric in ACC_AVERAGE]
    return None if any(v is None for v in values) else sum(values) / len(values)


def choice_ece_average(results):
    """Mean ece_choice_softmax over ARC-E, HellaSwag and PIQA; None if any is missing."""
    values = [(results or {}).get(task, {}).get("ece_choice_softmax") for task in CHOICE_TASKS]
    return None if any(v is None for v in values) else sum(values) / len(values)


# -----------------------------------------------------------------------------
# the compare table

# config.json fields that do not make a configuration: config.RUN_ONLY (where a run writes, what it is
# called, how it logs; report cannot import config, whose imports reach this module: test_report.py
# keeps the two in step), the seed a row averages over, and train.py's records of the machine
NOT_CONFIG = frozenset(("out_dir", "run_name", "resume", "log_every", "eval_every", "ckpt_every", "save_model",
                        "teacher_memo_gb", "keep_freed_memory", "head", "matrix", "seeds", "debug", "fresh",
                        "seed", "config_key", "git_hash", "devices", "same_as"))  # same_as: a copied run (study.py)
# the flags that fix the held-out text and the teacher the reference rows were measured with
HELDOUT_FLAGS = ("teacher", "student", "student_layers", "data", "text_field", "task", "task_data", "seq_len",
                 "eval_tokens", "eval_split", "dtype")


def config_signature(cfg):
    """What makes runs one configuration: config.json without NOT_CONFIG, as canonical JSON. precision is
    kept without its why ('bf16 autocast, fp32 master weights (--dtype auto: ...)' -> the part before it)."""
    sig = {k: v for k, v in cfg.items() if k not in NOT_CONFIG}
    if "precision" in sig:
        sig["precision"] = str(sig["precision"]).split(" (")[0]
    return json.dumps(sig, sort_keys=True, default=str)


def _differing(dicts):
    """Keys whose values are not the same in every dict of `dicts` (a missing key counts as None)."""
    keys = sorted(set().union(*dicts))
    return [k for k in keys if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in dicts}) > 1]


def _label(mine, keys):
    return ", ".join(f"{k}={mine.get(k)}" for k in keys)


def group_runs(runs):
    """Runs grouped into rows, in order of first appearance: {label: runs of one configuration}. label =
    run_name (or the directory's name); when one label holds several configurations, each gets the flags
    it differs in: 'seed0 (k=0.2)', 'seed0 (k=1.0)'."""
    by = {}
    for r in runs:
        name = r["config"].get("run_name") or r["summary"].get("run_name") or os.path.basename(
            os.path.normpath(r["dir"]))
        by.setdefault((name, config_signature(r["config"])), []).append(r)
    groups = {}
    for (name, sig), group in by.items():
        sigs = [json.loads(s) for n, s in by if n == name]
        if len(sigs) > 1:
            name = f"{name} ({_label(json.loads(sig), _differing(sigs))})"
        groups[name] = group
    return groups


def reference_rows(runs, log=None):
    """The table's reference groups, one entry per seed (runs of one seed share them): the undistilled
    student (summary student_before) and the teacher (summary teacher: loss, ppl, ece). One pair per
    held-out setting (HELDOUT_FLAGS); when there are several, `log` gets one line naming the flags."""
    settings = {}
    for r in runs:
        setting = json.dumps({f: r["config"].get(f) for f in HELDOUT_FLAGS}, sort_keys=True, default=str)
        settings.setdefault(setting, []).append(r)
    values = [json.loads(s) for s in settings]
    differ = _differing(values)
    if differ and log is not None:
        shown = "; ".join(f"--{f.replace('_', '-')} " + ", ".join(sorted({str(v.get(f)) for v in values}))
                          for f in differ)
        log(f"report.py: note: these runs differ in {shown}: their held-out numbers come from different text "
            f"or teachers, so the reference rows are given per setting")
    out = {}
    for setting, group in settings.items():
        tag = f", {_label(json.loads(setting), differ)}" if differ else ""
        before, teacher = {}, {}
        for r in group:
            seed, summary = r["config"].get("seed"), r["summary"]
            if summary.get("student_before") and seed not in before:
                before[seed] = {"config": {}, "eval": {}, "summary": {},
                                "heldout": kl_columns(summary["student_before"])}
            if summary.get("teacher") and seed not in teacher:
                teacher[seed] = {"config": {}, "eval": {}, "summary": {},
                                 "heldout": kl_columns(summary["teacher"])}
        for name, rows in ((f"student, no KD (reference{tag})", before), (f"teacher (reference{tag})", teacher)):
            if rows:
                out[name] = list(rows.values())
    return dict(sorted(out.items(), key=lambda kv: not kv[0].startswith("student")))


# columns that get a Δ vs the baseline: the quality numbers two runs of one seed can be paired on
PAIRED = ("held-out loss", "KL(p‖q)", "KL est. (RS cache)", "top-1 agree", "probe acc", "suite acc")


def paired_columns(groups, baseline):
    """{header: Δ column} for PAIRED: per-seed differences to the `baseline` group (None for a seed the
    baseline lacks, and for the reference rows, which have no config); cells via format_paired."""
    if baseline not in groups:
        raise UserError(f"--compare-baseline {baseline!r} is not a run name here; have {sorted(groups)}")
    base = {r["config"].get("seed"): r for r in groups[baseline]}
    cols = {}
    for header, fmt, get in COLUMNS:
        if header not in PAIRED:
            continue

        def diff(r, get=get):
            b = base.get(r["config"].get("seed"))
            v, w = get(r), get(b) if b is not None else None
            return None if v is None or w is None or not r["config"] else v - w
        cols[header] = (f"Δ{header} vs {baseline}", "+.4f", diff)
    return cols


def format_mean_std(ms, fmt):
    return "-" if ms is None else f"{ms[0]:{fmt}} ± {ms[1]:{fmt.lstrip('+')}}"


def format_paired(st, fmt):
    """A Δ cell: `+0.0123 [+0.0050, +0.0196] *` (* = interval excludes 0), `+0.0123 [n=1]`, or `-`."""
    if st is None:
        return "-"
    if st["lo"] is None:
        return f"{st['mean']:{fmt}} [n={st['n']}]"
    return f"{st['mean']:{fmt}} [{st['lo']:{fmt}}, {st['hi']:{fmt}}]" + (" *" if st["called"] else "")


def compare_runs(run_dirs, split="test", refs=True, baseline=None, log=None):
    """The paper-style markdown table (see the module doc); columns no row has are left out."""
    if not run_dirs:
        raise UserError("--compare needs at least one run directory")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    runs = load_comparable_runs(run_dirs, split, log)
    groups = group_runs(runs)
    paired = paired_columns(groups, baseline) if baseline else {}
    columns = [col for c in COLUMNS for col in (c, paired.get(c[0])) if col]  # Δ right after its column
    if refs:
        groups.update(reference_rows(runs, log))
    delta = {header for header, _, _ in paired.values()}  # Δ columns: an interval; the others: mean ± std
    rows = []
    for name, group in groups.items():
        cells = [name, str(len(group))]
        for header, fmt, get in columns:
            values = [get(r) for r in group]
            cells.append(format_paired(paired_stats(values), fmt) if header in delta
                         else format_mean_std(mean_std(values), fmt))
        rows.append(cells)
    keep = [0, 1] + [j + 2 for j in range(len(columns)) if any(row[j + 2] != "-" for row in rows)]
    head = ["run", "n"] + [c[0] for c in columns]
    lines = ["| " + " | ".join(head[j] for j in keep) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(keep) - 1)) + "|"]
    lines += ["| " + " | ".join(row[j] for j in keep) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the step-size sweep: each method at its own lr, chosen on the suite's validation part

def lr_sweep_data(run_dirs, baseline="full_kd", log=None):
    """{method: {lr: {seed: {val, test, kl}}}} and {method: chosen lr}. A method is one configuration but
    for its lr (its label: run_name without the `_lr...` suffix study.py's lr matrix adds); val / test =
    the suite acc of eval_validation.json / eval.json (train.py --suite), kl = held-out KL(p || q). Each
    method's lr is the one with the highest mean validation suite acc (ties: the larger lr)."""
    runs = load_comparable_runs(run_dirs, "test", log)
    data, names = {}, {}
    for r in runs:
        cfg, lr = r["config"], float(r["config"]["lr"])
        sig = config_signature({k: v for k, v in cfg.items() if k != "lr"})
        name = str(cfg.get("run_name") or os.path.basename(os.path.dirname(r["dir"])))
        names.setdefault(sig, name[:name.rfind("_lr")] if "_lr" in name else name)
        val = load_run(r["dir"], "validation")["eval"]
        row = {"val": suite_acc(val), "test": suite_acc(r["eval"]), "kl": r["heldout"].get("kl_true")}
        if row["val"] is None or row["test"] is None:
            raise UserError(f"{r['dir']}: no suite acc on both parts (train.py --suite sandbox writes them)")
        data.setdefault(names[sig], {}).setdefault(lr, {})[cfg.get("seed")] = row
    chosen = {m: max(by_lr, key=lambda lr: (statistics.fmean(v["val"] for v in by_lr[lr].values()), lr))
              for m, by_lr in data.items()}
    if baseline not in data:
        raise UserError(f"--lr-baseline {baseline!r} is not a method here; have {sorted(data)}")
    return data, chosen


def lr_sweep_table(run_dirs, baseline="full_kd", log=None):
    """Two markdown tables: every (method, lr) with suite acc on both parts, held-out KL and the test Δ
    to the baseline at the same lr; then best against best: each method at its chosen lr, its test suite
    acc and held-out KL, each with the per-seed Δ to the baseline at the baseline's own chosen lr."""
    data, chosen = lr_sweep_data(run_dirs, baseline, log)

    def cell(by_seed, key, fmt=".4f"):
        return format_mean_std(mean_std([v[key] for v in by_seed.values()]), fmt)

    def delta(by_seed, base, key):
        return format_paired(paired_stats([v[key] - base[s][key] for s, v in by_seed.items() if s in base]), "+.4f")

    lines = ["| method | lr | n | suite acc (val) | suite acc (test) | Δ test vs " + baseline + " (same lr) | "
             "held-out KL |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, by_lr in data.items():
        for lr in sorted(by_lr, reverse=True):
            runs, base = by_lr[lr], data[baseline].get(lr, {})
            mark = " (chosen)" if lr == chosen[m] else ""
            lines.append(f"| {m} | {lr:g}{mark} | {len(runs)} | {cell(runs, 'val')} | {cell(runs, 'test')} | "
                         f"{delta(runs, base, 'test') if m != baseline else '-'} | {cell(runs, 'kl')} |")
    base = data[baseline][chosen[baseline]]
    lines += ["", f"Best against best (each method at the lr its validation suite acc chose; Δ: per-seed "
              f"difference to {baseline} at lr {chosen[baseline]:g}, 95% t interval, * = excludes 0):", "",
              "| method | chosen lr | n | suite acc (test) | Δ suite acc | held-out KL | Δ KL |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for m in data:
        runs = data[m][chosen[m]]
        dd = (lambda key: "-") if m == baseline else (lambda key: delta(runs, base, key))  # noqa: E731
        lines.append(f"| {m} | {chosen[m]:g} | {len(runs)} | {cell(runs, 'test')} | {dd('test')} | "
                     f"{cell(runs, 'kl')} | {dd('kl')} |")
    return "\n".join(lines) + "\n"


def plot_lr(run_dirs, path, baseline="full_kd"):
    """Suite acc (validation part) and held-out KL against lr, one line per method (mean ± sd over seeds)."""
    plt = _pyplot()
    data, chosen = lr_sweep_data(run_dirs, baseline)
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axs[0], "val", "suite acc (validation part)"), (axs[1], "kl", "held-out KL(p || q)")):
        for m, by_lr in data.items():
            lrs = sorted(by_lr)
            ms = [mean_std([v[key] for v in by_lr[lr].values()]) for lr in lrs]
            ax.errorbar(lrs, [x[0] for x in ms], yerr=[x[1] for x in ms], marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("peak lr")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return data, chosen


# -----------------------------------------------------------------------------
# figures

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """fig.savefig through common.atomic_write (a killed write never leaves half a PNG)."""
    import io
    ext = os.path.splitext(path)[1] or ".png"
    buf = io.BytesIO()
    fig.savefig(buf, format=ext[1:], dpi=150, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def _is_none(v):
    return v is None or str(v).lower() in ("none", "", "null")


def _xy_series(points):
    """[(x, y)] -> [(x, mean, std, n)] sorted by x (seeds at the same x averaged)."""
    by_x = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    return [(x, *mean_std(ys), len(ys)) for x, ys in sorted(by_x.items())]


def budget_data(run_dirs, metric="auto", split="test"):
    """What the budget figure draws: per axis ('k', 'l') the sweep series and the reference lines.

    A run whose sample_metric is not 'none' varies l; every other run varies k. Full KD = policy 'full'
    or k = l = 1 without sample selection; random = policy/pos_metric 'random' (k axis) or sample_metric
    'random' (l axis). y = the benchmark Acc average (metric 'acc'), the held-out student loss
    ('loss') or its true KL to the teacher ('kl'); 'auto' takes acc when every run has it, else loss.
    """
    if not run_dirs:
        raise UserError("--plot-kind budget needs run directories")
    runs = load_comparable_runs(run_dirs, split)
    if metric == "auto":
        metric = "acc" if all(paper_average(r["eval"]) is not None for r in runs) else "loss"
    if metric not in ("acc", "loss", "kl"):
        raise UserError(f"--plot-metric must be auto, acc, loss or kl, got {metric!r}")

    def y_of(r):
        y = paper_average(r["eval"]) if metric == "acc" else r["heldout"].get(
            "kl_true" if metric == "kl" else "loss")
        if y is None:
            raise UserError(f"{r['dir']}: no {metric} to plot")
        return float(y)

    out = {"metric": metric, "axes": {}}
    full, points = [], {"k": {}, "l": {}}
    random_refs = {"k": [], "l": []}
    for r in runs:
        c = r["config"]
        k, l = float(c.get("k", 1.0)), float(c.get("l", 1.0))
        if _is_none(c.get("sample_metric")):
            if c.get("policy") == "full" or (k >= 1.0 and l >= 1.0):
                full.append(y_of(r))
            elif c.get("policy") == "random" or c.get("pos_metric") == "random":
                random_refs["k"].append((k, y_of(r)))
            else:
                points["k"].setdefault(f"{c.get('pos_metric')} / {c.get('policy')}", []).append((k, y_of(r)))
        elif c.get("sample_metric") == "random":
            random_refs["l"].append((l, y_of(r)))
        else:
            points["l"].setdefault(str(c.get("sample_metric")), []).append((l, y_of(r)))
    for axis in ("k", "l"):
        if points[axis] or random_refs[axis]:
            out["axes"][axis] = {"series": {name: _xy_series(p) for name, p in points[axis].items()},
                                 "random": _xy_series(random_refs[axis]), "full": mean_std(full)}
    if not out["axes"]:
        raise UserError("--plot-kind budget: no run varies k or l (only Full KD runs given)")
    return out


def plot_budget(run_dirs, path, metric="auto", split="test"):
    """Figures 2-3: y vs k (and vs l), Full KD and random as reference lines. Returns budget_data()."""
    plt = _pyplot()
    data = budget_data(run_dirs, metric, split)
    axis_keys = list(data["axes"])
    fig, axs = plt.subplots(1, len(axis_keys), figsize=(5.5 * len(axis_keys), 4), squeeze=False)
    ylabel = {"acc": "benchmark Acc (avg)", "loss": "held-out student loss",
              "kl": "held-out KL(teacher || student)"}[data["metric"]]
    for ax, key in zip(axs[0], axis_keys):
        d = data["axes"][key]
        for name, s in d["series"].items():
            ax.errorbar([p[0] for p in s], [p[1] for p in s], yerr=[p[2] for p in s], marker="o",
                        capsize=3, label=name)
        if d["full"] is not None:
            ax.axhline(d["full"][0], color="black", linestyle="--", label="Full KD")
        if len(d["random"]) == 1:
            ax.axhline(d["random"][0][1], color="gray", linestyle=":",
                       label=f"random ({key}={d['random'][0][0]:g})")
        elif d["random"]:
            ax.plot([p[0] for p in d["random"]], [p[1] for p in d["random"]], color="gray", linestyle=":",
                    marker="x", label="random")
        ax.set_xlabel({"k": "k (fraction of positions supervised)", "l": "l (fraction of samples kept)"}[key])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return data


def _wrap_lines(shown, width):
    """Greedy line wrap in character units (monospace): [[(token index, x), ...], ...]."""
    lines, x = [[]], 0
    for i, s in enumerate(shown):
        if x + len(s) > width and lines[-1]:
            lines.append([])
            x = 0
        lines[-1].append((i, x))
        x += len(s) + 1
    return lines


def plot_entropy_tokens(tokens, entropy, selected, path, title=None, width=90):
    """Figure 6: tokens colored by student entropy H(q_t), selected positions (m_t = 1) outlined.

    tokens: list of T strings, entropy (T,), selected (T,) bool. Returns {'lines', 'outlined'} counted
    from the drawn boxes.
    """
    import torch
    plt = _pyplot()
    from matplotlib import colors
    from matplotlib.cm import ScalarMappable
    H = torch.as_tensor(entropy, dtype=torch.float32).flatten()
    sel = torch.as_tensor(selected, dtype=torch.bool).flatten()
    if not (len(tokens) == H.numel() == sel.numel()):
        raise ValueError(f"tokens ({len(tokens)}), entropy ({H.numel()}) and selected ({sel.numel()}) "
                         f"differ in length")
    if not tokens:
        raise ValueError("plot_entropy_tokens: no tokens")
    shown = [t.replace("\n", "\\n").replace("\t", "\\t") or "∅" for t in tokens]
    lines = _wrap_lines(shown, width)
    font_size = 9
    char_width = 0.6 * font_size / 72  # inches per monospace character
    height = 0.3 * len(lines) + 1.3
    fig = plt.figure(figsize=(width * char_width + 0.6, height))
    ax = fig.add_axes([0.02, 0.35 / height + 0.12, 0.96, 0.8 - 0.35 / height])
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines) - 0.5, -0.5)
    ax.axis("off")
    norm = colors.Normalize(vmin=0.0, vmax=max(float(H.max()), 1e-6))
    cmap = plt.get_cmap("YlOrRd")
    outlined = 0
    for row, items in enumerate(lines):
        for i, x in items:
            on = bool(sel[i])
            outlined += on
            dark = norm(float(H[i])) > 0.7  # white text on the darkest boxes stays readable
            box = dict(boxstyle="square,pad=0.15", facecolor=cmap(norm(float(H[i]))),
                       edgecolor="blue" if on else "none", linewidth=1.6 if on else 0.0)
            ax.text(x, row, shown[i], fontfamily="monospace", fontsize=font_size, va="center", ha="left",
                    parse_math=False, color="white" if dark else "black", bbox=box)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal",
                       fraction=0.08, pad=0.02)
    bar.set_label("student entropy H(q_t) (nats); outlined = selected (m_t = 1)")
    if title:
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return {"lines": len(lines), "outlined": outlined}


def token_entropy(model, input_ids, vocab_size=None, chunk_size=1024):
    """H(q_t) for every position of one sequence (T,) -> (T,) fp32, via losses.chunked_entropy."""
    import torch
    import losses
    from models import head_weight, trunk
    device = next(model.parameters()).device
    with torch.no_grad():
        hidden = trunk(model, torch.as_tensor(input_ids, dtype=torch.long, device=device)[None])[0]  # (T, d)
        return losses.chunked_entropy(hidden, head_weight(model, vocab_size), chunk_size).cpu()


def entropy_selection(entropy, valid, k):
    """The positions top-k selects by entropy (T,) among `valid` (T,): selection.POLICIES['top_k'],
    the same call train.py's step makes (budget selection.num_selected)."""
    import selection
    weights = selection.POLICIES["top_k"](entropy[None].float(), valid[None].bool(), k)  # (1, T)
    return weights[0] > 0


def plot_entropy_run(run_dir, path, n_tokens=128, device="cpu", split="validation"):
    """Figure 6 for a run: its model on the first held-out sequence, top-k by entropy with the run's k."""
    import torch
    import data
    from models import load_model
    cfg = read_json(os.path.join(run_dir, "config.json"))
    model, tok = load_model(os.path.join(run_dir, "model"), device, torch.float32, flag="run")
    packed = data.load_splits(tok, **data_kwargs(cfg))["val" if split == "validation" else "test"]
    if len(packed.input_ids) == 0:
        raise UserError(f"{run_dir}: the held-out split is empty")
    T = min(n_tokens, packed.input_ids.shape[1])
    ids, targets, valid = packed.input_ids[0, :T], packed.targets[0, :T], packed.valid[0, :T]
    vocab_size = min(len(tok), model.get_output_embeddings().weight.shape[0])
    H = token_entropy(model, ids, vocab_size)
    k = float(cfg.get("k", 1.0))
    selected = entropy_selection(H, valid, k)
    tokens = [tok.decode([int(t)]) for t in targets]  # position t is scored on the token it predicts
    name = os.path.basename(os.path.normpath(run_dir))
    return plot_entropy_tokens(tokens, H, selected, path, title=f"{name}: top-{k:g} by student entropy")


def data_kwargs(cfg, args=None):
    """data.load_splits keyword arguments from a run's config.json, overridden by CLI flags."""
    kw = {k: cfg.get(k) for k in ("data", "seq_len", "tokens", "eval_tokens", "seed", "text_field", "task",
                                  "task_data")}
    kw["backend"] = cfg.get("tokenizer_backend")
    if args is not None:
        for k in ("data", "seq_len", "tokens", "eval_tokens", "seed"):
            if getattr(args, k, None) is not None:
                kw[k] = getattr(args, k)
    for k in ("tokens", "eval_tokens"):
        if kw.get(k) is not None:
            kw[k] = int(kw[k])
    if kw.get("task") in (None, "lm"):  # only a task-specific run needs task/task_data
        kw.pop("task", None), kw.pop("task_data", None)
    return {k: v for k, v in kw.items() if v is not None}


# -----------------------------------------------------------------------------
# command line

def get_parser():
    p = ArgumentParser(prog="report.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("runs", nargs="*", help="run dirs (train.py --out-dir) for --plot; also accepted for --compare")
    a("--compare", nargs="+", metavar="RUN", help="print the paper-style table of these runs")
    a("--compare-out", metavar="FILE.md", help="also write the table here")
    a("--compare-baseline", metavar="RUN_NAME",
      help="add per-seed differences to this run name (loss, KL, top-1 agree, probe acc): paired mean "
           "and 95%% t interval, * when it excludes 0")
    a("--split", choices=["validation", "test"], default="test",
      help="which eval file to read: eval.json (test) or eval_validation.json")
    a("--plot", metavar="FILE.png", help="draw a figure (needs matplotlib)")
    a("--plot-kind", choices=["budget", "entropy", "lr"], default="budget",
      help="lr: suite acc and held-out KL against lr (study.py's lr matrix)")
    a("--lr-sweep", nargs="+", metavar="RUN", help="the step-size tables: every (method, lr), then each method "
      "at the lr its validation suite acc chose (study.py's lr matrix)")
    a("--lr-baseline", default="full_kd", help="--lr-sweep / --plot-kind lr: the method the Δ columns subtract")
    a("--plot-metric", choices=["auto", "acc", "loss", "kl"], default="auto",
      help="budget: y axis (auto: benchmark Acc when every run has eval.json, else held-out loss)")
    a("--plot-tokens", type=int, default=128, help="entropy: tokens shown")
    a("--device", default="cpu", help="entropy: where the run's model runs")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if not args.compare and not args.plot and not args.lr_sweep:
        raise UserError("nothing to do: give --compare RUN..., --lr-sweep RUN... or --plot FILE RUN...")
    result = None
    if args.lr_sweep:
        result = lr_sweep_table(args.lr_sweep + args.runs, args.lr_baseline)
        print(result, end="")
        if args.compare_out:
            atomic_write(args.compare_out, result)
    if args.compare:
        result = compare_runs(args.compare + args.runs, args.split, baseline=args.compare_baseline)
        print(result, end="")
        if args.compare_out:
            atomic_write(args.compare_out, result)
    if args.plot:
        runs = args.runs or args.lr_sweep or args.compare or []
        if args.plot_kind == "budget":
            return plot_budget(runs, args.plot, args.plot_metric, args.split)
        if args.plot_kind == "lr":
            return plot_lr(runs, args.plot, args.lr_baseline)
        if len(runs) != 1 or not os.path.isdir(os.path.join(runs[0], "model")):
            raise UserError("--plot-kind entropy needs exactly one run directory (with RUN/model)")
        return plot_entropy_run(runs[0], args.plot, args.plot_tokens, args.device)
    return result


COLUMNS = [  # (header, format, row -> value or None); row = load_run() or a reference_rows() entry
    # the headline first, as in the paper's tables: benchmark accuracy (or the sandbox suite's)
    ("Acc", ".4f", lambda r: paper_average(r["eval"])),
    ("suite acc", ".4f", lambda r: suite_acc(r["eval"])),  # the sandbox suite's average (suite.py)
    ("held-out loss", ".4f", lambda r: r["heldout"].get("loss")),
    ("held-out PPL", ".2f", lambda r: r["heldout"].get("ppl")),
    ("KL(p‖q)", ".4f", lambda r: r["heldout"].get("kl_true")),
    ("KL est. (RS cache)", ".4f", lambda r: r["heldout"].get("kl_rs_estimate")),
    ("top-1 agree", ".4f", lambda r: r["heldout"].get("top1_agree")),
    ("held-out ECE", ".4f", lambda r: r["heldout"].get("ece")),
    ("probe acc", ".4f", lambda r: r["heldout"].get("probe_acc")),  # a fraction, train.py --probe
    ("LAMBADA PPL", ".2f", lambda r: _get(r["eval"], "lambada", "ppl")),
    ("LAMBADA ECE", ".4f", lambda r: _get(r["eval"], "lambada", "ece_greedy_word")
     if _get(r["eval"], "lambada", "ece_greedy_word") is not None else _get(r["eval"], "lambada", "ece")),
    ("ECE choices", ".4f", lambda r: choice_ece_average(r["eval"])),
    ("GSM8K strict", ".4f", lambda r: _get(r["eval"], "gsm8k", "strict_match")),
    ("GSM8K flexible", ".4f", lambda r: _get(r["eval"], "gsm8k", "flexible_extract")),
    ("IFEval S", ".4f", lambda r: _get(r["eval"], "ifeval", "prompt_strict")),
    ("IFEval L", ".4f", lambda r: _get(r["eval"], "ifeval", "prompt_loose")),
    ("sup. pos", ".3f", lambda r: _get(r["summary"], "sup_frac_positions")),
    ("sup. samples", ".3f", lambda r: _get(r["summary"], "sup_frac_samples")),
    ("wall (s)", ".1f", lambda r: _get(r["summary"], "wall_time_s")),
    ("train (s)", ".1f", lambda r: _get(r["summary"], "wall_time_split", "train_s")),
    ("mem S (GiB)", ".2f", lambda r: _gib(_get(r["summary"], "peak_mem_bytes", "student"))),
    ("mem T (GiB)", ".2f", lambda r: _gib(_get(r["summary"], "peak_mem_bytes", "teacher"))),
]


if __name__ == "__main__":
    run_cli(main, "report.py")
