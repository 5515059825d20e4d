"""Tests for losses.py: objectives against references, memory-lean paths against dense ones."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import losses as L  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=_gen(seed)) * scale


def _sparse(teacher_logits, U, seed=0, temperature=1.0, chunk_size=1024):
    """RS-KD target (ids, probs = counts / U) from U seeded uniforms per row."""
    u = torch.rand(teacher_logits.shape[0], U, dtype=torch.float64, generator=_gen(seed))
    ids, counts = L.sample_classes(teacher_logits, u, temperature, chunk_size)
    return ids, counts / U


# ----------------------------------------------------------------------------- per-position objectives

@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_matches_kl_div_and_is_zero_on_identical(T):
    t, s = _logits(3, 5, 11, seed=1), _logits(3, 5, 11, seed=2)
    ref = F.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                   reduction="none", log_target=True).sum(-1) * T * T
    got = L.kl_per_position(s, t, temperature=T)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert (got > 1e-3).all()
    assert L.kl_per_position(t, t.clone(), temperature=T).abs().max() < 1e-6


def test_reverse_kl_is_kl_of_swapped_arguments():
    t, s = _logits(4, 9, seed=3), _logits(4, 9, seed=4)
    ref = F.kl_div(torch.log_softmax(t, -1), torch.log_softmax(s, -1),
                   reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(L.reverse_kl_per_position(s, t), ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(L.reverse_kl_per_position(s, t), L.kl_per_position(s, t))


def test_registry_signature_and_ce():
    t, s = _logits(6, 13, seed=5), _logits(6, 13, seed=6)
    y = torch.randint(0, 13, (6,), generator=_gen(7))
    assert set(L.LOSSES) == {"kl", "weighted", "reverse_kl", "dkd", "atkd"}
    for name, fn in L.LOSSES.items():  # one argument order: (student, teacher, targets, temperature)
        out = fn(s, t, y, 1.5)
        assert out.shape == (6,) and out.dtype == torch.float32, name
    torch.testing.assert_close(L.ce_per_position(s, None, y), F.cross_entropy(s, y, reduction="none"))
    torch.testing.assert_close(L.LOSSES["kl"](s, t, y, 1.5), L.kl_per_position(s, t, temperature=1.5))
    torch.testing.assert_close(L.LOSSES["dkd"](s, t, y, 1.5), L.dkd_loss(s, t, y, temperature=1.5))
    # the argument order is the student's first: swapping the logits changes forward KL
    assert not torch.allclose(L.LOSSES["kl"](s, t, y), L.LOSSES["kl"](t, s, y))
    torch.testing.assert_close(L.LOSSES["kl"](s, t, y), L.reverse_kl_per_position(t, s, y))
    for gone in ("PER_POSITION", "HEAD_LOSSES", "_kl", "_reverse_kl", "_dkd", "_ce", "entropy_from_logits"):
        assert not hasattr(L, gone), gone  # one registry, one entropy


def test_policy_for_and_rs_kd_support():
    assert L.policy_for("weighted", "top_k") == "weighted"  # Weighted KD brings its own weights
    for name in ("kl", "reverse_kl", "dkd", "atkd"):
        assert L.policy_for(name, "gls") == "gls"
    assert L.supports_rs_kd("kl") and L.supports_rs_kd("weighted")
    assert not any(L.supports_rs_kd(n) for n in ("reverse_kl", "dkd", "atkd", "nope"))
    t, s = _logits(4, 9, seed=5), _logits(4, 9, seed=6)
    torch.testing.assert_close(L.LOSSES["weighted"](s, t, None, 2.0),
                               L.kl_per_position(s, t, temperature=2.0))


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_dkd_decomposition_identity(T):
    # KL(p||q) = TCKD + (1 - p(y)) * NCKD (Zhao et al. 2022)
    t, s = _logits(7, 17, seed=8), _logits(7, 17, seed=9)
    y = torch.randint(0, 17, (7,), generator=_gen(10))
    tckd, nckd = L.dkd_terms(s, t, y, temperature=T)
    p_y = torch.softmax(t / T, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(tckd + (1 - p_y) * nckd, L.kl_per_position(s, t, temperature=T),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.dkd_loss(s, t, y, temperature=T), tckd + 8.0 * nckd)
    torch.testing.assert_close(L.dkd_loss(s, t, y, T, alpha=0.5, beta=2.0), 0.5 * tckd + 2 * nckd)
    assert (tckd >= -1e-6).all() and (nckd > 0).all()


def _atkd_example():
    # targets 0; row 0: p=[.5,.25,.25], q=[.25,.5,.25] (uncertain -> hard)
    #            row 1: p=[.8,.1,.1],   q=[.8,.05,.15] (confident -> easy)
    #            row 2: garbage, marked invalid
    p = torch.tensor([[.5, .25, .25], [.8, .1, .1], [.01, .01, .98]])
    q = torch.tensor([[.25, .5, .25], [.8, .05, .15], [.98, .01, .01]])
    return p.log(), q.log(), torch.zeros(3, dtype=torch.long), torch.tensor([True, True, False])


def test_atkd_hand_checked_example():
    t, s, y, valid = _atkd_example()
    tckd, nckd = L.dkd_terms(s, t, y)
    # by hand: row 0 TCKD = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3); NCKD: p^=[.5,.5], q^=[2/3,1/3]
    #   -> .5 ln(3/4) + .5 ln(3/2) = .5 ln(9/8); row 1 TCKD = 0, NCKD: p^=[.5,.5], q^=[.25,.75] -> .5 ln(4/3)
    exp_t = torch.tensor([.5 * math.log(4 / 3), 0.0])
    exp_n = torch.tensor([.5 * math.log(9 / 8), .5 * math.log(4 / 3)])
    torch.testing.assert_close(tckd[:2], exp_t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(nckd[:2], exp_n, atol=1e-6, rtol=1e-5)
    # 2 valid rows, hard_frac .5 -> row 0 hard (unc .5), row 1 easy (unc .2)
    want = 0.2 * (.5 * math.log(4 / 3)) + 0.8 * (.5 * math.log(4 / 3) + .5 * math.log(9 / 8))
    got = L.atkd_loss(s, t, y, valid, hard_frac=0.5, lam=0.2)
    assert abs(got.item() - want) < 1e-6
    # swapping lam weights the groups the other way round
    want2 = 0.8 * (.5 * math.log(4 / 3)) + 0.2 * (.5 * math.log(4 / 3) + .5 * math.log(9 / 8))
    assert abs(L.atkd_loss(s, t, y, valid, lam=0.8).item() - want2) < 1e-6
    # the invalid row is ignored whatever it holds
    t2 = t.clone()
    t2[2] = torch.tensor([5.0, -3.0, 1.0])
    assert abs(L.atkd_loss(s, t2, y, valid).item() - want) < 1e-6


def test_atkd_group_means():
    # 4 valid rows, 2 hard: each group is a mean over its own rows
    t, s = _logits(4, 10, seed=11), _logits(4, 10, seed=12)
    y = torch.randint(0, 10, (4,), generator=_gen(13))
    unc = 1 - torch.softmax(t, -1).gather(-1, y[:, None]).squeeze(-1)
    hard = torch.zeros(4, dtype=torch.bool)
    hard[unc.argsort(descending=True)[:2]] = True
    tckd, nckd = L.dkd_terms(s, t, y)
    want = 0.3 * nckd[~hard].mean() + 0.7 * (tckd + nckd)[hard].mean()
    got = L.atkd_loss(s, t, y, torch.ones(4, dtype=torch.bool), hard_frac=0.5, lam=0.3)
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- RS-KD

def test_sample_classes_contract():
    t = _logits(5, 20, seed=14)
    t[:, 7:] = float("-inf")  # only classes 0..6 possible
    u = torch.rand(5, 12, dtype=torch.float64, generator=_gen(15))
    ids, counts = L.sample_classes(t, u)
    assert ids.shape == counts.shape == (5, 12) and ids.dtype == torch.long and counts.dtype == torch.int32
    assert (counts.sum(-1) == 12).all()  # counts of U = 12 draws
    assert (ids[counts > 0] < 7).all()
    assert (ids[counts == 0] == 0).all()
    assert (counts == 0).any()  # 12 draws from 7 classes -> some padding
    for r in range(5):
        kept = ids[r][counts[r] > 0]
        assert kept.unique().numel() == kept.numel() and torch.equal(kept, kept.sort().values)
        assert (counts[r][:kept.numel()] > 0).all()  # unique ids first, padding after
    # deterministic: the same uniforms give the same draws, whatever the chunking
    ids2, counts2 = L.sample_classes(t, u.clone(), chunk_size=2)
    assert torch.equal(ids, ids2) and torch.equal(counts, counts2)
    with pytest.raises(ValueError):
        L.sample_classes(torch.full((2, 4), float("-inf")), torch.rand(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="uniforms"):
        L.sample_classes(t, u[:3])


def test_sample_classes_is_inverse_cdf_in_fp64():
    # draw u is the first class v with u * cdf(V) < cdf(v), the cdf summed in fp64 from fp32 p: the
    # exact rule the cache build used (a CUDA fp32 cumsum over V = 2^17 classes drifts by several)
    V, U = 1 << 17, 64
    t = _logits(3, V, seed=25, scale=0.5)
    u = torch.rand(3, U, dtype=torch.float64, generator=_gen(26))
    ids, counts = L.sample_classes(t, u, temperature=1.3, chunk_size=2)
    cdf = torch.softmax(t / 1.3, -1).cumsum(-1, dtype=torch.float64)
    want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (3, U)
    for r in range(3):
        got_draws = ids[r].repeat_interleave(counts[r].long())
        assert torch.equal(got_draws, want[r].sort().values)


def test_rs_uniforms_are_keyed_by_seed_and_sample_id():
    u = L.rs_uniforms(7, torch.tensor([3, 11]), 5, 4)
    assert u.shape == (2, 5, 4) and u.dtype == torch.float64 and u.device.type == "cpu"
    assert ((u >= 0) & (u < 1)).all()
    # one (seq_len, U) draw per sample from common.generator(seed, "rs-kd", sample_id)
    g = common.generator(7, "rs-kd", 11)
    assert torch.equal(u[1], torch.rand(5, 4, dtype=torch.float64, generator=g))
    # independent of the batch around the sample, different for another seed or sample
    assert torch.equal(L.rs_uniforms(7, [11, 3], 5, 4)[0], u[1])
    assert not torch.equal(L.rs_uniforms(8, [11], 5, 4)[0], u[1]) and not torch.equal(u[0], u[1])
    assert L.rs_uniforms(7, [], 5, 4).shape == (0, 5, 4)


def test_same_seed_sample_and_position_give_same_classes():
    # online RS-KD samples the selected rows of a batch; the cache samples every row of a sample.
    # Both must see the same classes and counts at (seed, sample id, position).
    V, T, U = 50, 6, 8
    logits = {sid: _logits(T, V, seed=sid) for sid in (4, 9, 21)}
    u_cache = L.rs_uniforms(1337, [9], T, U)[0]  # (T, U), the cache builds sample 9 alone
    ids_c, counts_c = L.sample_classes(logits[9], u_cache, chunk_size=4)
    sids = [21, 9, 4]  # a training batch; positions 1 and 4 of sample 9 are selected
    u = L.rs_uniforms(1337, sids, T, U)  # (3, T, U)
    sel = torch.zeros(3, T, dtype=torch.bool)
    sel[1, [1, 4]] = True
    sel[0, 2] = True
    rows = torch.stack([logits[s] for s in sids])[sel]  # (3, V)
    ids_o, counts_o = L.sample_classes(rows, u[sel], chunk_size=1)
    assert torch.equal(ids_o[1:], ids_c[[1, 4]]) and torch.equal(counts_o[1:], counts_c[[1, 4]])


def test_sample_classes_frequencies_match_p():
    t = _logits(2, 6, seed=23, scale=1.0)
    t[1, 2] = float("-inf")
    ids, probs = _sparse(t, 40000, seed=24, chunk_size=1)
    freq = torch.zeros(2, 6).scatter_add_(1, ids, probs)  # padding adds 0 to class 0
    torch.testing.assert_close(freq, torch.softmax(t, -1), atol=1e-2, rtol=0)
    assert freq[1, 2] == 0


@pytest.mark.parametrize("T", [1.0, 0.5, 2.0, 4.0])
def test_rs_kd_with_exact_full_support_equals_kl(T):
    # all V classes kept with probs = softmax(t / T): RS-KD is KL(p || q) at T, tau^2 and 1/T included
    t, s = _logits(4, 9, seed=16), _logits(4, 9, seed=17)
    ids = torch.arange(9).expand(4, 9)
    p = torch.softmax(t / T, -1)
    s_grad = s.clone().requires_grad_(True)
    got = L.rs_kd_loss(s_grad, ids, p, temperature=T)
    torch.testing.assert_close(got, L.kl_per_position(s, t, temperature=T), atol=1e-6, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), s_grad)  # d/ds tau^2 KL = tau (q - p)
    torch.testing.assert_close(g, T * (torch.softmax(s / T, -1) - p), atol=1e-6, rtol=1e-5)
    # padding (prob 0) entries contribute nothing, whatever their id
    ids_pad = torch.cat([ids, torch.full((4, 3), 5)], 1)
    p_pad = torch.cat([p, torch.zeros(4, 3)], 1)
    torch.testing.assert_close(L.rs_kd_loss(s, ids_pad, p_pad, T), L.rs_kd_loss(s, ids, p, T))


def test_rs_kd_gradient_is_unbiased():
    V, U, S = 12, 4, 20000
    t = _logits(1, V, seed=18)
    z = _logits(V, seed=19).requires_grad_(True)
    L.kl_per_position(z[None], t).sum().backward()
    g_full = z.grad.clone()
    assert g_full.abs().max() > 0.05  # student != teacher, so the check is not vacuous
    z.grad = None
    ids, probs = _sparse(t.expand(S, V), U, seed=20)
    L.rs_kd_loss(z.expand(S, V), ids, probs).mean().backward()
    # per-draw std of each component <= sqrt(.25/U) = .25 -> std of the mean < 2e-3
    torch.testing.assert_close(z.grad, g_full, atol=1.5e-2, rtol=0)


# ----------------------------------------------------------------------------- entropy

def test_entropy_and_chunked_entropy_match_dense():
    h = torch.randn(3, 11, 8, generator=_gen(21))
    W = torch.randn(37, 8, generator=_gen(22))
    logits = h @ W.T
    dense = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(L.entropy(logits), dense, atol=1e-5, rtol=1e-5)
    for c in (1, 4, 7, 1000):
        got = L.chunked_entropy(h, W, chunk_size=c)
        assert got.shape == (3, 11) and got.dtype == torch.float32
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    # uniform over V -> log V
    assert abs(L.entropy(torch.zeros(37)).item() - math.log(37)) < 1e-5
    # at a temperature: H(softmax(z / tau)); log_probs is the fp32 log-softmax at tau
    torch.testing.assert_close(L.entropy(logits, 2.0), L.entropy(logits / 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(L.log_probs(logits.bfloat16(), 2.0),
                               torch.log_softmax(logits.bfloat16().float() / 2, -1))
    assert L.log_probs(logits.bfloat16()).dtype == torch.float32


def _entropy64(x, T=1.0):
    """The entropy's defining formula in fp64, 0 log 0 = 0 (NaN for a row with no finite logit)."""
    lq = torch.log_softmax(x.double() / T, -1)
    q = lq.exp()
    return -(q * torch.where(q > 0, lq, 0.0)).sum(-1)


def test_entropy_without_grad_matches_the_definition(monkeypatch):
    # without grad, entropy takes a shortcut (log s - sum_v e (z - m) / s over blocks of rows); it must keep
    # 0 log 0 = 0 for -inf logits, NaN for a row with no finite logit, tau, bf16, and every block boundary
    monkeypatch.setattr(L, "_row_blocks", lambda n, V, device: [(i, min(n, i + 3)) for i in range(0, n, 3)])
    x = _logits(2, 5, 257, seed=24, scale=6.0)
    x[0, 1, 5:] = float("-inf")  # a masked vocabulary
    x[1, 2] = float("-inf")  # no finite logit
    x[1, 3, :] = float("-inf")
    x[1, 3, 7] = 0.0  # one-hot
    for T in (1.0, 0.7, 3.0):
        got = L.entropy(x, T)
        assert got.shape == (2, 5) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), _entropy64(x, T), atol=2e-6, rtol=1e-6, equal_nan=True)
    assert torch.isnan(L.entropy(x)[1, 2]) and L.entropy(x)[1, 3].item() == 0.0
    xb = x.bfloat16()
    torch.testing.assert_close(L.entropy(xb, 2.0), L.entropy(xb.float(), 2.0), equal_nan=True)
    # the gradient path (exact form) still works and agrees
    s = x[0].clone().requires_grad_(True)
    H = L.entropy(s, 1.5)
    (g,) = torch.autograd.grad(H.sum(), s)
    assert not torch.isnan(g).any()
    torch.testing.assert_close(H.detach(), L.entropy(x[0], 1.5), atol=2e-6, rtol=1e-6)


def test_entropy_accuracy_against_fp64():
    # a wide vocabulary: the shortcut stays within 2e-6 nats of fp64 (fp32 log_softmax drifts further)
    x = _logits(4, 40000, seed=25, scale=4.0)
    assert (L.entropy(x).double() - _entropy64(x)).abs().max() < 2e-6


# ----------------------------------------------------------------------------- head_loss

def _rows(N=23, d=8, dt=5, V=31, seed=30, dtype=torch.float32):
    g = _gen(seed)
    h = torch.randn(N, d, generator=g).to(dtype).requires_grad_(True)
    W = (torch.randn(V, d, generator=g) * 0.7).to(dtype).requires_grad_(True)
    ht = torch.randn(N, dt, generator=g).to(dtype)
    Wt = torch.randn(V, dt, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, generator=g) + 0.1
    return h, W, ht, Wt, y, w


def _dense_atkd(t, s, y, w, T, hard_frac=0.5, lam_at=0.2):
    unc = 1 - torch.softmax(t, -1).gather(-1, y[:, None]).squeeze(-1)
    hard = torch.zeros_like(unc, dtype=torch.bool)
    hard[unc.argsort(descending=True)[:math.ceil(hard_frac * len(unc))]] = True
    tckd, nckd = L.dkd_terms(s, t, y, T)
    l_hard = (w * (tckd + nckd))[hard].sum() / w[hard].sum()
    l_easy = (w * nckd)[~hard].sum() / w[~hard].sum()
    return w.sum() * (lam_at * l_easy + (1 - lam_at) * l_hard)


def _dense_head_loss(h, W, y, w, t_logits, loss, T, lam):
    s = h @ W.T  # (N, V): the dense reference does build the full logits
    if loss == "atkd":
        kd_sum = _dense_atkd(t_logits, s, y, w, T)
    else:
        kd_sum = (w * L.LOSSES[loss](s, t_logits, y, T)).sum()
    ce_sum = (w * F.cross_entropy(s, y, reduction="none")).sum()
    return lam * kd_sum + (1 - lam) * ce_sum


@pytest.mark.parametrize("loss,T,lam", [("kl", 1.0, 1.0), ("kl", 2.0, 0.6), ("reverse_kl", 1.5, 1.0),
                                        ("dkd", 1.0, 0.5), ("atkd", 1.0, 1.0), ("atkd", 2.0, 0.7),
                                        ("weighted", 1.0, 1.0), ("kl", 1.0, 0.0)])
def test_head_loss_value_and_grad_parity(loss, T, lam):
    h, W, ht, Wt, y, w = _rows()
    got = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss=loss, temperature=T, lam=lam, chunk_size=5)
    g_h, g_W = torch.autograd.grad(got, [h, W])
    ref = _dense_head_loss(h, W, y, w, ht @ Wt.T, loss, T, lam)
    r_h, r_W = torch.autograd.grad(ref, [h, W])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_h, r_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_W, r_W, atol=1e-5, rtol=1e-5)
    assert g_W.abs().max() > 1e-3


def test_head_loss_backward_scales_with_the_incoming_gradient():
    # train.py backpropagates loss / grad_accum: the fused head must scale its stored grads (and keep them
    # when the incoming gradient is exactly 1, its copy-free fast path)
    h, W, ht, Wt, y, w = _rows()
    one = torch.autograd.grad(L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), chunk_size=5), [h, W])
    third = torch.autograd.grad(L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), chunk_size=5) / 3, [h, W])
    for a, b in zip(one, third):
        torch.testing.assert_close(b, a / 3)
        assert a.abs().max() > 1e-3


def test_head_loss_atkd_equals_atkd_loss_with_uniform_weights():
    h, W, ht, Wt, y, _ = _rows(N=10)
    w = torch.full((10,), 0.1)  # sum 1 -> same scale as atkd_loss
    got = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss="atkd", chunk_size=3)
    want = L.atkd_loss(h @ W.T, ht @ Wt.T, y, torch.ones(10, dtype=torch.bool))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_head_loss_sparse_teacher_parity():
    h, W, ht, Wt, y, w = _rows()
    ids, probs = _sparse(ht @ Wt.T, 6, seed=31)
    got = L.head_loss(h, W, y, w, L.SparseTeacher(ids, probs), lam=0.8, chunk_size=4)
    g = torch.autograd.grad(got, [h, W])
    s = h @ W.T
    ref = (w * (0.8 * L.rs_kd_loss(s, ids, probs) + 0.2 * F.cross_entropy(s, y, reduction="none"))).sum()
    r = torch.autograd.grad(ref, [h, W])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["kl", "weighted"])
def test_head_loss_sparse_full_support_equals_dense_teacher_at_T2(loss):
    # a sparse teacher that keeps all V classes with probs = softmax(t / 2) is the dense teacher at T = 2
    h, W, ht, Wt, y, w = _rows()
    T, V = 2.0, W.shape[0]
    t = ht @ Wt.T
    sparse = L.SparseTeacher(torch.arange(V).expand(len(y), V), torch.softmax(t / T, -1))
    got = L.head_loss(h, W, y, w, sparse, loss=loss, temperature=T, lam=0.7, chunk_size=4)
    ref = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss=loss, temperature=T, lam=0.7, chunk_size=4)
    dense = _dense_head_loss(h, W, y, w, t, "kl", T, 0.7)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [h, W]), torch.autograd.grad(dense, [h, W])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_new_loss_is_one_registry_entry(monkeypatch):
    def jsd(student_logits, teacher_logits, targets, temperature=1.0):
        """Toy loss: Jensen-Shannon divergence per position."""
        lp, lq = L.log_probs(teacher_logits, temperature), L.log_probs(student_logits, temperature)
        lm = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2)
        return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))

    monkeypatch.setitem(L.LOSSES, "jsd", jsd)  # the only change a fork makes
    h, W, ht, Wt, y, w = _rows()
    got = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss="jsd", chunk_size=5)
    torch.testing.assert_close(got, _dense_head_loss(h, W, y, w, ht @ Wt.T, "jsd", 1.0, 1.0))
    assert 0 < got.item() <= math.log(2) * w.sum().item()
    assert L.policy_for("jsd", "top_k") == "top_k" and not L.supports_rs_kd("jsd")


def test_head_loss_matches_dense_masked_loss_over_trunk():
    # a tiny "trunk" so the gradient must flow through h[sel] back to its parameters
    B, T, d_in, d, dt, V, lam = 3, 10, 6, 8, 5, 23, 0.75
    g = _gen(40)
    x = torch.randn(B, T, d_in, generator=g)
    A = torch.randn(d_in, d, generator=g).requires_grad_(True)
    W = torch.randn(V, d, generator=g).requires_grad_(True)
    ht, Wt = torch.randn(B, T, dt, generator=g), torch.randn(V, dt, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g) * (torch.rand(B, T, generator=g) < 0.3)
    weights[1] = 0  # a dropped sequence: it must not count in |I|
    weights[0, 0] = 0.5
    h = torch.tanh(x @ A)  # (B, T, d)
    # dense masked reference: full (B, T, V) logits
    s = h @ W.T
    kd = L.kl_per_position(s, ht @ Wt.T)
    ce = F.cross_entropy(s.reshape(-1, V), y.reshape(-1), reduction="none").reshape(B, T)
    ref = L.selective_kd_loss(kd, weights, ce, lam=lam)
    r_A, r_W = torch.autograd.grad(ref, [A, W])
    # selective head on the selected rows only
    h = torch.tanh(x @ A)
    sel = weights > 0
    wn = L.normalise_by_samples(weights)[sel]
    got = L.head_loss(h[sel], W, y[sel], wn, L.DenseTeacher(ht[sel], Wt), lam=lam, chunk_size=3)
    g_A, g_W = torch.autograd.grad(got, [A, W])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_A, r_A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_W, r_W, atol=1e-5, rtol=1e-5)


def test_normalise_by_samples_divides_by_sequences_not_tokens():
    # Eq. 4: the step loss is a mean over the sequences with any weight (|I| = 2 here), not over the
    # 5 selected tokens nor the 3 rows of the batch
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(L.normalise_by_samples(w), w / 2)
    kd = torch.tensor([[1.0, 3.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0], [4.0, 4.0, 4.0, 4.0]])
    assert L.selective_kd_loss(kd, w).item() == pytest.approx((2.0 + 4.0) / 2)
    assert torch.equal(L.normalise_by_samples(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_selective_kd_loss_hand_example():
    kd = torch.tensor([[1.0, 2.0, float("nan")], [5.0, 5.0, 5.0], [3.0, 4.0, 6.0]])
    ce = torch.tensor([[10.0, 20.0, 30.0], [1.0, 1.0, 1.0], [2.0, 2.0, float("inf")]])
    w = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # |I| = 2 (row 1 has no weight); NaN/inf only at weight-0 positions
    want = (1.0 * (.5 * 1 + .5 * 10) + .5 * (.5 * 2 + .5 * 20) + 1.0 * (.5 * 4 + .5 * 2)) / 2
    assert abs(L.selective_kd_loss(kd, w, ce, lam=0.5).item() - want) < 1e-6
    assert abs(L.selective_kd_loss(kd, w).item() - (1 + 1 + 4) / 2) < 1e-6


def test_head_loss_no_grad_path_matches():
    h, W, ht, Wt, y, w = _rows()
    with_grad = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss="dkd", lam=0.5, chunk_size=6)
    with torch.no_grad():
        no_grad = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss="dkd", lam=0.5, chunk_size=6)
    assert no_grad.grad_fn is None
    torch.testing.assert_close(no_grad, with_grad.detach())


def _chunk_by_autograd(z, y, kd_coef, ce_coef, T, t=None, ids=None, probs=None):
    """head_loss's chunk_loss (where-weighted forward KL or RS-KD plus CE) and its grad wrt z, by autograd."""
    z = z.clone().requires_grad_(True)
    out = z.new_zeros(())
    if kd_coef is not None:
        kd = L.kl_per_position(z, t, y, T) if ids is None else L.rs_kd_loss(z, ids, probs, T)
        out = out + torch.where(kd_coef > 0, kd_coef * kd, 0.0).sum()
    if ce_coef is not None:
        out = out + torch.where(ce_coef > 0, ce_coef * L.ce_per_position(z, None, y), 0.0).sum()
    (g,) = torch.autograd.grad(out, z)
    return out.detach(), g


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("T", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_closed_form_chunk_matches_autograd(monkeypatch, kind, T, lam):
    # d/dz tau^2 KL(p || softmax(z / tau)) = tau (S q - p), d/dz CE = softmax(z) - onehot(y): value and grad
    # of a chunk as autograd gets them, incl. weight-0 rows with an infinite loss and classes with p = 0
    monkeypatch.setattr(L, "_row_blocks", lambda n, V, device: [(i, min(n, i + 4)) for i in range(0, n, 4)])
    c, V = 11, 97
    z, t = _logits(c, V, seed=80, scale=3.0), _logits(c, V, seed=81, scale=3.0)
    y = torch.randint(0, V, (c,), generator=_gen(82))
    w = torch.rand(c, generator=_gen(83)) + 0.1
    w[[2, 7]] = 0.0
    w[10] = -0.5  # a weight <= 0 adds nothing either (chunk_loss's `where`)
    z[2, 3] = float("-inf")  # q = 0 where p > 0: KL = inf on a weight-0 row, which must add nothing
    z[7, y[7]] = float("-inf")  # CE = inf on a weight-0 row
    z[5, 40:50] = -1e4  # q underflows to 0 on a kept row
    t[4, 10:20] = -1e4  # p = 0 (finite logits)
    ids = probs = None
    if kind == "sparse":
        ids, probs = _sparse(t, 6, seed=84, temperature=T)
        ids = torch.cat([ids, torch.full((c, 2), 3)], 1)  # padding (prob 0), at row 2's -inf logit too
        probs = torch.cat([probs, torch.zeros(c, 2)], 1)
        probs[1] *= 0.75  # rs_kd_loss takes any probs: its grad is tau (S q - p~) with S = sum p~ = 0.75 here
    kd_coef = lam * w if lam > 0 else None
    ce_coef = (1 - lam) * w if lam < 1 else None
    t_dense = t.clone() if kind == "dense" else None  # overwritten, as z
    got = L._forward_kl_ce_grad(z.clone(), y, kd_coef, ce_coef, T, t_dense, ids, probs)
    assert got is not None
    ref = _chunk_by_autograd(z, y, kd_coef, ce_coef, T, t, ids, probs)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(got[0]) and torch.equal(got[1][[2, 7, 10]], torch.zeros(3, V))
    assert got[1].abs().max() > 0.01


def test_closed_form_leaves_masked_teacher_vocab_to_autograd():
    # a -inf teacher logit (p = 0) is 0 * -inf in the closed form's KL: it says so (None), and head_loss then
    # takes autograd for that chunk, which gives the dense reference
    z, t = _logits(3, 20, seed=85), _logits(3, 20, seed=86)
    t[1, 4] = float("-inf")
    y, w = torch.tensor([1, 2, 3]), torch.ones(3)
    assert L._forward_kl_ce_grad(z.clone(), y, w, None, 1.0, t.clone()) is None
    h, W, ht, Wt, y, w = _rows(V=41)
    Wt, ht = Wt.clone(), ht.clone()
    Wt[7] = 0.0
    Wt[7, 0] = float("-inf")  # teacher logit of class 7 is -inf on every row with ht[:, 0] > 0
    ht[:, 0] = ht[:, 0].abs() + 0.1
    got = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), temperature=2.0, lam=0.5, chunk_size=5)
    ref = _dense_head_loss(h, W, y, w, ht @ Wt.T, "kl", 2.0, 0.5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [h, W]), torch.autograd.grad(ref, [h, W])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("teacher_kind,loss", [("dense", "kl"), ("dense", "weighted"), ("sparse", "kl")])
@pytest.mark.parametrize("T", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_head_loss_closed_form_matches_autograd_path(monkeypatch, teacher_kind, loss, T, lam):
    # the fused head's closed form vs its autograd path (the closed form switched off) vs the dense reference:
    # the value and the grads of h and W
    h, W, ht, Wt, y, w = _rows(V=211)
    w[[0, 9]] = 0.0  # weight-0 rows add nothing
    if teacher_kind == "dense":
        teacher = L.DenseTeacher(ht, Wt)
    else:
        ids, probs = _sparse(ht @ Wt.T, 8, seed=87, temperature=T)
        teacher = L.SparseTeacher(ids, probs)
    closed, calls = L._forward_kl_ce_grad, []
    monkeypatch.setattr(L, "_forward_kl_ce_grad", lambda *a: calls.append(1) or closed(*a))

    def run():
        out = L.head_loss(h, W, y, w, teacher, loss=loss, temperature=T, lam=lam, chunk_size=7)
        return (out, *torch.autograd.grad(out, [h, W]))

    got = run()
    assert len(calls) == 4  # ceil(23 / 7) chunks, every one in closed form
    monkeypatch.setattr(L, "_forward_kl_ce_grad", lambda *a: None)  # autograd for every chunk
    by_autograd = run()
    s = h @ W.T
    if teacher_kind == "dense":
        dense = _dense_head_loss(h, W, y, w, ht @ Wt.T, loss, T, lam)
    else:
        ce = F.cross_entropy(s, y, reduction="none")
        dense = (w * (lam * L.rs_kd_loss(s, ids, probs, T) + (1 - lam) * ce)).sum()
    dense = (dense, *torch.autograd.grad(dense, [h, W]))
    for a, b, c in zip(got, by_autograd, dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert got[2].abs().max() > 1e-3 and torch.equal(got[1][[0, 9]], torch.zeros(2, h.shape[1]))


@pytest.mark.parametrize("loss", ["reverse_kl", "dkd", "atkd"])
def test_head_loss_closed_form_only_for_forward_kl(monkeypatch, loss):
    # any loss not marked forward_kl goes through autograd; forward KL, RS-KD and pure CE (lam = 0) do not
    calls = []
    monkeypatch.setattr(L, "_forward_kl_ce_grad", lambda *a: calls.append(1))  # None: autograd decides
    h, W, ht, Wt, y, w = _rows()
    L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss=loss, lam=0.5, chunk_size=5).backward()
    assert not calls and not getattr(L.LOSSES[loss], "forward_kl", False)
    L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss=loss, lam=0.0, chunk_size=5).backward()
    assert len(calls) == 5
    assert L.kl_per_position.forward_kl and L.weighted_kd.forward_kl


# ----------------------------------------------------------------------------- memory

B_, T_, D_, V_, C_ = 4, 30, 8, 101, 16  # N = 120 rows; D_ <= C_ so (V, d) < C_ x V elements


def _mem_case(seed=50):
    h, W, ht, Wt, y, w = _rows(N=B_ * T_, d=D_, dt=6, V=V_, seed=seed)
    return h, W, L.DenseTeacher(ht, Wt), y, w


@pytest.mark.parametrize("loss", ["kl", "atkd"])
def test_head_loss_saved_tensors_are_chunk_sized(loss):
    h, W, teacher, y, w = _mem_case()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = L.head_loss(h, W, y, w, teacher, loss=loss, lam=0.5, chunk_size=C_)
    out.backward()
    assert shapes and all(math.prod(s) <= C_ * V_ for s in shapes), max(shapes, key=math.prod)
    assert h.grad is not None and W.grad is not None
    # the same probe does see the (N, V) tensors of the dense computation
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _dense_head_loss(h, W, y, w, teacher.hidden @ teacher.head.T, loss, 1.0, 0.5)
    assert max(math.prod(s) for s in shapes) >= B_ * T_ * V_


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_selective_path_never_builds_BTV(teacher_kind):
    h, W, teacher, y, w = _mem_case(seed=51)
    if teacher_kind == "sparse":
        ids, probs = _sparse(teacher.hidden @ teacher.head.T, 8, seed=52)
        teacher = L.SparseTeacher(ids, probs)
    rec = _MaxNumel()
    with rec:
        out = L.head_loss(h, W, y, w, teacher, loss="kl", lam=0.9, chunk_size=C_)
        out.backward()
        ent = L.chunked_entropy(h.detach().reshape(B_, T_, D_), W.detach(), chunk_size=C_)
    assert ent.shape == (B_, T_)
    assert rec.max_numel == C_ * V_, rec.max_numel  # it saw the chunk logits, nothing bigger
    assert not any(s[-1:] == (V_,) and math.prod(s) > C_ * V_ for s in rec.shapes)
    # sanity: the probe catches a dense (B*T, V) logits tensor
    dense = _MaxNumel()
    with dense:
        _ = h @ W.T
    assert dense.max_numel == B_ * T_ * V_


def test_fused_head_peak_is_weight_grad_plus_one_chunk():
    """In one chunk, the teacher's scratch dies before the (V, d) weight gradient is made, so the live
    peak is grad W + the chunk's logits (+ grad h), not grad W + student + teacher logits + a temporary.
    Live bytes counted by bench/selective_head.py's Tracker (every storage an op makes, until freed)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from selective_head import Tracker
    g = torch.Generator().manual_seed(61)
    N, d, V = 64, 256, 4096  # grad W (V, d) = 4 MB; a chunk's logits (N, V) = 1 MB
    h = torch.randn(N, d, generator=g).requires_grad_(True)
    W = (torch.randn(V, d, generator=g) * 0.05).requires_grad_(True)
    teacher = L.DenseTeacher(torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) * 0.05)
    y, w = torch.randint(0, V, (N,), generator=g), torch.full((N,), 1.0 / N)
    with Tracker(V) as tr:
        L.head_loss(h, W, y, w, teacher, chunk_size=N).backward()
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
    per chunk, a (V, d) copy each: 0.4 s of a 2.9 s bf16 CPU step), with the values of autocast's per-chunk casts."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import selection
    g = torch.Generator().manual_seed(62)
    N, d, V, chunk = 12, 8, 40, 3  # 4 chunks
    h, W = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)
    teacher = L.DenseTeacher(torch.randn(N, d, generator=g), torch.randn(V, d, generator=g))
    y, w = torch.randint(0, V, (N,), generator=g), torch.full((N,), 1.0 / N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_H = torch.cat([L.entropy(h[i:i + chunk] @ W.T) for i in range(0, N, chunk)])  # autocast's casts
        with _HeadCasts(W.shape) as casts:
            H = L.chunked_entropy(h, W, chunk)
        assert casts.n == 1 and torch.equal(H, ref_H)
        with _HeadCasts(W.shape) as casts:
            S = selection.chunked_scores("student_entropy", h[None], W, y[None], chunk_size=chunk)
        assert casts.n == 1 and torch.equal(S[0], ref_H)
        hs, Ws = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with _HeadCasts(W.shape) as casts:
            loss = L.head_loss(hs, Ws, y, w, teacher, chunk_size=chunk)
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


# ----------------------------------------------------------------------------- edge cases

def test_empty_selection():
    W = torch.randn(11, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    teacher = L.DenseTeacher(torch.zeros(0, 3), torch.randn(11, 3))
    for loss in ("kl", "atkd", "dkd"):
        out = L.head_loss(h, W, torch.zeros(0, dtype=torch.long), torch.zeros(0), teacher, loss=loss, lam=0.5)
        assert out.item() == 0.0 and out.grad_fn is not None
        out.backward()
        assert torch.equal(W.grad, torch.zeros_like(W))
        W.grad = None
    sparse = L.SparseTeacher(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5))
    out = L.head_loss(h, W, torch.zeros(0, dtype=torch.long), torch.zeros(0), sparse)
    out.backward()
    assert out.item() == 0.0 and torch.equal(W.grad, torch.zeros_like(W))
    # empty rows for the plain functions and the dense path
    e = torch.zeros(0, 7)
    assert L.kl_per_position(e, e).shape == (0,)
    assert L.atkd_loss(e, e, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)).item() == 0
    assert L.selective_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0
    assert L.chunked_entropy(torch.zeros(0, 5, 4), W.detach(), 8).shape == (0, 5)
    ids, counts = L.sample_classes(torch.zeros(0, 7), torch.zeros(0, 3, dtype=torch.float64))
    assert ids.shape == counts.shape == (0, 3)


def test_no_nan_with_inf_logits():
    t, s = _logits(6, 10, seed=60), _logits(6, 10, seed=61)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[:, 6:] = True  # a masked vocabulary, on both sides
    mask[0, 1:] = True  # row 0: teacher and student certain of class 0
    t, s = t.masked_fill(mask, float("-inf")), s.masked_fill(mask, float("-inf"))
    s.requires_grad_(True)
    y = torch.zeros(6, dtype=torch.long)
    y[1:] = torch.randint(0, 6, (5,), generator=_gen(62))
    outs = [L.kl_per_position(s, t), L.reverse_kl_per_position(s, t), L.dkd_loss(s, t, y),
            L.entropy(s), L.ce_per_position(s, None, y), L.LOSSES["atkd"](s, t, y),
            L.atkd_loss(s, t, y, torch.ones(6, dtype=torch.bool))[None]]
    for o in outs:
        assert torch.isfinite(o).all()
        (g,) = torch.autograd.grad(o.sum(), s)
        assert not torch.isnan(g).any()
    assert L.kl_per_position(s, t)[0].abs() < 1e-6  # identical one-hots
    # finite part still matches the reference on the unmasked classes
    ref = L.kl_per_position(s[1:, :6], t[1:, :6])
    torch.testing.assert_close(L.kl_per_position(s, t)[1:], ref)
    ids, probs = _sparse(t, 5, seed=63)
    assert (ids[probs > 0] < 6).all() and torch.isfinite(L.rs_kd_loss(s, ids, probs)).all()


def test_bf16_inputs():
    t, s = _logits(5, 12, seed=70).bfloat16(), _logits(5, 12, seed=71).bfloat16()
    y = torch.randint(0, 12, (5,), generator=_gen(72))
    for name, fn in [*L.LOSSES.items(), ("ce", L.ce_per_position)]:
        got = fn(s, t, y, 2.0)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, fn(s.float(), t.float(), y, 2.0), atol=1e-6, rtol=1e-5)
    h, W, ht, Wt, y, w = _rows(dtype=torch.bfloat16)
    out = L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt), loss="dkd", lam=0.5, chunk_size=4)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert h.grad.dtype == W.grad.dtype == torch.bfloat16
    assert torch.isfinite(h.grad.float()).all() and torch.isfinite(W.grad.float()).all()
    h32, W32 = h.detach().float().requires_grad_(True), W.detach().float().requires_grad_(True)
    ref = _dense_head_loss(h32, W32, y, w, ht.float() @ Wt.float().T, "dkd", 1.0, 0.5)
    ref.backward()
    torch.testing.assert_close(out, ref.detach(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(W.grad.float(), W32.grad, atol=0.05, rtol=0.05)
    ent = L.chunked_entropy(h.detach()[None], W.detach(), 4)
    assert ent.dtype == torch.float32 and torch.isfinite(ent).all()


def test_bad_inputs_raise_clear_errors():
    h, W, ht, Wt, y, w = _rows(N=6)
    dense, sparse = L.DenseTeacher(ht, Wt), L.SparseTeacher(*_sparse(ht @ Wt.T, 4))
    with pytest.raises(ValueError, match="--loss"):
        L.head_loss(h, W, y, w, sparse, loss="dkd")
    with pytest.raises(ValueError, match="--loss"):
        L.head_loss(h, W, y, w, dense, loss="mse")
    with pytest.raises(ValueError, match="teacher"):
        L.head_loss(h, W, y, w, None)
    with pytest.raises(ValueError, match="targets"):
        L.head_loss(h, W, torch.full((6,), 999), w, dense)
    with pytest.raises(ValueError, match="DenseTeacher"):
        L.head_loss(h, W, y, w, L.DenseTeacher(ht, Wt[:-1]))
    with pytest.raises(ValueError, match="--lam"):
        L.head_loss(h, W, y, w, dense, lam=1.5)
    # lam = 0 (pure CE) needs no teacher
    out = L.head_loss(h, W, y, w, None, lam=0.0)
    torch.testing.assert_close(out, (w * F.cross_entropy(h @ W.T, y, reduction="none")).sum())
