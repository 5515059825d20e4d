"""Helpers shared by the bench scripts: the machine line and atomic JSON output."""
import os
import platform

import torch

import common
import system


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


def matmul_peak(dtype=torch.float32, n=2048, reps=5, device="cpu", max_rep_s=2.0):
    """The machine's matmul throughput: (GFLOP/s, n) of an n x n x n GEMM (2 n^3 FLOPs) in `dtype`,
    best of `reps` after a warm-up (system.gemm_seconds). n shrinks (halving, down to 512) while one
    GEMM would take more than max_rep_s, so a dtype without fast kernels here (bf16 on a CPU without
    AVX512-BF16/AMX) costs seconds, not minutes. (None, n) where the dtype's GEMM does not run on `device`."""
    m = 512  # the probe; a 256 probe mis-predicts under load (small GEMMs are slower per FLOP)
    try:
        t = system.gemm_seconds(m, dtype, reps=1, device=device)
    except RuntimeError:
        return None, n
    while n > m and t * (n / m) ** 3 > max_rep_s:
        n //= 2
    return 2 * n ** 3 / system.gemm_seconds(n, dtype, reps, device) / 1e9, n


def median_minmax(xs):
    """(median, min, max) of a list of numbers."""
    import statistics
    return statistics.median(xs), min(xs), max(xs)
