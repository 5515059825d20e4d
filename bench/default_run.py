"""How close a finished train.py run came to this machine's limit: tokens/s and achieved GFLOP/s as a
fraction of the machine's measured matmul peak.

    python train.py --pos-metric student_entropy --k 0.2      # the README's default run -> out/run
    python bench/default_run.py --run out/run

FLOPs per trained token (matmuls only, 2 per multiply-add; selective_head.flops_per_token gives a
decoder's trunk and LM-head forward FLOPs per token at the run's T), with f = the fraction of positions
supervised (summary.json sup_frac_positions):
    teacher   trunk forward + LM head at the supervised rows only (f x head)
    student   trunk forward + backward (3 x trunk) + the chunked scoring pass over every row (1 x head,
              when the policy scores positions) + the selective head's forward, dh and dW (3 x f x head)
Attention is counted at the run's T; norms, softmax, the KL and AdamW are not. Time = summary.json's
train_s (the training loop, without loading and held-out evaluation). Peak = the best n^3 GEMM of this
process (fp32 and bf16), measured here: run it on the machine that trained, with nothing else running.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the root first: `import cache` is cache.py, not bench/cache.py

import torch  # noqa: E402

import common  # noqa: E402
import models  # noqa: E402
import selection  # noqa: E402
from benchutil import machine, matmul_peak  # noqa: E402
from selective_head import flops_per_token  # noqa: E402


def run_flops(cfg, summ):
    """(FLOPs per trained token, their split) of a finished run (config.json, summary.json)."""
    T, f = cfg["seq_len"], summ["sup_frac_positions"]
    tcfg = models.load_config(cfg["teacher"])
    if cfg.get("student"):
        scfg = models.load_config(cfg["student"])
    else:  # the teacher's layers kept (train.py's default)
        scfg = models.load_config(cfg["teacher"])
        scfg.num_hidden_layers = len(cfg["student_layers_kept"])
    t_trunk, t_head = flops_per_token(tcfg, T)
    s_trunk, s_head = flops_per_token(scfg, T)
    scores = selection.needs_scores(cfg["policy"], cfg["k"]) and cfg["pos_metric"] != "random"
    split = dict(teacher_trunk=t_trunk, teacher_head=f * t_head, student_trunk_fwd_bwd=3 * s_trunk,
                 scoring=s_head if scores else 0.0, student_head_fwd_bwd=3 * f * s_head)
    return sum(split.values()), split


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="out/run", help="a finished train.py out-dir (config.json, summary.json)")
    a = p.parse_args(argv)
    try:
        cfg = common.read_json(os.path.join(a.run, "config.json"))
        summ = common.read_json(os.path.join(a.run, "summary.json"))
    except common.UserError as e:
        sys.exit(f"--run {a.run}: not a finished train.py run ({e})")
    per_tok, split = run_flops(cfg, summ)
    tokens, train_s = summ["tokens_seen"], summ["wall_time_split"]["train_s"]
    tok_s = tokens / train_s
    achieved = per_tok * tok_s / 1e9
    peak = {k: matmul_peak(dt)[0] for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = max(v for v in peak.values() if v)
    mach = machine()
    print(f"machine: {mach['cpu_count']} CPUs ({mach['cpu']}), torch {mach['torch']}, threads {mach['threads']}")
    print(f"run {a.run}: {cfg['teacher']} -> {cfg.get('student') or 'layers ' + cfg['student_layers']}, "
          f"T={cfg['seq_len']}, k={cfg['k']} ({cfg['pos_metric']}), precision {cfg.get('precision', '?')}")
    print(f"trained {tokens} tokens in {train_s:.1f} s: {tok_s:.1f} tokens/s")
    print("matmul FLOPs per token: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in split.items())
          + f" = {per_tok / 1e6:.1f}M")
    print(f"achieved {achieved:.1f} GFLOP/s; matmul peak fp32 {peak['fp32']:.1f}, bf16 "
          + (f"{peak['bf16']:.1f}" if peak["bf16"] else "n/a") + " GFLOP/s")
    print(f"RATIO achieved/fp32_peak = {achieved / peak['fp32']:.3f}")
    print(f"RATIO achieved/machine_peak = {achieved / best:.3f}")


if __name__ == "__main__":
    main()
