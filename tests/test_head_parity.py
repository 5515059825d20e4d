"""fused_head.py (the fast path) against losses.py (the plain one): the same values and gradients for every
loss, RS-KD, temperature and lam; the closed forms chosen by the loss function itself; the fast path's
memory and casts; its no-grad entropy against the exact one."""
import functools
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))  # after the root: bench/cache.py must not shadow cache.py
import fused_head as FH  # noqa: E402
import losses as L  # noqa: E402
import selection  # noqa: E402
import train  # noqa: E402
from conftest import train_args  # noqa: E402
from selective_head import Tracker  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=_gen(seed)) * scale


def _sparse(teacher_logits, U, seed=0, temperature=1.0):
    """RS-KD target (ids, probs = counts / U) from U seeded uniforms per row."""
    u = torch.rand(teacher_logits.shape[0], U, dtype=torch.float64, generator=_gen(seed))
    ids, counts = L.sample_classes(teacher_logits, u, temperature)
    return ids, counts / U


def _rows(N=23, d=8, dt=5, V=31, seed=30):
    """N selected rows (N = 23: no chunk size below divides it), non-uniform weights with two zeros."""
    g = _gen(seed)
    h = torch.randn(N, d, generator=g).requires_grad_(True)
    W = (torch.randn(V, d, generator=g) * 0.7).requires_grad_(True)
    ht, Wt = torch.randn(N, dt, generator=g), torch.randn(V, dt, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, generator=g) + 0.1
    w[[3, 11]] = 0.0
    return h, W, ht, Wt, y, w


def _both(teacher, h, W, y, w, **kw):
    """(value, grad h, grad W) through the plain head and through the fast one."""
    out = []
    for head in (L.head_loss, FH.head_loss):
        loss = head(h, W, y, w, teacher, **kw)
        out.append((loss, *torch.autograd.grad(loss, [h, W])))
    return out


def _assert_same(plain, fast):
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- parity

CASES = [(loss, "dense") for loss in sorted(L.LOSSES)] + [(loss, "sparse") for loss in sorted(L.LOSSES)
                                                            if L.supports_rs_kd(loss)]


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("loss,kind", CASES)
def test_plain_and_fast_heads_agree(loss, kind, T, lam):
    h, W, ht, Wt, y, w = _rows()
    if kind == "dense":
        teacher = L.DenseTeacher(ht, Wt)
    else:
        teacher = L.SparseTeacher(*_sparse(ht @ Wt.T, 6, seed=31, temperature=T))
    plain, fast = _both(teacher, h, W, y, w, loss=loss, temperature=T, lam=lam, chunk_size=5)
    _assert_same(plain, fast)
    assert plain[0] > 0 and plain[2].abs().max() > 1e-3  # a real loss and gradient, not two zeros
    assert torch.equal(plain[1][[3, 11]], torch.zeros(2, h.shape[1]))  # weight-0 rows get no gradient


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_plain_and_fast_heads_agree_on_nothing_selected(kind):
    h, W, ht, Wt, y, w = _rows()
    h, ht, y, w = h.detach()[:0].requires_grad_(True), ht[:0], y[:0], w[:0]  # N = 0
    if kind == "dense":
        teacher = L.DenseTeacher(ht, Wt)
    else:
        teacher = L.SparseTeacher(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    for lam in (0.0, 0.5, 1.0):
        plain, fast = _both(teacher, h, W, y, w, loss="kl", temperature=2.0, lam=lam)
        _assert_same(plain, fast)
        assert plain[0].item() == 0.0 and torch.equal(fast[2], torch.zeros_like(W))


@pytest.mark.parametrize("head", sorted(FH.HEADS))
def test_backward_scales_with_the_incoming_gradient(head):
    # train.py backpropagates loss / grad_accum: the fused head must scale its stored grads (and keep them
    # when the incoming gradient is exactly 1, its copy-free fast path)
    h, W, ht, Wt, y, w = _rows()
    fn = FH.HEADS[head]
    one = torch.autograd.grad(fn(h, W, y, w, L.DenseTeacher(ht, Wt), chunk_size=5), [h, W])
    third = torch.autograd.grad(fn(h, W, y, w, L.DenseTeacher(ht, Wt), chunk_size=5) / 3, [h, W])
    for a, b in zip(one, third):
        torch.testing.assert_close(b, a / 3)
        assert a.abs().max() > 1e-3


def test_heads_registry():
    assert FH.HEADS == {"fused": FH.head_loss, "reference": L.head_loss}


def test_a_training_step_is_the_same_through_either_head(tiny_dir, tmp_path):
    # train.py --head fused | reference: the logged loss, KD term and gradient norm of a step agree
    rows = {}
    for head in sorted(FH.HEADS):
        train.main(train_args(tiny_dir, tmp_path / head, "--max-steps", "1", "--k", "0.3", "--lam", "0.5",
                              "--temperature", "2", "--head", head))
        rows[head] = json.loads(open(tmp_path / head / "metrics.jsonl").readline())
    for key in ("loss", "kd", "grad_norm"):
        assert rows["fused"][key] == pytest.approx(rows["reference"][key], rel=1e-5), key
    assert rows["fused"]["kd"] > 0.1


# ----------------------------------------------------------------------------- the closed form, by identity

def _chunk_by_autograd(z, teacher_rows, y, kd_coef, ce_coef, T):
    """losses.rows_loss (where-weighted forward KL or RS-KD plus CE) and its grad wrt z, by autograd."""
    z = z.clone().requires_grad_(True)
    out = L.rows_loss(z, teacher_rows, y, kd_coef, ce_coef, L.kl_per_position, T)
    (g,) = torch.autograd.grad(out, z)
    return out.detach(), g


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("T", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_closed_form_chunk_matches_autograd(monkeypatch, kind, T, lam):
    # d/dz tau^2 KL(p || softmax(z / tau)) = tau (S q - p), d/dz CE = softmax(z) - onehot(y): value and grad
    # of a chunk as autograd gets them, incl. weight-0 rows with an infinite loss and classes with p = 0
    monkeypatch.setattr(FH, "_row_blocks", lambda n, V, device: [(i, min(n, i + 4)) for i in range(0, n, 4)])
    c, V = 11, 97
    z, t = _logits(c, V, seed=80, scale=3.0), _logits(c, V, seed=81, scale=3.0)
    y = torch.randint(0, V, (c,), generator=_gen(82))
    w = torch.rand(c, generator=_gen(83)) + 0.1
    w[[2, 7]] = 0.0
    w[10] = -0.5  # a weight <= 0 adds nothing either (rows_loss's `where`)
    z[2, 3] = float("-inf")  # q = 0 where p > 0: KL = inf on a weight-0 row, which must add nothing
    z[7, y[7]] = float("-inf")  # CE = inf on a weight-0 row
    z[5, 40:50] = -1e4  # q underflows to 0 on a kept row
    t[4, 10:20] = -1e4  # p = 0 (finite logits)
    teacher = t
    if kind == "sparse":
        ids, probs = _sparse(t, 6, seed=84, temperature=T)
        ids = torch.cat([ids, torch.full((c, 2), 3)], 1)  # padding (prob 0), at row 2's -inf logit too
        probs = torch.cat([probs, torch.zeros(c, 2)], 1)
        probs[1] *= 0.75  # rs_kd_loss takes any probs: its grad is tau (S q - p~) with S = sum p~ = 0.75 here
        teacher = L.SparseTeacher(ids, probs)
    kd_coef = lam * w if lam > 0 else None
    ce_coef = (1 - lam) * w if lam < 1 else None
    t_arg = t.clone() if kind == "dense" else teacher  # dense teacher logits are overwritten, as z
    got = FH._forward_kl_ce_grad(z.clone(), t_arg, y, kd_coef, ce_coef, T)
    assert got is not None
    ref = _chunk_by_autograd(z, teacher, y, kd_coef, ce_coef, T)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(got[0]) and torch.equal(got[1][[2, 7, 10]], torch.zeros(3, V))
    assert got[1].abs().max() > 0.01


def test_closed_form_leaves_masked_teacher_vocab_to_autograd():
    # a -inf teacher logit (p = 0) is 0 * -inf in the closed form's KL: it says so (None), and the fused head
    # then takes autograd for that chunk, which gives the plain head's numbers
    z, t = _logits(3, 20, seed=85), _logits(3, 20, seed=86)
    t[1, 4] = float("-inf")
    assert FH._forward_kl_ce_grad(z.clone(), t.clone(), torch.tensor([1, 2, 3]), torch.ones(3), None, 1.0) is None
    h, W, ht, Wt, y, w = _rows(V=41)
    Wt = Wt.clone()
    Wt[7] = 0.0
    Wt[7, 0] = float("-inf")  # teacher logit of class 7 is -inf on every row with ht[:, 0] > 0
    ht = ht.clone()
    ht[:, 0] = ht[:, 0].abs() + 0.1
    _assert_same(*_both(L.DenseTeacher(ht, Wt), h, W, y, w, temperature=2.0, lam=0.5, chunk_size=5))


def _count_closed_form(monkeypatch):
    calls, closed = [], FH._forward_kl_ce_grad
    monkeypatch.setattr(FH, "_forward_kl_ce_grad", lambda *a: calls.append(1) or closed(*a))
    return calls


@pytest.mark.parametrize("loss", sorted(L.LOSSES))
def test_closed_form_is_chosen_by_the_loss_function_itself(monkeypatch, loss):
    # forward KL (kl, weighted) by identity, RS-KD and pure CE: the closed form for every chunk; any other loss:
    # autograd through its own body
    calls = _count_closed_form(monkeypatch)
    h, W, ht, Wt, y, w = _rows()
    FH.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss=loss, lam=0.5, chunk_size=5).backward()
    assert len(calls) == (5 if L.LOSSES[loss] in FH.CLOSED_FORM else 0)
    assert set(FH.CLOSED_FORM) == {L.kl_per_position, L.weighted_kd}
    calls.clear()
    FH.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss=loss, lam=0.0, chunk_size=5).backward()
    assert len(calls) == 5
    if L.supports_rs_kd(loss):
        calls.clear()
        sparse = L.SparseTeacher(*_sparse(ht @ Wt.T, 4, seed=88))
        FH.head_loss(h, W, y, w, sparse, loss=loss, lam=0.5, chunk_size=5).backward()
        assert len(calls) == 5


def test_a_copy_of_forward_kl_with_every_attribute_trains_on_its_own_body(monkeypatch):
    # a fork's new loss that copies kl_per_position's name, doc and tags (functools.wraps) is still a new
    # function: no closed form, its own body (half the KL) gives half the loss and half the gradient
    @functools.wraps(L.kl_per_position)
    def half_kl(student_logits, teacher_logits, targets=None, temperature=1.0):
        return 0.5 * L.kl_per_position(student_logits, teacher_logits, targets, temperature)

    assert half_kl.rs_kd and half_kl.__name__ == "kl_per_position"
    monkeypatch.setitem(L.LOSSES, "half_kl", half_kl)
    calls = _count_closed_form(monkeypatch)
    h, W, ht, Wt, y, w = _rows()
    for head in (FH.head_loss, L.head_loss):
        full = head(h, W, y, w, L.DenseTeacher(ht, Wt), loss="kl", temperature=2.0, chunk_size=5)
        half = head(h, W, y, w, L.DenseTeacher(ht, Wt), loss="half_kl", temperature=2.0, chunk_size=5)
        torch.testing.assert_close(half, full / 2)
        for a, b in zip(torch.autograd.grad(half, [h, W]), torch.autograd.grad(full, [h, W])):
            torch.testing.assert_close(a, b / 2)
    assert len(calls) == 5  # the fused head's `kl` call only


# ----------------------------------------------------------------------------- memory and casts

B_, T_, D_, V_, C_ = 4, 30, 8, 101, 16  # N = 120 rows; D_ <= C_ so (V, d) < C_ x V elements


def _mem_case(seed=50):
    h, W, ht, Wt, y, w = _rows(N=B_ * T_, d=D_, dt=6, V=V_, seed=seed)
    return h, W, L.DenseTeacher(ht, Wt), y, w


@pytest.mark.parametrize("loss", ["kl", "atkd"])
def test_fused_head_saved_tensors_are_chunk_sized(loss):
    h, W, teacher, y, w = _mem_case()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = FH.head_loss(h, W, y, w, teacher, loss=loss, lam=0.5, chunk_size=C_)
    out.backward()
    assert shapes and all(math.prod(s) <= C_ * V_ for s in shapes), max(shapes, key=math.prod)
    assert h.grad is not None and W.grad is not None
    # the same probe does see the (N, V) tensors of the dense computation
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, t = h @ W.T, teacher.hidden @ teacher.head.T
        (w * L.LOSSES[loss](s, t, y)).sum()
    assert max(math.prod(s) for s in shapes) >= B_ * T_ * V_


def test_fused_head_peak_is_weight_grad_plus_one_chunk():
    """In one chunk, the teacher's scratch dies before the (V, d) weight gradient is made, so the live
    peak is grad W + the chunk's logits (+ grad h), not grad W + student + teacher logits + a temporary.
    Live bytes counted by bench/selective_head.py's Tracker (every storage an op makes, until freed)."""
    g = _gen(61)
    N, d, V = 64, 256, 4096  # grad W (V, d) = 4 MB; a chunk's logits (N, V) = 1 MB
    h = torch.randn(N, d, generator=g).requires_grad_(True)
    W = (torch.randn(V, d, generator=g) * 0.05).requires_grad_(True)
    teacher = L.DenseTeacher(torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) * 0.05)
    y, w = torch.randint(0, V, (N,), generator=g), torch.full((N,), 1.0 / N)
    with Tracker(V) as tr:
        FH.head_loss(h, W, y, w, teacher, chunk_size=N).backward()
    grad_w, chunk = 4 * V * d, 4 * N * V
    assert grad_w + chunk <= tr.peak <= grad_w + chunk + 4 * N * d + 64 * 1024, tr.peak
    assert W.grad is not None and h.grad is not None


class _HeadCasts(TorchDispatchMode):
    """Counts dtype casts of a tensor shaped like the head W (V, d) or its transpose."""

    def __init__(self, shape):
        super().__init__()
        self.shapes, self.n = {tuple(shape), tuple(shape)[::-1]}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.shapes:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_head_is_cast_once_per_call_under_bf16_autocast():
    """Under bf16 autocast an fp32 head multiplied chunk by chunk is cast to bf16 once per call (not once
    per chunk, a (V, d) copy each), with the values of autocast's per-chunk casts: the scoring pass and
    the fused head."""
    g = _gen(62)
    N, d, V, chunk = 12, 8, 40, 3  # 4 chunks
    h, W = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)
    teacher = L.DenseTeacher(torch.randn(N, d, generator=g), torch.randn(V, d, generator=g))
    y, w = torch.randint(0, V, (N,), generator=g), torch.full((N,), 1.0 / N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_H = torch.cat([FH.entropy(h[i:i + chunk] @ W.T) for i in range(0, N, chunk)])  # autocast's casts
        with _HeadCasts(W.shape) as casts:
            S = selection.chunked_scores("student_entropy", h[None], W, y[None], chunk_size=chunk)
        assert casts.n == 1 and torch.equal(S[0], ref_H)
        hs, Ws = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with _HeadCasts(W.shape) as casts:
            loss = FH.head_loss(hs, Ws, y, w, teacher, chunk_size=chunk)
            loss.backward()
        assert casts.n == 2  # the student's head and the teacher's, once each
    hr, Wr = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dense reference: autocast's own casts
        zs, zt = (hr @ Wr.T).float(), (teacher.hidden @ teacher.head.T).float()
    ref = (L.kl_per_position(zs, zt) * w).sum()
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert Ws.grad.dtype == torch.float32
    for ours, theirs in ((Ws.grad, Wr.grad), (hs.grad, hr.grad)):  # bf16 rounding of the grads' matmuls
        assert float((ours - theirs).abs().max()) <= 1e-2 * float(theirs.abs().max())


def test_chunk_logits_reuses_one_buffer():
    g = _gen(63)
    h, W = torch.randn(10, 4, generator=g), torch.randn(7, 4, generator=g)
    logits = FH.ChunkLogits(4, fp32=True)
    a = logits(h[:4], W)
    ptr = a.data_ptr()
    b = logits(h[4:8], W)
    torch.testing.assert_close(b, h[4:8] @ W.T)
    c = logits(h[8:], W)
    assert b.data_ptr() == c.data_ptr() == ptr and c.shape == (2, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = FH.ChunkLogits(4)(h[:4], W)  # scoring keeps the bf16 matmul output
        z32 = FH.ChunkLogits(4, fp32=True)(h[:4], W)  # the head copies it into its fp32 buffer
    assert z16.dtype == torch.bfloat16 and z32.dtype == torch.float32 and torch.equal(z32, z16.float())


# ----------------------------------------------------------------------------- entropy without grad

def _entropy64(x, T=1.0):
    """The entropy's defining formula in fp64, 0 log 0 = 0 (NaN for a row with no finite logit)."""
    lq = torch.log_softmax(x.double() / T, -1)
    q = lq.exp()
    return -(q * torch.where(q > 0, lq, 0.0)).sum(-1)


def test_fast_entropy_matches_the_definition(monkeypatch):
    # without grad, fused_head.entropy takes a shortcut (log s - sum_v e (z - m) / s over blocks of rows); it
    # must keep 0 log 0 = 0 for -inf logits, NaN for a row with no finite logit, tau, bf16, every block boundary
    monkeypatch.setattr(FH, "_row_blocks", lambda n, V, device: [(i, min(n, i + 3)) for i in range(0, n, 3)])
    x = _logits(2, 5, 257, seed=24, scale=6.0)
    x[0, 1, 5:] = float("-inf")  # a masked vocabulary
    x[1, 2] = float("-inf")  # no finite logit
    x[1, 3, :] = float("-inf")
    x[1, 3, 7] = 0.0  # one-hot
    for T in (1.0, 0.7, 3.0):
        got = FH.entropy(x, T)
        assert got.shape == (2, 5) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), _entropy64(x, T), atol=2e-6, rtol=1e-6, equal_nan=True)
        torch.testing.assert_close(got, L.entropy(x, T), atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.isnan(FH.entropy(x)[1, 2]) and FH.entropy(x)[1, 3].item() == 0.0
    xb = x.bfloat16()
    torch.testing.assert_close(FH.entropy(xb, 2.0), FH.entropy(xb.float(), 2.0), equal_nan=True)
    # with grad it is losses.entropy itself
    s = x[0].clone().requires_grad_(True)
    H = FH.entropy(s, 1.5)
    (g,) = torch.autograd.grad(H.sum(), s)
    assert not torch.isnan(g).any()
    torch.testing.assert_close(H.detach(), FH.entropy(x[0], 1.5), atol=2e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        FH.entropy(x, 0.0)


def test_fast_entropy_accuracy_against_fp64():
    # a wide vocabulary: the shortcut stays within 2e-6 nats of fp64 (fp32 log_softmax drifts further)
    x = _logits(4, 40000, seed=25, scale=4.0)
    assert (FH.entropy(x).double() - _entropy64(x)).abs().max() < 2e-6
