"""Benchmark: wall time of sample selection and of the reusable teacher cache (paper Table 7).

Five train.py runs on the same data and token budget (the tiny preset: SmolLM2-135M teacher, its
8-layer student, the offline stdlib corpus), each a subprocess with its own --out-dir:

    full_kd          --k 1.0                                   every position, every sample
    random_pos_20    --policy random --k 0.2                   20% random positions per sequence
    top_smp_20       --sample-metric student_entropy --sample-frac 0.2   TopSmp: keep the 20% of samples with the
                                                               highest mean student entropy s_i
    se_kd_3x_build   --k 0.2 --sample-metric student_entropy --sample-frac 0.2 --rs-u 64 --cache-dir DIR
                     SE-KD_3X: positions x samples x classes; builds the RS-KD teacher cache (and the
                     sample selection) in DIR
    se_kd_3x_reuse   the same flags and DIR: the selection, the cache and the student init are reused,
                     the teacher is never loaded

From each summary.json: wall_time_s, wall_time_split {load_s, scoring_s, cache_s, train_s, eval_s} and
the held-out result student_after {loss, kl_to_teacher}. Table 7 compares wall times as ratios to
Full KD (paper: TopSmp 7h01m / Full KD 22h52m = 0.307, SE-KD_3X reusing the cache 3h58m / 22h52m
= 0.174); we print the ratios of train_s and of scoring + cache + train (the work a method adds or
saves; model loading and evaluation are the same for all and are reported apart).

Note: runs with --cache-dir evaluate against the cache (heldout.heldout_metrics_sparse), whose KL is
the RS-KD estimate (a constant H(p) - E[H(p~)] above the true KL); the held-out CE loss is comparable
across all rows.

    python bench/sample_selection.py --quick        # ~5 min on 2 CPU cores
    python bench/sample_selection.py --out bench/sample_selection.json

Prints a markdown table, then `RATIO <name> <ours>/<baseline> = <value>` lines.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


M = "student_entropy"
RUNS = [
    ("full_kd", ["--k", "1.0"]),
    ("random_pos_20", ["--policy", "random", "--k", "0.2"]),
    ("top_smp_20", ["--sample-metric", M, "--sample-frac", "0.2"]),
    ("se_kd_3x_build", ["--k", "0.2", "--sample-metric", M, "--sample-frac", "0.2", "--rs-u", "64", "--cache-dir", "{cache}"]),
    ("se_kd_3x_reuse", ["--k", "0.2", "--sample-metric", M, "--sample-frac", "0.2", "--rs-u", "64", "--cache-dir", "{cache}"]),
]
PAPER = {"top_smp_20": 7 * 60 + 1, "se_kd_3x_reuse": 3 * 60 + 58, "full_kd": 22 * 60 + 52}  # minutes, Table 7
SPLIT = ["load_s", "scoring_s", "cache_s", "train_s", "eval_s"]


from benchutil import machine, write_json  # noqa: E402



def run(name, flags, out_dir, base, log_dir):
    """One train.py subprocess; returns its summary.json plus the command line."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + base + flags + ["--out-dir", out_dir, "--run-name", name]
    log = os.path.join(log_dir, f"{os.path.basename(os.path.dirname(out_dir))}_{name}.log")
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    outer = time.time() - t0
    if p.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{name}: train.py exited with {p.returncode}; log {log}:\n{tail}")
    with open(os.path.join(out_dir, "summary.json")) as f:
        s = json.load(f)
    s["outer_wall_s"] = outer  # includes the interpreter start and imports
    s["cmd"] = " ".join(cmd[1:])
    return s


def fmt_s(x):
    return f"{x:.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller budget (CPU: ~5 min)")
    p.add_argument("--tokens", type=int, help="training token budget (default 8192 quick / 16384)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens (default 1024 quick / 4096)")
    p.add_argument("--seq-len", type=int, default=256, help="T (the published runs used 256)")
    p.add_argument("--repeats", type=int, default=1, help="repeat the five runs (rotated order); medians")
    p.add_argument("--workdir", help="keep the runs' out dirs and the cache here (default: temp, removed)")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. '--teacher X'")
    p.add_argument("--out", help="save the numbers to this JSON file (atomic)")
    a = p.parse_args(argv)
    tokens = a.tokens or (8192 if a.quick else 16384)
    eval_tokens = a.eval_tokens or (1024 if a.quick else 4096)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if tokens < a.seq_len * 4 or eval_tokens < a.seq_len:
        p.error(f"--tokens must be >= 4 sequences and --eval-tokens >= 1 sequence of --seq-len {a.seq_len}")
    mach = machine()
    print(f"machine: {mach['cpu_count']} CPUs ({mach['cpu']}), torch {mach['torch']}, threads {mach['threads']}, "
          f"device {'cuda (' + mach['gpu'] + ')' if mach['gpu'] else 'cpu'}", flush=True)
    base = ["--preset", "tiny", "--tokens", str(tokens), "--eval-tokens", str(eval_tokens), "--seq-len",
            str(a.seq_len), "--seed", "0", "--no-save-model", "--log-every", "1000"] + a.extra.split()
    print(f"train.py {' '.join(base)} + per-run flags", flush=True)
    own = a.workdir is None
    work = tempfile.mkdtemp(prefix="sekd_smp_bench_") if own else a.workdir
    os.makedirs(work, exist_ok=True)
    results = {name: [] for name, _ in RUNS}
    try:
        for r in range(a.repeats):
            rep = os.path.join(work, f"rep{r}")
            if os.path.exists(rep):
                shutil.rmtree(rep)  # a fresh cache dir per repeat: the build run must build
            os.makedirs(rep)
            cache_dir = os.path.join(rep, "cache")
            # rotate the three cache-free runs; the build run always precedes the reuse run
            free = RUNS[:3][r % 3:] + RUNS[:3][:r % 3]
            for name, flags in free + RUNS[3:]:
                flags = [f.replace("{cache}", cache_dir) for f in flags]
                s = run(name, flags, os.path.join(rep, name), base, work)
                results[name].append(s)
                sp = s["wall_time_split"]
                print(f"  rep {r} {name:15s} wall {s['wall_time_s']:7.1f}s  train {sp['train_s']:6.1f}s  "
                      f"scoring {sp['scoring_s']:5.1f}s  cache {sp['cache_s']:6.1f}s  held-out loss "
                      f"{s['student_after']['loss']:.4f}", flush=True)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)

    def med(name, key):
        vals = [s["wall_time_split"][key] if key in SPLIT else s[key] for s in results[name]]
        return statistics.median(vals)

    rows = {}
    for name, _ in RUNS:
        sp = {k: med(name, k) for k in SPLIT}
        rows[name] = dict(sp, wall=med(name, "wall_time_s"), work=sp["scoring_s"] + sp["cache_s"] + sp["train_s"],
                          loss=statistics.median(s["student_after"]["loss"] for s in results[name]),
                          kl=statistics.median(s["student_after"].get("kl_to_teacher", float("nan"))
                                               for s in results[name]),
                          kl_sparse="kl_estimator" in results[name][0]["student_after"],
                          before=results[name][0]["student_before"]["loss"],
                          steps=results[name][0]["steps"], samples=results[name][0]["sup_frac_samples"],
                          positions=results[name][0]["sup_frac_positions"],
                          teacher_loaded=results[name][0]["teacher_loaded"],
                          cache_mb=results[name][0].get("cache_bytes", 0) / 1e6)
    f = rows["full_kd"]
    print(f"\n### Table 7 (wall time, seconds; median of {a.repeats}): tiny preset, --tokens {tokens} "
          f"--eval-tokens {eval_tokens} --seq-len {a.seq_len}\n")
    print("| run | steps | samples | positions | teacher loaded | load | scoring | cache | train | eval | "
          "wall | scoring+cache+train | x Full KD | train x Full KD | held-out loss (before) | held-out KL |")
    print("|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _ in RUNS:
        r_ = rows[name]
        kl = f"{r_['kl']:.4f}{' (RS-KD est.)' if r_['kl_sparse'] else ''}"
        print(f"| {name} | {r_['steps']} | {r_['samples']:.0%} | {r_['positions']:.0%} | "
              f"{'yes' if r_['teacher_loaded'] else 'no'} | {fmt_s(r_['load_s'])} | {fmt_s(r_['scoring_s'])} | "
              f"{fmt_s(r_['cache_s'])} | {fmt_s(r_['train_s'])} | {fmt_s(r_['eval_s'])} | {fmt_s(r_['wall'])} | "
              f"{fmt_s(r_['work'])} | {r_['work'] / f['work']:.3f} | {r_['train_s'] / f['train_s']:.3f} | "
              f"{r_['loss']:.4f} ({r_['before']:.4f}) | {kl} |")
    print("\npaper Table 7 (wall time ratio to Full KD): TopSmp "
          f"{PAPER['top_smp_20'] / PAPER['full_kd']:.3f}, SE-KD_3X reusing the cache "
          f"{PAPER['se_kd_3x_reuse'] / PAPER['full_kd']:.3f}\n")
    ratios = []
    for name, _ in RUNS[1:]:
        ratios.append(("train_time", f"{name}/full_kd", rows[name]["train_s"] / f["train_s"]))
        ratios.append(("scoring_cache_train_time", f"{name}/full_kd", rows[name]["work"] / f["work"]))
        ratios.append(("wall_time", f"{name}/full_kd", rows[name]["wall"] / f["wall"]))
    for name in ("top_smp_20", "se_kd_3x_reuse"):
        ratios.append(("paper_wall_time", f"{name}/full_kd", PAPER[name] / PAPER["full_kd"]))
    for n, w, v in ratios:
        print(f"RATIO {n} {w} = {v:.3f}")
    if a.out:
        write_json(a.out, dict(machine=mach, argv=sys.argv, quick=a.quick, base_flags=base, rows=rows,
                                runs={k: v for k, v in results.items()},
                                ratios={f"{n} {w}": v for n, w, v in ratios}))
    return rows


if __name__ == "__main__":
    main()
