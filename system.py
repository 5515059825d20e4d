"""System: which devices a run uses, which precision it computes in, and the memory it reports and keeps.

  - devices: pick_devices / run_devices map --teacher-device / --student-device (or torchrun's ranks)
    to torch devices, refusing ones this machine lacks with a one-line common.UserError;
  - precision: gemm_seconds is the one GEMM timer; --dtype auto (auto_bf16) reads it to choose bf16
    only where it is faster;
  - memory: peak_memory / reset_peak_memory give each run its own peak (CUDA stats or the RSS high-water
    mark), and keep_freed_memory / trim_freed_memory tune glibc's allocator for large logits chunks.
Nothing here knows about models or distillation.
"""
import ctypes
import functools
import os
import resource
import time

import torch

from common import UserError


# -----------------------------------------------------------------------------
# devices

def pick_devices(teacher_device=None, student_device=None):
    """Two GPUs: teacher cuda:0, student cuda:1 (the paper's layout); one GPU: both on it; none: CPU.

    A device this machine does not have (cuda on CPU-only torch, cuda:3 with two GPUs, a typo) is a
    common.UserError naming --teacher-device / --student-device."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    default_t = "cuda:0" if n >= 1 else "cpu"
    default_s = "cuda:1" if n >= 2 else default_t
    for flag, d in (("--teacher-device", teacher_device), ("--student-device", student_device)):
        if d is None:
            continue
        try:
            dev = torch.device(d)
        except (RuntimeError, ValueError):
            raise UserError(f"{flag} {d!r}: not a device (use cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and n == 0:
            raise UserError(f"{flag} {d}: this torch sees no CUDA GPU (CPU-only build or no driver); use cpu")
        if dev.type == "cuda" and (dev.index or 0) >= n:
            raise UserError(f"{flag} {d}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"{flag} {d}: unsupported device type (use cpu or cuda:N)")
    return teacher_device or default_t, student_device or default_s


def run_devices(teacher_device=None, student_device=None):
    """(ddp, rank, world, teacher device, student device) of this process.

    One process: pick_devices (teacher cuda:0, student cuda:1 with two GPUs). Under torchrun (WORLD_SIZE >
    1) the student trains data parallel: every rank holds a teacher and a student on cuda:LOCAL_RANK (cpu
    without GPUs; gloo then, NCCL on GPUs), and the device flags are refused."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return (False, 0, 1) + pick_devices(teacher_device, student_device)
    if teacher_device or student_device:
        raise UserError("--teacher-device/--student-device: under torchrun each rank puts both models on "
                        "cuda:LOCAL_RANK (cpu without GPUs); drop the flags")
    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True, int(os.environ["RANK"]), world, dev, dev


def _is_cuda(device):
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


# -----------------------------------------------------------------------------
# precision

CPU_DTYPE_ENV = "NANO_SEKD_CPU_DTYPE"  # fp32 | bf16: fixes --dtype auto on a CPU (the tests pin fp32)


def gemm_seconds(n, dtype=torch.float32, reps=3, device="cpu"):
    """Seconds of one n x n x n GEMM in `dtype` on `device`: the best of `reps` after a warm-up. The one
    GEMM timer: --dtype auto (bf16_gemm_speedup) and the bench scripts' machine peak both read it.
    Raises RuntimeError where that dtype's GEMM does not run on the device."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if _is_cuda(device) else (lambda: None)
    a @ b  # warm-up: kernel choice, first-touch pages
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def bf16_gemm_speedup(n=512, reps=3):
    """fp32 time / bf16 time of an n x n x n GEMM on this CPU (gemm_seconds), measured once per process:
    well above 1 where the CPU has bf16 matrix units (AMX), far below 1 where bf16 is emulated."""
    return gemm_seconds(n, torch.float32, reps) / gemm_seconds(n, torch.bfloat16, reps)


def auto_bf16(device):
    """(use bf16?, why) for --dtype auto: bf16 on a GPU; on a CPU only where its bf16 GEMM is clearly
    faster than fp32 (>= 1.5x, bf16_gemm_speedup), since bf16 autocast there only pays off with bf16
    matrix units. $NANO_SEKD_CPU_DTYPE (fp32 or bf16) overrides the measurement."""
    if torch.device(device).type == "cuda":
        return True, "a GPU"
    fixed = os.environ.get(CPU_DTYPE_ENV)
    if fixed:
        if fixed not in ("fp32", "bf16"):
            raise UserError(f"${CPU_DTYPE_ENV}={fixed!r}: use fp32 or bf16")
        return fixed == "bf16", f"${CPU_DTYPE_ENV}={fixed}"
    x = bf16_gemm_speedup()
    return x >= 1.5, f"this CPU's bf16 GEMM runs {x:.2g}x as fast as fp32"


# -----------------------------------------------------------------------------
# peak memory

def peak_memory(device):
    """Peak bytes: CUDA max allocated on a GPU, the process's peak RSS on CPU (what Table 16 compares).

    On Linux the RSS peak is /proc/self/status VmHWM, which reset_peak_memory() can lower again, so
    each run of an in-process --matrix reports its own peak; elsewhere the process's lifetime max.
    A cuda device without CUDA (CPU-only torch) reads the RSS peak: this never raises.
    """
    if _is_cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak_memory(device):
    """Start a new peak: CUDA peak stats, or the RSS high-water mark (writing 5 to /proc/self/clear_refs).
    Never raises (a cuda device on CPU-only torch resets the RSS mark)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_memory then reports the process's lifetime peak


# -----------------------------------------------------------------------------
# the CPU allocator: large logits chunks reuse the pages of the last one

def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not Linux/glibc (macOS, musl): nothing to tune
        return None


def keep_freed_memory():
    """Keep freed heap memory in the process (CPU speed); True if it took effect (Linux glibc only).

    glibc serves every block above its mmap threshold (32 MB at most; one (1024, V) fp32 logits chunk at
    Qwen's V = 151,936 is 622 MB) with a fresh mmap and unmaps it on free, so the next chunk faults every
    page back in, zero-filled by the kernel: at a large vocabulary that kernel time can be most of a KD
    step on a small CPU (bench/selective_head.py --malloc both measures it). With mmap off and trimming
    off, each chunk reuses the last one's pages once the heap has settled. The cost is memory: aligned
    blocks among small ones leave gaps, so the heap holds several big blocks more than are live (peak
    RSS can double). Hence opt-in (train.py --keep-freed-memory). Process-wide; trim_freed_memory()
    hands the kept pages back (train.py does before each run's peak is reset).
    """
    libc = _glibc()
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(libc and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def trim_freed_memory():
    """Return the heap's free pages to the OS (glibc malloc_trim), so RSS is live memory again."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def start_run_memory(devices, keep_freed=False):
    """Each run of a matrix reports its own peak: free pages an earlier run kept are returned and the peak
    counters reset; keep_freed (CPU): freed (c, V) logits chunks reuse pages instead of faulting them in."""
    if keep_freed and any(torch.device(d).type == "cpu" for d in devices):
        keep_freed_memory()
    trim_freed_memory()
    for dev in set(devices):
        reset_peak_memory(dev)
