"""Studies: every table of the paper as a named list of runs, run for several seeds (like nanochat's
runs/*.sh, the multi-run logic lives outside the trainer).

    python train.py --matrix table3 --seeds 0,1,2 --out-dir runs/t3 [flags for every run]
    python study.py [--matrices table2,budget] [--seeds 0,1]   # Tables 2-4 + the sweeps on sandbox.py's pair

train.py hands the parsed flags and its single-run function to `run_matrix`; this module never imports
train.py. For each (config, seed) it overrides a few flags on a copy of the parsed flags (no argv
editing), then:
  - skips a finished run only if its recorded config_key equals the one requested (a rerun with other
    flags into the same out-dir is refused, naming the flags that differ, not silently reused);
  - copies a finished run with the same config_key from a sibling dir (table 3's top_k_20 is table 2's
    top20_student_entropy) instead of rerunning it;
  - shares between runs what does not change their numbers: the loaded teacher and tokenizer, the
    teacher's final hidden states per sequence (TeacherMemo, --teacher-memo-gb) and the untrained
    student's held-out numbers, so the teacher's trunk runs once per sequence for the whole table.
Finally the table is written with report.py's compare (RUN/table3.md). Every run's out-dir goes through
prepare_out_dir: a finished run's files stay until a new run has results to replace them with.
"""
import copy
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

import common
import config
import selection

M = "student_entropy"
MATRICES = {  # name -> [(run name, flag overrides)]
    "table2": [("full_kd", dict(k=1.0)), ("random_pos_20", dict(policy="random", k=0.2)),
               ("atkd", dict(loss="atkd", k=1.0))]
              + [(f"top20_{m}", dict(pos_metric=m, k=0.2)) for m in selection.METRICS if m != "random"],
    "table3": [(f"{pol}_20", dict(policy=pol, k=0.2))
               for pol in ["top_k", "gls", "curriculum", "pos_rs", "pos_rs_star"]],
    "table4": [("rs_kd", dict(rs_u=64)),
               ("top_smp_20", dict(sample_metric=M, sample_frac=0.2)),
               ("random_smp_20", dict(sample_metric="random", sample_frac=0.2)),
               ("se_kd_top_smp", dict(k=0.2, sample_metric=M, sample_frac=0.2)),
               ("se_kd_3x", dict(k=0.2, sample_metric=M, sample_frac=0.2, rs_u=64))],
    "table5": [("gsm8k_full_kd", dict(task="gsm8k")), ("gsm8k_se_kd", dict(task="gsm8k", k=0.2)),
               ("gsm8k_on_policy", dict(task="gsm8k", on_policy=True)),
               ("gsm8k_on_policy_se_kd", dict(task="gsm8k", on_policy=True, k=0.2))],
    # the headline comparison alone (Full KD, SE-KD, RandomPos at 20%), e.g. to rerun at a longer budget
    "core": [("full_kd", dict(k=1.0)), ("top20_student_entropy", dict(pos_metric="student_entropy", k=0.2)),
             ("random_pos_20", dict(policy="random", k=0.2))],
    "budget": [(f"k{k}", dict(k=k)) for k in [0.05, 0.1, 0.2, 0.5, 1.0]]
              + [(f"l{l}", dict(sample_metric=M, sample_frac=l)) for l in [0.1, 0.2, 0.5]],
}
LRS = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)  # the step-size sweep: the pair's pretraining peak down to 1/100 of it
MATRICES["lr"] = [(f"{name}_lr{lr:g}", dict(overrides, lr=lr)) for name, overrides in MATRICES["core"] for lr in LRS]
assert set(MATRICES) == set(config.MATRICES)


# -----------------------------------------------------------------------------
# what identifies a run's numbers

def config_dict(args):
    """The flags that change a run's numbers (not where it writes, nor what it is called)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in config.RUN_ONLY}


def config_key(args):
    return hashlib.sha256(json.dumps(config_dict(args), default=str).encode()).hexdigest()[:16]


def differing_flags(old_cfg, args):
    """'--k 1.0 -> 0.2, --lr ...' for the numbers-changing flags that differ between a recorded config and args."""
    new = json.loads(json.dumps(config_dict(args), default=str))
    diffs = [f"--{k.replace('_', '-')} {old_cfg.get(k)!r} -> {v!r}" for k, v in new.items()
             if k in old_cfg and old_cfg.get(k) != v]
    return ", ".join(diffs) or "the code version (config_key)"


def run_state(out_dir):
    """'done' (summary.json newer than config.json), 'incomplete' (config.json only) or 'empty'."""
    cfg, summ = (os.path.join(out_dir, f) for f in ("config.json", "summary.json"))
    if os.path.exists(summ) and (not os.path.exists(cfg) or os.path.getmtime(summ) >= os.path.getmtime(cfg)):
        return "done"
    return "incomplete" if os.path.exists(cfg) else "empty"


def read_config(out_dir):
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


STAGE = ".next"  # a run that replaces a finished one writes here; publish() then moves its files over
RUN_FILES = ("config.json", "metrics.jsonl", "ckpt.pt", "model",  # and summary.json, always last
             "eval.json", "eval_validation.json", "eval_examples", "eval_examples_validation")  # train.py --suite


def prepare_out_dir(args, key, log=print):
    """Where this run writes: --out-dir, or its STAGE when it replaces a finished run there (--fresh);
    None when --resume finds the run finished (nothing to do). A finished run's files are never deleted
    or rewritten before a new run has results to replace them with (publish)."""
    out, stage = args.out_dir, os.path.join(args.out_dir, STAGE)
    os.makedirs(out, exist_ok=True)
    common.clean_temp_files(out)  # temp files of a write that a kill interrupted
    publish(out)  # finish the move of a replacement that a kill interrupted
    old, done = read_config(out), run_state(out) == "done"
    other = old.get("config_key") not in (None, key) and f"other flags ({differing_flags(old, args)})"
    if args.resume:
        run_dir = stage if done else out  # a killed replacement resumes in the stage
        if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            cfg = read_config(run_dir)
            if cfg.get("config_key") not in (None, key):
                raise common.UserError(f"--resume: {run_dir}/ckpt.pt is a run of other flags "
                                       f"({differing_flags(cfg, args)}); use another --out-dir or --fresh")
            return run_dir
        if done and not other:
            log(f"--resume: the run in {out} already finished (summary.json); nothing to do")
            return None
        if not done:
            log(f"--resume: no checkpoint in {out}, starting fresh")
    if done and not args.fresh:
        raise common.UserError(f"--out-dir {out} holds a finished run of {other or 'the same flags'}: pass --fresh "
                               "to replace it (its files stay until the new run finishes) or use another --out-dir")
    if other and not args.fresh:
        raise common.UserError(f"--out-dir {out} holds a run of {other}: use another --out-dir, or --fresh "
                               "to replace it")
    shutil.rmtree(stage, ignore_errors=True)  # a replacement that never finished
    if done:
        os.makedirs(stage)
        return stage
    for name in RUN_FILES + ("summary.json",):  # nothing finished here: the files of an unfinished start
        remove(os.path.join(out, name))
    return out


def publish(out):
    """Move a finished run from out/STAGE over out's own files, summary.json last. Idempotent: a kill
    midway leaves the stage's summary.json, and the next start in `out` finishes the move."""
    stage = os.path.join(out, STAGE)
    if not os.path.exists(os.path.join(stage, "summary.json")):
        return
    plan = os.path.join(stage, "publish.json")  # the files the new run has, listed before any is moved
    if not os.path.exists(plan):
        common.atomic_json(plan, [n for n in RUN_FILES if os.path.exists(os.path.join(stage, n))])
    new = common.read_json(plan)
    remove(os.path.join(out, "summary.json"))  # the old run is no longer the finished one
    for name in RUN_FILES:
        src, dst = os.path.join(stage, name), os.path.join(out, name)
        if os.path.exists(src) or name not in new:  # a listed file missing from the stage moved before a kill
            remove(dst)
        if os.path.exists(src):
            os.replace(src, dst)
    os.replace(os.path.join(stage, "summary.json"), os.path.join(out, "summary.json"))
    shutil.rmtree(stage)


def remove(path):
    """Remove a file or a directory, if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


# -----------------------------------------------------------------------------
# sharing between the runs of a matrix

@dataclass
class Shared:
    """What the runs of a matrix share, none of it changing their numbers: each dict maps what made a thing
    (a model path, device, dtype, ...) to it, made by the first run that needs it. A single run has its own."""
    memo_train_rows: bool = False  # training rows go through the teacher memo too (every run reads them)
    teachers: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)
    memos: dict = field(default_factory=dict)  # TeacherMemo per (teacher, device, dtype)
    before: dict = field(default_factory=dict)  # the untrained student's held-out numbers


def share(made, key, make):
    """made[key], made by make() the first time."""
    if key not in made:
        made[key] = make()
    return made[key]


class TeacherMemo:
    """The teacher's final hidden states (T, d_t) per token row, kept in RAM up to max_gb.

    Rows are computed one at a time, so a row's states never depend on which rows shared its batch: a
    resumed or reordered matrix gives the same numbers as an uninterrupted one. Beyond max_gb rows are
    recomputed (and `full` is set, so a prefill can stop)."""

    def __init__(self, max_gb):
        self.rows, self.bytes, self.full, self.max_bytes = {}, 0, False, max_gb * 2 ** 30

    def states(self, trunk, x):
        """trunk: (1, T) -> (1, T, d_t); x (b, T) -> (b, T, d_t) on CPU."""
        out = []
        for row in x:
            key = row.cpu().numpy().tobytes()
            h = self.rows.get(key)
            if h is None:
                h = trunk(row[None])[0].to("cpu")
                nbytes = h.numel() * h.element_size()
                self.full = self.bytes + nbytes > self.max_bytes
                if not self.full:
                    self.rows[key], self.bytes = h, self.bytes + nbytes
            out.append(h)
        return torch.stack(out)

    def fill(self, packs, states, batch_size):
        """Run states(rows) over every row of each data.Packed in turn, until full; returns the seconds."""
        t0 = time.time()
        for packed in packs:
            for i in range(0, len(packed), batch_size):
                if not self.full:
                    states(packed.input_ids[i:i + batch_size])
        return time.time() - t0


# -----------------------------------------------------------------------------
# the matrix

def copy_same_run(root, out, name, key):
    """A finished run under `root` with the same config_key is copied to `out` (renamed), not rerun."""
    for cfg_path in sorted(glob.glob(os.path.join(root, "*", "seed*", "config.json"))):
        src = os.path.dirname(cfg_path)
        if os.path.abspath(src) == os.path.abspath(out) or run_state(src) != "done":
            continue
        cfg = read_config(src)
        if cfg.get("config_key") != key:
            continue
        print(f"[matrix] {name}: same config as {src}, copying its results")
        with open(os.path.join(src, "summary.json")) as f:
            summary = dict(json.load(f), run_name=name, same_as=src)
        stage = os.path.join(out, STAGE)  # staged, then published: a stale run in `out` stays until then
        shutil.rmtree(stage, ignore_errors=True)
        for f in RUN_FILES:  # its records and the suite's files: not its config (rewritten below), model or ckpt
            if f in ("config.json", "ckpt.pt", "model"):
                continue
            if os.path.isdir(os.path.join(src, f)):  # the suite's per-example rows
                shutil.copytree(os.path.join(src, f), os.path.join(stage, f))
            elif os.path.isfile(os.path.join(src, f)):
                with open(os.path.join(src, f)) as fh:
                    common.atomic_write(os.path.join(stage, f), fh.read())
        common.atomic_json(os.path.join(stage, "config.json"), dict(cfg, run_name=name, out_dir=out, same_as=src))
        common.atomic_json(os.path.join(stage, "summary.json"), summary)  # last: marks the run done
        publish(out)
        return True
    return False


def matrix_runs(args):
    """[(name, seed, out_dir, finalized args)] of the matrix, in order. args: the parsed flags before
    finalize (config.parse_args(argv, raw=True)), so each run derives its own defaults (e.g. the
    selective head is on when the run's k < 1)."""
    runs = []
    for name, overrides in MATRICES[args.matrix]:
        for seed in [int(s) for s in seeds_of(args).split(",")]:
            raw = copy.copy(args)
            for key, val in overrides.items():
                setattr(raw, key, val)
            out = os.path.join(args.out_dir, name, f"seed{seed}")
            raw.seed, raw.out_dir, raw.run_name, raw.matrix = seed, out, name, None
            raw.resume, raw.fresh = True, False  # a killed run resumes; --fresh is handled above, per dir
            try:
                runs.append((name, seed, out, config.finalize(raw)))
            except ValueError as e:
                raise common.UserError(f"--matrix {args.matrix}, run {name}: {e}") from None
    return runs


GSM8K_SEEDS = "1340,1341,1342"  # the paper's seeds for its GSM8K runs (Appendix B); 1337-1339 elsewhere


def seeds_of(args):
    """--seeds, else the preset's (under --preset paper, table 5's GSM8K runs use GSM8K_SEEDS)."""
    if args.seeds:
        return args.seeds
    if args.preset == "paper" and args.matrix == "table5":
        return GSM8K_SEEDS
    return config.PRESETS[args.preset]["seeds"]


def run_matrix(args, run_one, compare=True):
    """Run every (config, seed) of args.matrix with run_one(args, shared); skip, copy or refuse as above."""
    runs = matrix_runs(args)
    stale = []
    for name, seed, out, a in runs:  # refuse before training anything: a stale dir is a typo or old flags
        if run_state(out) != "empty" and read_config(out).get("config_key") not in (None, config_key(a)):
            stale.append(f"{out}: {differing_flags(read_config(out), a)}")
    if stale and not args.fresh:
        raise common.UserError(f"--out-dir {args.out_dir} holds runs of other flags ({stale[0]}"
                               f"{f'; and {len(stale) - 1} more' if len(stale) > 1 else ''}): "
                               "use a new --out-dir, or --fresh to rerun them")
    shared = Shared(memo_train_rows=True)  # every run of the matrix reads the same training rows
    for name, seed, out, a in runs:
        if run_state(out) == "done" and read_config(out).get("config_key") == config_key(a):
            print(f"[matrix] {name} seed {seed}: done, skipping")
            continue
        if args.fresh and run_state(out) != "empty":  # replaced once the new run has finished, not before
            a = copy.copy(a)
            a.resume, a.fresh = False, True
        if copy_same_run(args.out_dir, out, name, config_key(a)):
            continue
        print(f"[matrix] {name} seed {seed} -> {out}", flush=True)
        run_one(a, shared)
    if compare:
        import report
        dirs = [out for _, _, out, _ in runs]
        report.main(["--compare", *dirs, "--compare-out", os.path.join(args.out_dir, f"{args.matrix}.md")])


# -----------------------------------------------------------------------------
# the sandbox study: the paper's tables on sandbox.py's pair, one matrix after another through train.py

SANDBOX_STUDY = ("table2", "table3", "table4", "budget")
HERE = os.path.dirname(os.path.abspath(__file__))


def sandbox_study(out_dir="out/sandbox", matrices=SANDBOX_STUDY, seeds=None, log=print):
    """Run each matrix with `train.py --preset sandbox --matrix M` into one out-dir (so a config shared by
    two tables, e.g. Full KD and k = 1.0, runs once and is copied), then one table per matrix with
    per-seed paired differences to Full KD (report.py). Rerunning resumes: finished runs are skipped."""
    import report
    for m in matrices:
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--preset", "sandbox", "--matrix", m,
               "--out-dir", out_dir, "--no-save-model"] + (["--seeds", seeds] if seeds else [])
        log("$ " + " ".join(cmd[1:]))
        res = subprocess.run(cmd, cwd=HERE)
        if res.returncode != 0:
            raise common.UserError(f"train.py --matrix {m} failed (exit {res.returncode}); see above")
    base = sorted(glob.glob(os.path.join(out_dir, "full_kd", "seed*")))
    for m in matrices:
        names = [name for name, _ in MATRICES[m]]
        dirs = base + [d for name in names if name != "full_kd"
                       for d in sorted(glob.glob(os.path.join(out_dir, name, "seed*")))]
        report.main(["--compare", *dirs, "--compare-baseline", "full_kd",
                     "--compare-out", os.path.join(out_dir, f"{m}_vs_full_kd.md")])


def main(argv=None):
    ap = common.ArgumentParser(prog="study.py", description="Tables 2-4 and the budget sweeps on the sandbox "
                               "pair (build it first: python sandbox.py); resumable: finished runs are skipped.")
    ap.add_argument("--out-dir", default="out/sandbox", help="where the runs and tables go")
    ap.add_argument("--matrices", default=",".join(SANDBOX_STUDY), help="which matrices, comma-separated")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the sandbox preset's 0-4)")
    args = ap.parse_args(argv)
    matrices = args.matrices.split(",")
    unknown = [m for m in matrices if m not in MATRICES]
    if unknown:
        ap.error(f"--matrices: no matrix {', '.join(unknown)} (there are {', '.join(MATRICES)})")
    common.run_cli(lambda: sandbox_study(args.out_dir, matrices, args.seeds), "study.py")


if __name__ == "__main__":
    main()
