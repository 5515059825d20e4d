"""Benchmark: memory and time of the selective LM head (paper Table 16).

One KD step = teacher forward + student step (forward, position scoring, selection, KL, backward,
AdamW update). The LM head turns hidden states h (B, T, d) into logits (B, T, V); with V = 151,936
(Qwen3) these (B, T, V) fp32 tensors and their softmax copies/gradients dominate the step. Selective
KD supervises only the positions with mask m_t = 1 (top k% by the student entropy H(q_t), Eq. 6), so
p_t (teacher) and q_t (student) are only needed at N = sum_t m_t rows: the selective LM head.

Variants (all at k = 20% except chunked_k100; all but chunked_k100 give the same loss):
    default        naive flow: teacher(x).logits and student(x).logits, both (B, T, V) fp32; dense
                   entropy H(q_t) over (B, T, V), top-k mask, dense KL over (B, T, V), masked mean
    chunked_k100   ours at k = 100% (Full KD): trunk, then fused_head.head_loss over every valid row
                   (logits chunk_size rows at a time, fused backward; no (B, T, V) tensor)
    k20_teacher    teacher head only at the selected rows (N, V); student still full (B, T, V)
    k20_student    student head only at the selected rows (chunked scoring, then h_s[m] @ W_s^T with
                   plain autograd); teacher still full (B, T, V)
    k20_plain      both sides at the selected rows, plain autograd (the (N, V) tensors of Table 16's
                   selective head, no chunking)
    k20_selective  ours, THE train.py step: trunk -> selection.chunked_scores -> top_k ->
                   fused_head.head_loss(h_s[m], W_s, y[m], w, DenseTeacher(h_t[m], W_t)) -> backward

Memory (bytes above a baseline taken after model creation, the optimizer state and a warm-up step):
    teacher peak   peak during the teacher forward (its activations + the target it hands over:
                   (B, T, V) logits for default/k20_student, hidden states (B, T, d_t) otherwise)
    student peak   peak during the student step, counting the teacher target it reads (it must sit
                   on the student's device for the KL) but not the teacher's forward temporaries
    GPU: torch.cuda.max_memory_allocated with a reset per phase. CPU: peak = VmHWM after resetting it
    (echo 5 > /proc/self/clear_refs) minus VmRSS before the phase, in a worker process whose glibc mmap
    threshold is fixed (freed tensors go straight back to the OS, so RSS follows live tensors); each
    variant gets its own fresh process (--isolate, the default) or, with --quick, one process measures
    all variants in turn after one warm-up step.
    The same pass counts live tensor storages through a TorchDispatchMode (every op output that is
    not a view of an input, until its storage is freed): `logits` = storages of tensors whose last
    dim is V; `share` = logits bytes / all tensor bytes at the tracked peak; `scoring logits` = the
    logits high-water mark until positions are selected, `head logits` = from there to the end of
    backward (the selective head's logit memory, compared with k x the default flow's).

Shapes:
    a  the offline default pair: SmolLM2-135M teacher (V = 49,152) and its 8-layer student
    b  random-init Qwen3 architecture with V = 151,936, d = 128 and an FFN width solved so that the LM
       head's share of forward FLOPs equals Qwen3-1.7B's (~18%); teacher = same shape, other seed
    c  the real Qwen3-1.7B (student) / Qwen3-8B (teacher) shapes, random init, bf16, GPU only

    python bench/selective_head.py --quick            # ~4 min on 2 CPU cores
    python bench/selective_head.py --shapes b --out bench/selective_head.json

Prints a markdown table per shape, then `RATIO <name> <ours>/<baseline> = <value>` lines (ratios to
the default flow, same shape and machine). Targets (paper Table 16): student peak memory at k = 20%
<= 0.72x, step time <= 1/1.36 = 0.735x, selective-head logit memory <= 1.1 x (k x default's).
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import config  # noqa: E402
import fused_head  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import selection  # noqa: E402
import system  # noqa: E402

VARIANTS = ["default", "chunked_k100", "k20_teacher", "k20_student", "k20_plain", "k20_selective"]
OURS = "k20_selective"
TARGETS = {"student_peak_mem": 0.72, "step_time": 0.65, "logit_mem": 1.1}  # step time: the paper 1 / 1.36
MB = 1 << 20

# Qwen3 shapes (config.json of the hub models), used for shape c and for the FLOP share of shape b
QWEN3 = {
    "1.7B": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=6144, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=12288, tie_word_embeddings=False),
}
QWEN3_V = 151_936
PAPER_T = 512  # the paper's sequence length (train.py --preset paper)


# -----------------------------------------------------------------------------
# FLOPs

def flops_per_token(cfg, T):
    """(trunk, head) forward FLOPs per token of a Llama/Qwen-style decoder at sequence length T.

    Matmuls only (2 FLOPs per multiply-add): q/k/v/o projections, the causal attention products
    (QK^T and AV over (T + 1) / 2 keys on average), the gated MLP (3 matrices) and the LM head d x V.
    """
    d, H, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    proj = d * H * hd + 2 * d * kv * hd + H * hd * d
    attn = 2 * H * hd * (T + 1) / 2
    mlp = 3 * d * cfg.intermediate_size
    return 2 * L * (proj + attn + mlp), 2 * d * cfg.vocab_size


def head_share(cfg, T):
    trunk, head = flops_per_token(cfg, T)
    return head / (trunk + head)


def flop_floor(scfg, tcfg, T, k):
    """Matmul FLOPs of a SE-KD step at fraction k over the default flow's (the step-time ratio if both ran
    at the same FLOP rate). Default: teacher forward (trunk + head), student forward + backward
    3 (trunk + head). SE-KD: teacher trunk + k head, student 3 trunk + the scoring pass (1 head, every
    row) + the selective head's forward, dh and dW (3 k head). Selection never shortens the trunks."""
    (ts, hs), (tt, ht) = flops_per_token(scfg, T), flops_per_token(tcfg, T)
    return (tt + k * ht + 3 * ts + hs + 3 * k * hs) / (tt + ht + 3 * (ts + hs))


def qwen3_config(size=None, **kw):
    from transformers import Qwen3Config
    c = dict(QWEN3[size]) if size else {}
    c.update(kw)
    return Qwen3Config(vocab_size=QWEN3_V, max_position_embeddings=4096, rope_theta=1e6,
                       attention_dropout=0.0, **c)


def shape_b_config(T, d=128, layers=2, heads=2, kv=1, head_dim=64):
    """Qwen3 architecture, V = 151,936, d = 128: the FFN width is solved so that the LM head's share
    of forward FLOPs equals Qwen3-1.7B's at the paper's T (a thin trunk would make the head ~100%)."""
    target = head_share(qwen3_config("1.7B"), PAPER_T)
    head = d * QWEN3_V
    trunk_need = head * (1 / target - 1) / layers  # multiply-adds per layer and token
    rest = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + heads * head_dim * (T + 1) / 2
    ffn = int(round((trunk_need - rest) / (3 * d)))
    return qwen3_config(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, head_dim=head_dim, intermediate_size=ffn,
                        tie_word_embeddings=True), target


# -----------------------------------------------------------------------------
# memory measurement

def _proc_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Meter:
    """Peak bytes above the level at reset(): CUDA allocator stats on a GPU, VmHWM - VmRSS on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device

    def now(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _proc_kib("VmRSS") * 1024

    def reset_peak(self):  # system's reset: CUDA peak stats, or VmHWM back to the current RSS on CPU
        if self.cuda:
            torch.cuda.synchronize(self.device)
        system.reset_peak_memory(self.device)

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return system.peak_memory(self.device)


def cpu_peak_reset_works():
    """system.reset_peak_memory stays silent where /proc/self/clear_refs is not writable; the bench
    must not (its CPU memory numbers would be lifetime peaks), so it asks first."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class Tracker(TorchDispatchMode):
    """Live bytes of tensor storages created under the mode, total and for (..., V)-shaped tensors.

    Every op output's storage is counted once, when it is allocated (views and in-place results reuse
    an input's storage and are not counted), until the storage is freed (a weakref finalizer: PyTorch
    keeps a storage's Python object alive as long as the storage, e.g. while autograd holds it for
    backward). A storage is logits if the tensor it was allocated for has last dim V (so the (V, d)
    weight gradient stays out even when it is viewed as (d, V)). mark() restarts the peaks.
    """

    _MM = {torch.ops.aten.mm: 1, torch.ops.aten.bmm: 1, torch.ops.aten.addmm: 2}  # right operand's position

    def __init__(self, vocab_size):
        super().__init__()
        self.V = vocab_size
        self.live = {}  # data_ptr -> [bytes, is_logits]
        self.cur = self.cur_logits = 0
        self.mark()

    def mark(self):
        self.peak, self.logits_at_peak, self.max_logits = self.cur, self.cur_logits, self.cur_logits
        self.score_logits = None

    def mark_head(self):
        """Called once positions are selected: the logits high-water mark so far is the scoring's,
        the one from here on is the loss head's (KL forward and backward)."""
        self.score_logits, self.max_logits = self.max_logits, self.cur_logits

    def _free(self, ptr):
        rec = self.live.pop(ptr, None)
        if rec is not None:
            self.cur -= rec[0]
            self.cur_logits -= rec[0] if rec[1] else 0

    def _weight_grad(self, func, args):
        """True for the (d, V) gradient of W^T in `h @ W.T` (mm(h^T, grad_logits)): its right operand
        is itself a tracked logits tensor, while a logits matmul's right operand is the weight W^T."""
        pos = self._MM.get(func.overloadpacket)
        if pos is None or len(args) <= pos or not isinstance(args[pos], torch.Tensor):
            return False
        rec = self.live.get(args[pos].untyped_storage().data_ptr())
        return rec is not None and rec[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # storages of the inputs: an output on one of them is a view or an in-place result, not an
        # allocation (e.g. weight.t() must not count the weight)
        seen = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0]
                if isinstance(x, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            ptr, n = s.data_ptr(), s.nbytes()
            is_logits = t.dim() >= 1 and t.shape[-1] == self.V and not self._weight_grad(func, args)
            if n == 0:
                continue
            if ptr in self.live or ptr in seen:
                continue  # a view or an in-place result: its storage keeps the class it was born with
            self.live[ptr] = [n, is_logits]
            self.cur += n
            self.cur_logits += n if is_logits else 0
            weakref.finalize(s, self._free, ptr)
            if self.cur > self.peak:
                self.peak, self.logits_at_peak = self.cur, self.cur_logits
            self.max_logits = max(self.max_logits, self.cur_logits)
        return out


# -----------------------------------------------------------------------------
# models and data per shape

class Ctx:
    """teacher, student, their heads (V, d), optimizer, a batch (x, y, valid) and settings."""


def _dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _random_model(cls, cfg, dtype, device, seed):
    """A random-init model built directly on `device` in `dtype` (an 8B model never sits on the CPU)."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(cfg)
    finally:
        torch.set_default_dtype(prev)


def make_ctx(shape, B, T, device, prep_dir=None, k=0.2, chunk=1024, seed=0):
    c = Ctx()
    c.device, c.k, c.chunk = device, k, chunk
    dt = _dtype(device)
    if shape == "a":
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(os.path.join(prep_dir, "teacher"), dtype=dt)
        keep = json.load(open(os.path.join(prep_dir, "keep.json")))
        student = models.student_from_teacher(teacher, keep)
        batch = torch.load(os.path.join(prep_dir, "batch.pt"))
        c.V = batch["V"]
        x, y, valid = batch["x"], batch["y"], batch["valid"]
    else:
        from transformers import Qwen3ForCausalLM
        if shape == "b":
            scfg, _ = shape_b_config(T)
            tcfg = scfg
        else:
            scfg, tcfg = qwen3_config("1.7B"), qwen3_config("8B")
        teacher = _random_model(Qwen3ForCausalLM, tcfg, dt, device, seed + 1)
        student = _random_model(Qwen3ForCausalLM, scfg, dt, device, seed)
        c.V = QWEN3_V
        g = torch.Generator().manual_seed(seed)
        tok = torch.randint(0, c.V, (B, T + 1), generator=g)
        x, y, valid = tok[:, :-1], tok[:, 1:], torch.ones(B, T, dtype=torch.bool)
    c.teacher = teacher.to(device).eval().requires_grad_(False)
    c.student = student.to(device).train().requires_grad_(True)
    for m in (c.teacher, c.student):
        m.config.use_cache = False
    c.x, c.y, c.valid = x.to(device), y.to(device), valid.to(device)
    c.Wt = models.head_weight(c.teacher, c.V)
    c.Ws = models.head_weight(c.student, c.V)
    # lr = 0: AdamW does all its work but the weights stay put, so every variant's loss is computed
    # from the same weights (the k = 20% variants must agree to rounding)
    c.opt = torch.optim.AdamW(c.student.parameters(), lr=0.0)
    return c


def state_bytes(c):
    """Bytes the student holds between steps: parameters + AdamW state (grads are freed by
    zero_grad(set_to_none=True) and counted inside the step)."""
    n = sum(p.numel() * p.element_size() for p in c.student.parameters())
    for st in c.opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


# -----------------------------------------------------------------------------
# the step variants

def full_logits(model, x, V):
    """model(x).logits as the naive flow gets them, cut to V and upcast: (B, T, V) fp32."""
    z = model(input_ids=x).logits
    if z.shape[-1] != V:
        z = z[..., :V]
    return z.float()


def teacher_phase(variant, c):
    """What the teacher hands to the student step: full logits (B, T, V) or hidden states (B, T, d_t)."""
    with torch.no_grad():
        if variant in ("default", "k20_student"):
            return full_logits(c.teacher, c.x, c.V)
        return models.trunk(c.teacher, c.x)


def _select_dense(ls, c):
    """Naive scoring: H(q_t) from the full (B, T, V) student logits, then top-k%."""
    scores = selection.METRICS["student_entropy"](ls.detach(), None, c.y)  # (B, T)
    return selection.POLICIES["top_k"](scores, c.valid, c.k)


def _select_chunked(hs, c, k):
    """train.py's scoring: chunked H(q_t) from hidden states (no (B, T, V) tensor), then top-k%."""
    if selection.needs_scores("top_k", k):
        scores = selection.chunked_scores("student_entropy", hs.detach(), c.Ws.detach(), c.y,
                                          chunk_size=c.chunk)
    else:
        scores = torch.zeros(c.y.shape, device=c.y.device)
    return selection.POLICIES["top_k"](scores, c.valid, k)


_ACTIVE = []  # the Tracker of a tracked pass, if any


def _rows(w):
    if _ACTIVE:
        _ACTIVE[0].mark_head()
    sel = w > 0
    n_seq = max(int(sel.any(1).sum()), 1)
    return sel, w[sel] / n_seq  # Eq. 4: per-sequence weights, mean over sequences with any weight


class Clock:
    """Seconds per phase of a step (synchronised laps); Clock(None) times nothing."""

    def __init__(self, c, phases=None):
        self.c, self.phases = c, phases
        self.t = self.now() if phases is not None else 0.0

    def now(self):
        _sync(self.c)
        return time.perf_counter()

    def lap(self, name):
        if self.phases is not None:
            t = self.now()
            self.phases[name] = self.phases.get(name, 0.0) + t - self.t
            self.t = t


def student_step(variant, c, tgt, clock=None):
    """Forward + loss + backward; returns the loss (float) and rows supervised. `clock` (a Clock) gets
    the phases: student forward, scoring (incl. selection), loss head, backward."""
    clock = clock or Clock(c)
    if variant == "default":
        ls = full_logits(c.student, c.x, c.V)  # (B, T, V) with grad
        clock.lap("student forward")
        w = _select_dense(ls, c)
        _rows(w)  # marks the end of scoring for the tracker
        clock.lap("scoring")
        loss = selection.batch_mean(w, losses.kl_per_position(ls, tgt))  # dense KL, masked mean
        clock.lap("loss head")
        n = int((w > 0).sum())
    elif variant == "k20_teacher":
        ls = full_logits(c.student, c.x, c.V)  # (B, T, V)
        clock.lap("student forward")
        sel, rw = _rows(_select_dense(ls, c))
        clock.lap("scoring")
        with torch.no_grad():
            lt = losses.selective_logits(tgt, c.Wt, sel).float()  # (N, V)
        loss = (rw * losses.kl_per_position(ls[sel], lt)).sum()
        clock.lap("loss head")
        n = int(sel.sum())
    elif variant in ("k20_student", "k20_plain"):
        hs = models.trunk(c.student, c.x)  # (B, T, d)
        clock.lap("student forward")
        sel, rw = _rows(_select_chunked(hs, c, c.k))
        clock.lap("scoring")
        ls = losses.selective_logits(hs, c.Ws, sel).float()  # (N, V) with grad
        if variant == "k20_student":
            lt = tgt[sel]  # gathered from the full (B, T, V) teacher logits
        else:
            with torch.no_grad():
                lt = losses.selective_logits(tgt, c.Wt, sel).float()  # (N, V)
        loss = (rw * losses.kl_per_position(ls, lt)).sum()
        clock.lap("loss head")
        n = int(sel.sum())
    elif variant in ("k20_selective", "chunked_k100"):
        k = c.k if variant == "k20_selective" else 1.0
        hs = models.trunk(c.student, c.x)  # (B, T, d)
        clock.lap("student forward")
        sel, rw = _rows(_select_chunked(hs, c, k))
        clock.lap("scoring")
        loss = fused_head.head_loss(hs[sel], c.Ws, c.y[sel], rw, losses.DenseTeacher(tgt[sel], c.Wt),
                                    chunk_size=c.chunk)  # the fused head: its backward runs here
        clock.lap("loss head")
        n = int(sel.sum())
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    loss.backward()
    clock.lap("backward")
    return float(loss.detach()), n


def optimizer_step(c):
    c.opt.step()
    c.opt.zero_grad(set_to_none=True)  # grads are freed: the next step allocates them again


def full_step(variant, c, times=None, phases=None):
    """Teacher phase + student step + AdamW; `times` (a list) gets [fwd+bwd seconds, optimizer seconds],
    `phases` (a dict) seconds per phase: teacher, student forward, scoring, loss head, backward, optimizer."""
    clock = Clock(c, phases)
    _sync(c)
    t0 = time.perf_counter()
    tgt = teacher_phase(variant, c)
    clock.lap("teacher")
    out = student_step(variant, c, tgt, clock)
    del tgt
    _sync(c)
    t1 = time.perf_counter()
    optimizer_step(c)
    _sync(c)
    clock.lap("optimizer")
    if times is not None:
        times += [t1 - t0, time.perf_counter() - t1]
    return out


def _sync(c):
    if torch.device(c.device).type == "cuda":
        torch.cuda.synchronize(c.device)


# -----------------------------------------------------------------------------
# workers (subprocesses)

def measure_variant(c, variant, warmup=True):
    """One variant: (warm-up step,) then the measured teacher phase and student step (see docstring).

    RSS / CUDA peaks and the Tracker's tensor counts come from the same pass; the tracker's own
    bookkeeping (a dict entry and a finalizer per live storage) is a few hundred KB at most.
    """
    if warmup:
        full_step(variant, c)  # AdamW state and one-time buffers exist after it
    gc.collect()
    meter = Meter(c.device)
    tr = Tracker(c.V)
    base = meter.now()
    meter.reset_peak()
    _ACTIVE.append(tr)
    try:
        with tr:
            tgt = teacher_phase(variant, c)
            teacher_peak, t_tracked = meter.peak() - base, tr.peak
            target_bytes = tgt.numel() * tgt.element_size()
            meter.reset_peak()
            tr.mark()
            loss, n_sel = student_step(variant, c, tgt)
            optimizer_step(c)
            student_peak = meter.peak() - base
            del tgt
    finally:
        _ACTIVE.clear()
    return dict(variant=variant, loss=loss, rows=n_sel, positions=int(c.valid.sum()),
                teacher_peak=teacher_peak, student_peak=student_peak, target_bytes=target_bytes,
                state_bytes=state_bytes(c), tracked_teacher_peak=t_tracked, tracked_student_peak=tr.peak,
                logits_at_peak=tr.logits_at_peak, head_logits=tr.max_logits, score_logits=tr.score_logits,
                measure="cuda max_memory_allocated" if meter.cuda else "VmHWM - VmRSS")


def worker_memory(a):
    """The variants named by --variant (comma list), one after the other in this process."""
    c = make_ctx(a.shape, a.B, a.T, a.device, a.prep, a.k, a.chunk)
    names = a.variant.split(",")
    full_step(names[0], c)  # one warm-up creates the AdamW state and one-time buffers for all
    return {v: measure_variant(c, v, warmup=False) for v in names}


def worker_timing(a):
    """All variants in one process, rotated order per round; per-variant step times (seconds) and
    phases, under train.py --keep-freed-memory's allocator (system.keep_freed_memory) unless --malloc glibc."""
    kept = a.malloc == "keep" and system.keep_freed_memory()
    c = make_ctx(a.shape, a.B, a.T, a.device, a.prep, a.k, a.chunk)
    for v in VARIANTS:  # warm-up
        full_step(v, c)
    times = {v: [] for v in VARIANTS}
    fb = {v: [] for v in VARIANTS}
    phases = {v: [] for v in VARIANTS}
    for r in range(a.reps):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            t, ph = [], {}
            full_step(v, c, t, ph)
            times[v].append(t[0] + t[1])
            fb[v].append(t[0])
            phases[v].append(ph)
    return dict(times=times, fwd_bwd=fb, phases=phases, malloc="kept" if kept else "glibc default")


# -----------------------------------------------------------------------------
# orchestration

SHAPE_DEFAULTS = {  # (B, T, reps) quick / full
    "a": {"quick": (1, 128, 3), "full": (2, 256, 5)},
    "b": {"quick": (4, 128, 3), "full": (4, 128, 7)},  # quick: B = 2 measured 0.79 (the trunk and AdamW dominate)
    "c": {"quick": (4, 512, 3), "full": (4, 512, 5)},
}


from benchutil import machine, median_minmax, write_json  # noqa: E402



def prepare_a(B, T, d):
    """Load SmolLM2 once (GGUF dequantization ~20 s), save it as safetensors for the workers, and a
    batch of real packed text (the stdlib corpus of data.py)."""
    import data
    teacher, tok = models.load_model(models.DEFAULT_TEACHER)
    V = len(tok)
    teacher.save_pretrained(os.path.join(d, "teacher"))
    keep = models.parse_layers("0,4,8,12,16,20,24,29", teacher.config.num_hidden_layers)
    json.dump(keep, open(os.path.join(d, "keep.json"), "w"))
    sp = data.load_splits(tok, None, seq_len=T, tokens=B * T, eval_tokens=T, seed=0,
                          tokenizer_fp=models.tokenizer_fingerprint(tok))
    tr = sp["train"]
    torch.save(dict(x=tr.input_ids[:B], y=tr.targets[:B], valid=tr.valid[:B], V=V), os.path.join(d, "batch.pt"))
    del teacher
    gc.collect()


def run_worker(args_list, env_extra=None, timeout=1800):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, os.path.abspath(__file__)] + args_list + ["--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args_list)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_shape(shape, a):
    B, T, reps = SHAPE_DEFAULTS[shape]["quick" if a.quick else "full"]
    B, T, reps = a.B or B, a.T or T, a.reps or reps
    chunk = a.chunk or config.default_entropy_chunk(torch.device(a.device).type)  # train.py's default
    res = dict(shape=shape, B=B, T=T, reps=reps, k=a.k, chunk=chunk, device=a.device)
    if shape == "c" and torch.device(a.device).type != "cuda":
        res["skipped"] = "needs a CUDA GPU (real Qwen3-1.7B/8B shapes)"
        print(f"shape c: skipped ({res['skipped']})", flush=True)
        return res
    if torch.device(a.device).type == "cpu" and not cpu_peak_reset_works():
        sys.exit("CPU memory measure needs /proc/self/clear_refs (Linux); not available here")
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="sekd_bench_") as prep:
        if shape == "a":
            prepare_a(B, T, prep)
            from transformers import AutoConfig
            tcfg = AutoConfig.from_pretrained(os.path.join(prep, "teacher"))
            keep = json.load(open(os.path.join(prep, "keep.json")))
            scfg = AutoConfig.from_pretrained(os.path.join(prep, "teacher"))
            scfg.num_hidden_layers = len(keep)
            res["model"] = f"SmolLM2-135M teacher ({tcfg.num_hidden_layers} layers) -> {len(keep)}-layer student"
        elif shape == "b":
            scfg, target = shape_b_config(T)
            tcfg = scfg
            res["qwen3_1.7B_head_share"] = target
            res["model"] = (f"random Qwen3 arch: V={QWEN3_V}, d={scfg.hidden_size}, layers={scfg.num_hidden_layers}, "
                            f"ffn={scfg.intermediate_size}; teacher = same shape, other seed")
        else:
            scfg, tcfg = qwen3_config("1.7B"), qwen3_config("8B")
            res["model"] = "random-init Qwen3-1.7B student / Qwen3-8B teacher shapes, bf16"
        res["student_head_flop_share"] = head_share(scfg, T)
        res["teacher_head_flop_share"] = head_share(tcfg, T)
        res["flop_floor"] = flop_floor(scfg, tcfg, T, a.k)
        print(f"shape {shape}: {res['model']}; B={B} T={T}; LM-head share of forward FLOPs: student "
              f"{res['student_head_flop_share']:.1%}, teacher {res['teacher_head_flop_share']:.1%}"
              + (f" (Qwen3-1.7B at T={PAPER_T}: {res['qwen3_1.7B_head_share']:.1%})" if shape == "b" else ""),
              flush=True)
        common = ["--shape", shape, "--B", str(B), "--T", str(T), "--k", str(a.k), "--chunk", str(chunk),
                  "--device", a.device, "--prep", prep]
        # glibc: a fixed mmap threshold returns every freed tensor to the OS, so RSS tracks live memory
        env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
        mem = {}
        # --isolate: a fresh process per variant (nothing of another variant can linger in the heap);
        # otherwise one process measures all variants in turn (saves the start-up of each worker)
        for group in ([[v] for v in VARIANTS] if a.isolate else [VARIANTS]):
            mem.update(run_worker(common + ["--variant", ",".join(group)], env))
        for v in VARIANTS:
            print(f"  memory {v:14s} student {mem[v]['student_peak'] / MB:9.1f} MB  teacher "
                  f"{mem[v]['teacher_peak'] / MB:9.1f} MB", flush=True)
        res["isolated"] = a.isolate
        # timing: keep = train.py --keep-freed-memory's allocator; glibc = glibc's default (train.py's);
        # both: a glibc-default worker first, for the allocator's own ratio
        if a.malloc == "both":
            glibc = run_worker(common + ["--timing", "--reps", str(reps), "--malloc", "glibc"])
            res["malloc_kept_vs_glibc"] = {"glibc_step_s": {v: statistics.median(t) for v, t in glibc["times"].items()}}
        tim = run_worker(common + ["--timing", "--reps", str(reps), "--malloc", "glibc" if a.malloc == "glibc" else "keep"])
        if a.malloc == "both":
            res["malloc_kept_vs_glibc"]["kept_step_s"] = {v: statistics.median(t) for v, t in tim["times"].items()}
    res["memory"], res["timing"] = mem, tim
    res["wall_s"] = time.time() - t_start
    return res


def summarize(res):
    """Markdown table + ratio dict for one shape."""
    mem, tim = res["memory"], res["timing"]
    med = {v: statistics.median(tim["times"][v]) for v in VARIANTS}
    best = {v: min(tim["times"][v]) for v in VARIANTS}
    fb = {v: statistics.median(tim["fwd_bwd"][v]) for v in VARIANTS}
    d = mem["default"]
    lines = [f"\n### shape {res['shape']}: {res['model']}, B={res['B']}, T={res['T']}, k={res['k']}, "
             f"chunk={res['chunk']}, {res['device']}, step time = median of {res['reps']}\n",
             "| variant | student peak MB | x default | teacher peak MB | x default | step s (median) | x default | min s | "
             "fwd+bwd s | x default | "
             "logits MB at peak | logits share | scoring logits MB | head logits MB | tracked student MB | rows | loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        m = mem[v]
        share = m["logits_at_peak"] / max(m["tracked_student_peak"], 1)
        lines.append(
            f"| {v} | {m['student_peak'] / MB:.1f} | {m['student_peak'] / d['student_peak']:.3f} | "
            f"{m['teacher_peak'] / MB:.1f} | {m['teacher_peak'] / d['teacher_peak']:.3f} | {med[v]:.3f} | "
            f"{med[v] / med['default']:.3f} | {best[v]:.3f} | {fb[v]:.3f} | {fb[v] / fb['default']:.3f} | "
            f"{m['logits_at_peak'] / MB:.1f} | {share:.1%} | "
            f"{(m['score_logits'] or 0) / MB:.1f} | {m['head_logits'] / MB:.1f} | "
            f"{m['tracked_student_peak'] / MB:.1f} | {m['rows']}/{m['positions']} | {m['loss']:.6f} |")
    st = d["state_bytes"]
    k_eff = mem[OURS]["rows"] / mem[OURS]["positions"]
    ideal = k_eff * d["head_logits"]
    def paired(v, key="times"):  # per-round ratio v/default (the two ran in the same round): median, min, max
        return median_minmax([x / y for x, y in zip(tim[key][v], tim[key]["default"])])

    ratios = {
        "student_peak_mem": (OURS, "default", mem[OURS]["student_peak"] / d["student_peak"]),
        "step_time": (OURS, "default", *paired(OURS)),
        "step_time_min": (OURS, "default", best[OURS] / best["default"]),
        "step_time_flop_floor": (OURS, "default", res["flop_floor"]),
        "fwd_bwd_time": (OURS, "default", *paired(OURS, "fwd_bwd")),
        "teacher_peak_mem": (OURS, "default", mem[OURS]["teacher_peak"] / d["teacher_peak"]),
        "student_peak_mem_incl_state": (OURS, "default", (st + mem[OURS]["student_peak"]) / (st + d["student_peak"])),
        "logit_mem": (OURS, "ideal_k_x_default", mem[OURS]["head_logits"] / ideal),
        "logit_mem_plain": ("k20_plain", "ideal_k_x_default", mem["k20_plain"]["head_logits"] / ideal),
    }
    for v in VARIANTS:
        if v not in ("default", OURS):
            ratios[f"student_peak_mem_{v}"] = (v, "default", mem[v]["student_peak"] / d["student_peak"])
            ratios[f"step_time_{v}"] = (v, "default", *paired(v))
    ph = tim.get("phases")
    if ph:  # where a step's time goes: median seconds per phase over the rounds
        names = list(ph["default"][0])
        lines += [f"\nphases (median s over {res['reps']} rounds; allocator: {tim.get('malloc', '?')}):\n",
                  "| variant | " + " | ".join(names) + " | step |", "|---|" + "---:|" * (len(names) + 1)]
        for v in VARIANTS:
            lines.append(f"| {v} | " + " | ".join(f"{statistics.median(p.get(n, 0.0) for p in ph[v]):.3f}"
                                                for n in names) + f" | {med[v]:.3f} |")
    lines.append(f"\nstudent state (params + AdamW) {st / MB:.0f} MB, not in the peaks above; "
                 f"k_eff = {mem[OURS]['rows']}/{mem[OURS]['positions']} = {k_eff:.3f}; ideal selective "
                 f"head logit memory = k_eff x default's = {ideal / MB:.1f} MB; memory measure: "
                 f"{d['measure']}")
    return "\n".join(lines), ratios


def targets_text(all_ratios):
    out = ["\n### targets (ratio to the default flow, same shape and machine)\n"]
    for shape, r in all_ratios.items():
        for name, key, cmp in (("student peak memory <= 0.72", "student_peak_mem", "le"),
                               ("step time <= 0.65 (the paper: 0.735)", "step_time", "le"),
                               ("selective-head logit memory <= 1.1 x ideal", "logit_mem", "le")):
            v = r[key][2]
            thr = TARGETS[key]
            out.append(f"- shape {shape}: {name}: {v:.3f} -> {'met' if v <= thr else 'NOT met'}")
            if key == "step_time" and "step_time_flop_floor" in r:
                out.append(f"  (matmul-FLOP floor of that ratio at this shape: {r['step_time_flop_floor'][2]:.3f})")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small batches and few repeats (CPU: a few minutes)")
    p.add_argument("--shapes", default="b,a,c", help="comma list of a, b, c")
    p.add_argument("--k", type=float, default=0.2, help="fraction of positions selected")
    p.add_argument("--chunk", type=int, help="rows of logits per chunk (train.py --entropy-chunk); default "
                   "train.py's: 256 on a CPU, 1024 on a GPU (config.default_entropy_chunk)")
    p.add_argument("--B", type=int, help="override the batch size of every shape")
    p.add_argument("--T", type=int, help="override the sequence length of every shape")
    p.add_argument("--reps", type=int, help="timed steps per variant (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--malloc", choices=["keep", "glibc", "both"], default="keep",
                   help="timing allocator: keep = train.py --keep-freed-memory's (system.keep_freed_memory), "
                        "glibc = glibc's default (train.py's default), "
                        "both = time under each (RATIO malloc_kept_vs_glibc per variant)")
    p.add_argument("--out", help="save all numbers to this JSON file (atomic)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one fresh process per variant for memory (default: on CPU without --quick)")
    # worker mode (one fresh process per memory measurement, one for timing)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    p.add_argument("--prep", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    selection.check_fraction(a.k, "k")
    if a.chunk is not None and a.chunk < 1:
        p.error("--chunk must be >= 1")
    if a.isolate is None:  # CUDA allocator stats need no fresh process; CPU RSS is cleaner in one
        a.isolate = not a.quick and torch.device(a.device).type == "cpu"
    if a.variant and any(v not in VARIANTS for v in a.variant.split(",")):
        p.error(f"--variant: choose from {VARIANTS}")
    if a.variant or a.timing:
        out = worker_memory(a) if a.variant else worker_timing(a)
        print(json.dumps(out))
        return out
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPE_DEFAULTS]
    if bad:
        p.error(f"--shapes: unknown shape(s) {bad}; choose from a, b, c")
    mach = machine()
    print(f"machine: {mach['cpu_count']} CPUs ({mach['cpu']}), torch {mach['torch']}, threads {mach['threads']}, "
          f"device {a.device}{' (' + mach['gpu'] + ')' if mach['gpu'] else ''}", flush=True)
    results, tables, all_ratios = [], [], {}
    for s in shapes:
        r = bench_shape(s, a)
        results.append(r)
        if "skipped" not in r:
            t, ratios = summarize(r)
            r["ratios"] = {k: v[2] for k, v in ratios.items()}
            tables.append(t)
            all_ratios[s] = ratios
        else:
            tables.append(f"\n### shape {s}: skipped ({r['skipped']})")
    print("\n".join(tables))
    if all_ratios:
        print(targets_text(all_ratios))
    print()
    for r in results:
        for v, g in r.get("malloc_kept_vs_glibc", {}).get("glibc_step_s", {}).items():
            k = r["malloc_kept_vs_glibc"]["kept_step_s"][v]
            print(f"RATIO malloc_kept_vs_glibc@shape_{r['shape']} {v} = {k / g:.3f} (step {k:.3f} s kept, {g:.3f} s glibc)")
    for s, ratios in all_ratios.items():
        for name, (ours, base, v, *spread) in ratios.items():
            tag = name if s == "b" else f"{name}@shape_{s}"
            rounds = f" (median of the paired rounds; min {spread[0]:.3f}, max {spread[1]:.3f})" if spread else ""
            print(f"RATIO {tag} {ours}/{base} = {v:.3f}{rounds}")
    if a.out:
        write_json(a.out, dict(machine=mach, argv=sys.argv, quick=a.quick, results=results))
    return results


if __name__ == "__main__":
    main()
