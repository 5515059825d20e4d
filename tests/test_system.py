"""System code: device choice, --dtype auto's bf16 test, peak memory per run and the CPU allocator."""
import os
import subprocess
import sys

import pytest
import torch

import system
from common import UserError
from conftest import ROOT


def test_peak_memory_can_be_reset_per_run():
    # in a fresh process: the suite's earlier tests leave allocator state that would blur the numbers
    code = """
import torch, system
system.reset_peak_memory("cpu")
start = system.peak_memory("cpu")
big = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
high = system.peak_memory("cpu")
del big
system.reset_peak_memory("cpu")
print(start, high, system.peak_memory("cpu"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    start, high, after = map(int, out.stdout.split())
    assert high >= start + 48 * 2 ** 20
    if os.path.exists("/proc/self/clear_refs"):  # Linux: the high-water mark falls back after the reset
        assert after < high - 32 * 2 ** 20


def test_dtype_auto_uses_bf16_only_where_it_is_faster(monkeypatch):
    monkeypatch.delenv(system.CPU_DTYPE_ENV, raising=False)
    x = system.bf16_gemm_speedup()  # the real measurement, cached per process
    assert x > 0 and system.auto_bf16("cpu")[0] == (x >= 1.5)
    for speedup, want in ((6.0, True), (1.2, False), (0.01, False)):
        monkeypatch.setattr(system, "bf16_gemm_speedup", lambda s=speedup: s)
        use, why = system.auto_bf16("cpu")
        assert use is want and f"{speedup:.2g}x" in why
        assert system.auto_bf16("cuda:0")[0] is True  # a GPU: always bf16
    monkeypatch.setenv(system.CPU_DTYPE_ENV, "bf16")
    assert system.auto_bf16("cpu") == (True, "$NANO_SEKD_CPU_DTYPE=bf16")
    monkeypatch.setenv(system.CPU_DTYPE_ENV, "fp16")
    with pytest.raises(UserError, match="NANO_SEKD_CPU_DTYPE"):
        system.auto_bf16("cpu")


@pytest.mark.skipif(system._glibc() is None, reason="glibc malloc only (Linux)")
@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_memory_reuses_pages(keep):
    # a fresh process each: mallopt is process-wide. A 128 MiB block (a logits chunk) allocated and freed
    # 20 times, as a training loop does: glibc's default unmaps it and faults every page back in each
    # time; kept, most rounds reuse pages already mapped (an aligned block can miss the last gap, so
    # some rounds still fault)
    code = f"""
import resource, torch, system
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
r0 = rss()
if {keep}:
    assert system.keep_freed_memory()
faults = []
for _ in range(20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(32 * 2 ** 20)  # 128 MiB
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    del x
system.trim_freed_memory()
print(*faults, rss() - r0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    *faults, kept = map(int, out.stdout.split())
    pages = 128 * 2 ** 20 // 4096  # 4 KiB pages (transparent huge pages: 512x fewer faults)
    reused = sum(f < pages // 100 for f in faults[1:])  # rounds where no page came back from the kernel
    if keep:
        assert reused >= 8, faults
        assert kept < 64 * 2 ** 20  # trim_freed_memory handed the kept pages back
    else:
        assert reused == 0 and min(faults) > pages // 1000, faults


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU-only torch")
def test_cuda_devices_on_cpu_only_torch_are_clear():
    with pytest.raises(UserError, match="^--teacher-device cuda:0: this torch sees no CUDA GPU"):
        system.pick_devices("cuda:0", None)
    with pytest.raises(UserError, match="^--student-device cuda:1: this torch sees no CUDA GPU"):
        system.pick_devices("cpu", "cuda:1")
    with pytest.raises(UserError, match="^--student-device 'gpu0': not a device"):
        system.pick_devices(None, "gpu0")
    assert system.pick_devices() == ("cpu", "cpu")
    system.reset_peak_memory("cuda:0")  # never raises: falls back to the process's RSS peak
    assert system.peak_memory("cuda:0") > 0


def test_keep_freed_memory_is_opt_in_and_run_only():
    import config
    import study
    plain, kept = config.parse_args(["--k", "0.2"]), config.parse_args(["--k", "0.2", "--keep-freed-memory"])
    assert not plain.keep_freed_memory and kept.keep_freed_memory
    assert study.config_key(plain) == study.config_key(kept)  # speed only: a study reuses the same runs


def test_one_gemm_timer_feeds_the_bench_peak(monkeypatch):
    """bench's machine peak reads system.gemm_seconds (no second timer): n^3 ns per GEMM is 2 GFLOP/s,
    and n halves from 2048 until one GEMM fits max_rep_s (512^3 ns x 4^3 = 8.6 s > 2 s, x 2^3 = 1.1 s)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import benchutil
    assert system.gemm_seconds(64, reps=2) > 0
    monkeypatch.setattr(system, "gemm_seconds", lambda n, dtype=None, reps=1, device="cpu": n ** 3 * 1e-9)
    gflops, n = benchutil.matmul_peak(n=2048, max_rep_s=2.0)
    assert n == 1024 and gflops == pytest.approx(2.0)
    monkeypatch.undo()
    assert benchutil.matmul_peak(torch.bool) == (None, 2048)  # no bool GEMM on this device
