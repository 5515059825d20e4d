"""Benchmark: the offline RS-KD teacher cache (paper Tables 6 and 7).

RS-KD replaces the teacher distribution p_t at position t by U = 64 classes drawn from p_t (kept as
unique ids with counts, p~_t(c) = n_c / U), so a cache stores ~(kept classes x bytes_per_class(V))
bytes per position instead of 2V bytes of fp16 logits. This script builds a real cache with cache.py
on the offline default data (SmolLM2-135M teacher over the stdlib corpus of data.py) and reports:

    storage      measured bytes/position (data + index, and on disk incl. JSON) vs the format's theory
                 (bytes_per_class x measured mean kept classes + 1 index byte + 16 B/sequence; upper
                 bound U x bytes_per_class) and vs fp16 full logits (2V bytes), as a ratio
    build        positions/s of cache.build (teacher forward + sampling + packing + writing), and
                 without the teacher forward (the part the cache format itself costs)
    read         positions/s of TeacherCache.get on random batches (after open_cache with sha256)
    training     positions/s the student consumes in the SE-KD_3X step of train.py (student trunk ->
                 chunked student-entropy scores -> top 20% -> head_loss with the cached SparseTeacher
                 -> backward -> AdamW); target: read >= 20x faster than training consumes
    Table 6      cache.estimate_storage for 100B tokens (V = 100k as in the paper, and V = 151,936),
                 plus the measured bytes/position extrapolated to 100B tokens

    python bench/cache.py --quick          # ~2 min on 2 CPU cores
    python bench/cache.py --out bench/cache.json

Prints a markdown table, then `RATIO <name> <ours>/<baseline> = <value>` lines.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before bench/: `import cache` must be the project's cache.py, not this file

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cache  # noqa: E402
import data  # noqa: E402
import fused_head  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import selection  # noqa: E402

if os.path.abspath(cache.__file__) == os.path.abspath(__file__):
    raise ImportError("bench/cache.py shadowed the project's cache.py; run it as python bench/cache.py")

READ_TARGET = 20.0  # reading must be >= 20x faster than training consumes positions
LAYERS = "0,4,8,12,16,20,24,29"  # the tiny preset's student


from benchutil import machine  # noqa: E402
from common import atomic_json  # noqa: E402



def train_throughput(student, tc, packed, V, B, steps, k, chunk, device):
    """Positions/s of the SE-KD_3X training step (train.py's flow with a cache): median over steps."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    Ws = models.head_weight(student, V)
    times = []
    g = torch.Generator().manual_seed(0)
    for s in range(steps + 1):  # the first step is a warm-up
        idx = torch.randperm(len(packed), generator=g)[:B]
        x, y, valid = (packed.input_ids[idx].to(device), packed.targets[idx].to(device),
                       packed.valid[idx].to(device))
        t0 = time.perf_counter()
        ids, probs = tc.get(packed.sample_ids[idx])  # part of the step, as in train.py
        hs = models.trunk(student, x)  # (B, T, d)
        scores = selection.chunked_scores("student_entropy", hs.detach(), Ws.detach(), y, chunk_size=chunk)
        w = selection.POLICIES["top_k"](scores, valid, k)
        sel = w > 0
        rw = losses.normalise_by_samples(w)[sel]  # Eq. 4: per-sequence normalisation
        teacher = losses.SparseTeacher(ids.to(device)[sel], probs.to(device)[sel])
        loss = fused_head.head_loss(hs[sel], Ws, y[sel], rw, teacher, chunk_size=chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s:
            times.append(time.perf_counter() - t0)
    return B * packed.input_ids.shape[1] / statistics.median(times), times


def read_throughput(tc, sample_ids, B, iters, seed=0):
    """Positions/s of TeacherCache.get on random batches of B sequences (median over iters)."""
    rng = np.random.default_rng(seed)
    sids = sample_ids.numpy()
    tc.get(torch.from_numpy(sids[:B]))  # first touch of the memmaps
    times = []
    for _ in range(iters):
        b = rng.choice(sids, size=min(B, len(sids)), replace=False)
        t0 = time.perf_counter()
        ids, probs = tc.get(torch.from_numpy(b))
        times.append(time.perf_counter() - t0)
    T = ids.shape[1]
    return len(b) * T / statistics.median(times), times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sequences and steps (CPU: ~2 min)")
    p.add_argument("--seqs", type=int, help="sequences to cache (default 16 quick / 64)")
    p.add_argument("--seq-len", type=int, default=256, help="T (the published runs used 256)")
    p.add_argument("--u", type=int, default=64, help="RS-KD classes drawn per position (paper: 64)")
    p.add_argument("--batch-size", type=int, default=4, help="B of the training step and of reads")
    p.add_argument("--train-steps", type=int, help="timed training steps (default 2 quick / 5)")
    p.add_argument("--read-iters", type=int, default=50, help="timed TeacherCache.get calls")
    p.add_argument("--k", type=float, default=0.2, help="position fraction of the SE-KD_3X step")
    p.add_argument("--chunk", type=int, default=1024, help="train.py --entropy-chunk")
    p.add_argument("--cache-dir", help="where to build (default: a temp dir, removed at the end)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="save the numbers to this JSON file (atomic)")
    a = p.parse_args(argv)
    selection.check_fraction(a.k, "k")
    n_seqs = a.seqs or (16 if a.quick else 64)
    steps = a.train_steps or (2 if a.quick else 5)
    for name, v in (("--seqs", n_seqs), ("--seq-len", a.seq_len), ("--u", a.u), ("--batch-size", a.batch_size),
                    ("--train-steps", steps), ("--read-iters", a.read_iters), ("--chunk", a.chunk)):
        if v < 1:
            p.error(f"{name} must be >= 1, got {v}")
    mach = machine()
    print(f"machine: {mach['cpu_count']} CPUs ({mach['cpu']}), torch {mach['torch']}, threads {mach['threads']}, "
          f"device {a.device}{' (' + mach['gpu'] + ')' if mach['gpu'] else ''}", flush=True)

    t0 = time.time()
    dtype = torch.bfloat16 if torch.device(a.device).type == "cuda" else torch.float32
    teacher, tok = models.load_model(models.DEFAULT_TEACHER, a.device, dtype)
    teacher.requires_grad_(False)
    V = len(tok)
    keep = models.parse_layers(LAYERS, teacher.config.num_hidden_layers)
    student = models.student_from_teacher(teacher, keep).to(a.device).train().requires_grad_(True)
    tok_fp = models.tokenizer_fingerprint(tok)
    sp = data.load_splits(tok, None, seq_len=a.seq_len, tokens=n_seqs * a.seq_len, eval_tokens=a.seq_len,
                          seed=0, tokenizer_fp=tok_fp)
    train = sp["train"]
    N, T = train.input_ids.shape
    print(f"teacher {models.DEFAULT_TEACHER} (V={V}), {N} sequences x {T} tokens; load {time.time() - t0:.0f}s",
          flush=True)

    t_teacher = [0.0]

    def teacher_fn(x):  # (b, T) -> (b, T, V) on the teacher's device: cache.build samples there
        t = time.perf_counter()
        with torch.no_grad():
            z = models.trunk(teacher, x.to(a.device)) @ models.head_weight(teacher, V).T
        if z.is_cuda:
            torch.cuda.synchronize()  # time the forward, not just its launch
        t_teacher[0] += time.perf_counter() - t
        return z

    own_dir = a.cache_dir is None
    root = tempfile.mkdtemp(prefix="sekd_cache_bench_") if own_dir else a.cache_dir
    d = os.path.join(root, f"train-{train.fingerprint}")
    if os.path.exists(os.path.join(d, cache.HEADER)):
        raise SystemExit(f"--cache-dir {root}: {d} already holds a cache; give an empty directory to time a build")
    meta = dict(teacher=models.DEFAULT_TEACHER, vocab_size=V, seq_len=T, tokenizer_fingerprint=tok_fp,
                data_fingerprint=train.fingerprint, dtype=str(dtype))
    try:
        t0 = time.perf_counter()
        cache.build(d, teacher_fn, train.input_ids, train.sample_ids, meta, U=a.u, temperature=1.0,
                    batch_size=a.batch_size, seed=0, progress=False)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        tc = cache.open_cache(d, dict(meta, U=a.u, temperature=1.0), verify="full")
        t_open = time.perf_counter() - t0
        h = tc.header
        tot = h["totals"]
        pos = tot["positions"]
        disk = tc.bytes_on_disk
        nb = h["bytes_per_class"]
        mean_kept = tot["kept_classes"] / pos
        count_b = np.dtype(h["kept_dtype"]).itemsize
        theory = nb * mean_kept + count_b + 16.0 / T  # data + kept-classes byte a position + 2 int64 a sequence
        measured = (tot["data_bytes"] + tot["index_bytes"]) / pos
        fp16 = 2.0 * V
        build_pps = pos / t_build
        build_pps_no_teacher = pos / max(t_build - t_teacher[0], 1e-9)
        read_pps, read_times = read_throughput(tc, train.sample_ids, a.batch_size, a.read_iters)
        train_pps, train_times = train_throughput(student, tc, train, V, min(a.batch_size, N), steps, a.k,
                                                  a.chunk, a.device)
    finally:
        if own_dir:
            import shutil
            shutil.rmtree(root, ignore_errors=True)

    est = {f"V={v}": cache.estimate_storage(100e9, v, a.u, 0.2) for v in (100_000, 151_936)}
    res = dict(machine=mach, argv=sys.argv, quick=a.quick, V=V, N=N, T=T, U=a.u, positions=pos,
               bytes_per_class=nb, id_bits=h["id_bits"], count_bits=h["count_bits"], mean_kept=mean_kept,
               bytes_per_position_measured=measured, bytes_per_position_on_disk=disk / pos,
               bytes_per_position_theory=theory, bytes_per_position_upper_bound=float(a.u * nb),
               bytes_per_position_fp16_logits=fp16, index_fraction=tot["index_fraction"],
               build_s=t_build, teacher_forward_s=t_teacher[0], open_verify_s=t_open,
               build_positions_per_s=build_pps, build_positions_per_s_without_teacher=build_pps_no_teacher,
               read_positions_per_s=read_pps, read_times=read_times, train_positions_per_s=train_pps,
               train_times=train_times, table6_100B=est,
               measured_100B_tb=measured * 100e9 / 1e12)

    print(f"\n### RS-KD cache: {N} x {T} positions of the offline default data, V={V}, U={a.u}, "
          f"{nb} bytes/class ({h['id_bits']} id + {h['count_bits']} count bits, lossless)\n")
    print("| quantity | value |")
    print("|---|---:|")
    rows = [
        ("mean kept classes / position", f"{mean_kept:.2f} of U={a.u}"),
        ("bytes/position measured (data + index)", f"{measured:.2f}"),
        ("bytes/position on disk (incl. JSON)", f"{disk / pos:.2f}"),
        ("bytes/position theory (bytes/class x kept + 1 index byte + 16/T)", f"{theory:.2f}"),
        ("bytes/position upper bound (U x bytes/class)", f"{a.u * nb:.0f}"),
        ("bytes/position fp16 full logits (2V)", f"{fp16:,.0f}"),
        ("index share of data", f"{tot['index_fraction']:.1%}"),
        ("build time (teacher forward)", f"{t_build:.1f} s ({t_teacher[0]:.1f} s)"),
        ("build throughput", f"{build_pps:,.0f} positions/s"),
        ("build throughput without the teacher forward", f"{build_pps_no_teacher:,.0f} positions/s"),
        ("open_cache + sha256 of every file", f"{t_open:.3f} s"),
        (f"read throughput (get, B={a.batch_size}, median of {a.read_iters})", f"{read_pps:,.0f} positions/s"),
        (f"training throughput (SE-KD_3X step, B={min(a.batch_size, N)}, median of {steps})",
         f"{train_pps:,.0f} positions/s"),
        ("measured bytes/position x 100B tokens (RS-KD, every sample)", f"{measured * 100e9 / 1e12:,.2f} TB"),
        ("... x l = 0.2 (SE-KD_3X caches the top 20% of samples)", f"{0.2 * measured * 100e9 / 1e12:,.2f} TB"),
    ]
    for k_, v in rows:
        print(f"| {k_} | {v} |")
    print(f"\n### Table 6 estimate: 100B tokens, U={a.u}, l=0.2 (cache.estimate_storage)\n")
    print("| method | " + " | ".join(f"{v} bytes/pos | {v} TB" for v in est) + " |")
    print("|---|" + "---:|---:|" * len(est))
    for m in est["V=100000"]:
        print(f"| {m} | " + " | ".join(f"{e[m]['bytes_per_position']:,.1f} | {e[m]['tb']:,.2f}" for e in est.values())
              + " |")
    ratio_read = read_pps / train_pps
    print(f"\n### targets\n\n- read >= {READ_TARGET:.0f}x training consumption: {ratio_read:,.1f}x -> "
          f"{'met' if ratio_read >= READ_TARGET else 'NOT met'}")
    print(f"- measured bytes/position within the format's theory: {measured / theory:.3f} of theory\n")
    ratios = [("bytes_per_position", "measured/theory", measured / theory),
              ("bytes_per_position", "measured/fp16_logits", measured / fp16),
              ("bytes_per_position", "on_disk/fp16_logits", disk / pos / fp16),
              ("bytes_per_position", "measured/upper_bound_U_x_bytes", measured / (a.u * nb)),
              ("throughput", "read/train", ratio_read),
              ("throughput", "build/train", build_pps / train_pps)]
    for name, which, v in ratios:
        print(f"RATIO {name} {which} = {v:.4g}")
    res["ratios"] = {f"{n} {w}": v for n, w, v in ratios}
    if a.out:
        atomic_json(a.out, res, indent=1)
    return res


if __name__ == "__main__":
    main()
