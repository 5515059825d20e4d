"""Helpers shared by the bench scripts: the machine line and atomic JSON output."""
import json
import os
import platform

import torch

import common


def write_json(path, obj):
    common.atomic_json(path, obj, indent=1)  # the project's one atomic writer


def machine():
    """CPU model, core count, torch version and GPU (if any): printed at the top of every bench."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu_count=os.cpu_count(), cpu=cpu, torch=torch.__version__, python=platform.python_version(),
                gpu=gpu, threads=torch.get_num_threads())


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype=torch.float32, n=2048, reps=5, device="cpu"):
    """The machine's matmul throughput: GFLOP/s of an n x n x n GEMM (2 n^3 FLOPs), best of `reps`
    after one warm-up, in `dtype`. Returns None where the dtype's GEMM does not run on `device`."""
    import time
    g = torch.Generator(device=device).manual_seed(0)
    try:
        a = torch.randn(n, n, generator=g, device=device).to(dtype)
        b = torch.randn(n, n, generator=g, device=device).to(dtype)
        a @ b
    except RuntimeError:
        return None
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def median_minmax(xs):
    """(median, min, max) of a list of numbers."""
    import statistics
    return statistics.median(xs), min(xs), max(xs)
