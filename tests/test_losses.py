"""Tests for losses.py: objectives against references, memory-lean paths against dense ones."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))  # after the root: bench/cache.py must not shadow cache.py
import common  # noqa: E402
import fused_head  # noqa: E402
import losses as L  # noqa: E402
from selective_head import Tracker  # noqa: E402

HEADS = sorted(fused_head.HEADS)  # every head_loss test runs on the plain path and on the fast one


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


def test_reverse_kl_at_T2_is_T_squared_times_the_formula():
    # written out: T^2 sum_v q (log q - log p) with q = softmax(s / T), p = softmax(t / T), in fp64
    t, s = _logits(4, 9, seed=3), _logits(4, 9, seed=4)
    lq, lp = torch.log_softmax(s.double() / 2, -1), torch.log_softmax(t.double() / 2, -1)
    want = 4 * (lq.exp() * (lq - lp)).sum(-1)
    torch.testing.assert_close(L.reverse_kl_per_position(s, t, temperature=2.0).double(), want,
                               atol=1e-6, rtol=1e-5)
    assert (want > 1e-3).all()


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


def test_sample_classes_never_draws_a_zero_probability_class_at_a_cdf_boundary():
    # u * cdf(V) exactly on a boundary: u = 0 with p(0) = 0, and u = cdf(v) before a class with p = 0 (and at
    # the end of the cdf); the draw is the first class whose cdf exceeds u, never one with p = 0
    NEG = float("-inf")
    t = torch.tensor([[NEG, 0.0, 0.0],          # p = [0, .5, .5]
                      [0.0, NEG, 0.0],          # p = [.5, 0, .5]
                      [0.0, 0.0, NEG],          # p = [.5, .5, 0]
                      [NEG, NEG, 0.0]])         # p = [0, 0, 1]
    u = torch.tensor([[0.0, 0.5], [0.5, 0.0], [0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    ids, counts = L.sample_classes(t, u)
    drawn = [ids[r].repeat_interleave(counts[r].long()).tolist() for r in range(4)]
    assert drawn == [[1, 2], [0, 2], [0, 1], [2, 2]], drawn
    p = torch.softmax(t, -1)
    assert all(p[r, v] > 0 for r in range(4) for v in drawn[r])


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


def test_sparse_kl_is_the_one_rs_kd_kl():
    # sum_u p~_u (log p~_u - lq_u), no tau^2; entries with p~ = 0 add exactly 0 (value and gradient), even at
    # lq = -inf; rs_kd_loss is sparse_kl of the student's log-probs at the ids, times tau^2
    lq = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -3.0]], requires_grad=True)
    probs = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.0, 0.5]])
    got = L.sparse_kl(lq, probs)
    want = torch.tensor([0.75 * (math.log(0.75) + 1) + 0.25 * (math.log(0.25) + 2),
                         0.5 * (math.log(0.5) + 0.5) + 0.5 * (math.log(0.5) + 3)])
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got.sum(), lq)
    assert torch.equal(g, torch.tensor([[-0.75, -0.25, 0.0], [-0.5, 0.0, -0.5]]))
    s, ids = _logits(3, 9, seed=27), torch.randint(0, 9, (3, 4), generator=_gen(28))
    pr = torch.rand(3, 4, generator=_gen(29)) * (torch.rand(3, 4, generator=_gen(30)) > 0.3)
    torch.testing.assert_close(L.rs_kd_loss(s, ids, pr, 2.0),
                               4 * L.sparse_kl(L.log_probs(s, 2.0).gather(-1, ids), pr))


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


def test_ceil_fraction_is_exact():
    assert 0.28 * 25 > 7 and math.ceil(0.28 * 25) == 8  # the float trap
    assert L.ceil_fraction(0.28, 25) == 7 and L.ceil_fraction(0.5, 5) == 3 and L.ceil_fraction(0.2, 7) == 2
    assert L.ceil_fraction(1.0, 13) == 13 and L.ceil_fraction(0.3, 0) == 0 and L.ceil_fraction(0.5, 4) == 2
    assert torch.equal(L.ceil_fraction(0.6, torch.tensor([25, 10, 0])), torch.tensor([15, 6, 0]))
    assert L.decimal_fraction(0.28) == (7, 25)


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
@pytest.mark.parametrize("head", HEADS)
def test_head_loss_value_and_grad_parity(head, loss, T, lam):
    h, W, ht, Wt, y, w = _rows()
    got = fused_head.HEADS[head](h, W, y, w, L.DenseTeacher(ht, Wt), loss=loss, temperature=T, lam=lam,
                                 chunk_size=5)
    g_h, g_W = torch.autograd.grad(got, [h, W])
    ref = _dense_head_loss(h, W, y, w, ht @ Wt.T, loss, T, lam)
    r_h, r_W = torch.autograd.grad(ref, [h, W])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_h, r_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_W, r_W, atol=1e-5, rtol=1e-5)
    assert g_W.abs().max() > 1e-3


@pytest.mark.parametrize("head", HEADS)
def test_lam_weighs_kd_and_ce_as_written(head):
    # L = lam * KD + (1 - lam) * CE at lam = 0.3, written out (a swapped lam gives 0.7 KD + 0.3 CE)
    h, W, ht, Wt, y, w = _rows()
    s, t = h @ W.T, ht @ Wt.T
    kd, ce = L.kl_per_position(s, t), F.cross_entropy(s, y, reduction="none")  # (N,)
    want = 0.3 * (w * kd).sum() + 0.7 * (w * ce).sum()
    assert abs((w * kd).sum() - (w * ce).sum()) > 0.1  # so a swap shows
    got = fused_head.HEADS[head](h, W, y, w, L.DenseTeacher(ht, Wt), lam=0.3, chunk_size=5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [h, W]), torch.autograd.grad(want, [h, W])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    w_bt, kd_bt, ce_bt = w.detach()[None], kd.detach()[None], ce.detach()[None]  # one sequence: |I| = 1
    torch.testing.assert_close(L.selective_kd_loss(kd_bt, w_bt, ce_bt, lam=0.3), want.detach(),
                               atol=1e-5, rtol=1e-5)


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
    one = torch.tensor([[0.0, 0.0], [0.3, 0.2]])  # one sequence with weight: |I| = 1, the weights as they are
    assert torch.equal(L.normalise_by_samples(one), one)


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


# ----------------------------------------------------------------------------- memory

B_, T_, D_, V_, C_ = 4, 30, 8, 101, 16  # N = 120 rows; D_ <= C_ so (V, d) < C_ x V elements


def _mem_case(seed=50):
    h, W, ht, Wt, y, w = _rows(N=B_ * T_, d=D_, dt=6, V=V_, seed=seed)
    return h, W, L.DenseTeacher(ht, Wt), y, w


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


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_selective_path_never_builds_BTV(head, teacher_kind):
    h, W, teacher, y, w = _mem_case(seed=51)
    if teacher_kind == "sparse":
        ids, probs = _sparse(teacher.hidden @ teacher.head.T, 8, seed=52)
        teacher = L.SparseTeacher(ids, probs)
    rec = _MaxNumel()
    with rec:
        out = fused_head.HEADS[head](h, W, y, w, teacher, loss="kl", lam=0.9, chunk_size=C_)
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


@pytest.mark.parametrize("loss", ["kl", "dkd"])
def test_plain_head_keeps_no_logits_for_backward(loss):
    # each chunk is checkpointed: between forward and backward no (c, V) tensor is alive (backward
    # recomputes them), while the same loss by autograd over the chunks keeps some for every chunk
    h, W, teacher, y, w = _mem_case(seed=53)
    with Tracker(V_) as tr:
        out = L.head_loss(h, W, y, w, teacher, loss=loss, chunk_size=C_)
        kept = tr.cur_logits
        out.backward()
    assert kept == 0 and tr.max_logits > 0, (kept, tr.max_logits)

    def chunk(i0, i1):  # the same chunk without a checkpoint: autograd keeps its (c, V) tensors for backward
        z, t = h[i0:i1] @ W.T, teacher.hidden[i0:i1] @ teacher.head.T
        return (w[i0:i1] * L.LOSSES[loss](z, t, y[i0:i1])).sum()

    with Tracker(V_) as tr:  # the probe does see them
        ref = sum(chunk(i0, i1) for i0, i1 in common.row_chunks(len(y), C_))
        assert tr.cur_logits > 4 * C_ * V_
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("head", HEADS)
def test_empty_selection(head):
    head_loss = fused_head.HEADS[head]
    W = torch.randn(11, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    teacher = L.DenseTeacher(torch.zeros(0, 3), torch.randn(11, 3))
    for loss in ("kl", "atkd", "dkd"):
        out = head_loss(h, W, torch.zeros(0, dtype=torch.long), torch.zeros(0), teacher, loss=loss, lam=0.5)
        assert out.item() == 0.0 and out.grad_fn is not None
        out.backward()
        assert torch.equal(W.grad, torch.zeros_like(W))
        W.grad = None
    sparse = L.SparseTeacher(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5))
    out = head_loss(h, W, torch.zeros(0, dtype=torch.long), torch.zeros(0), sparse)
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


@pytest.mark.parametrize("head", HEADS)
def test_bf16_inputs(head):
    t, s = _logits(5, 12, seed=70).bfloat16(), _logits(5, 12, seed=71).bfloat16()
    y = torch.randint(0, 12, (5,), generator=_gen(72))
    for name, fn in [*L.LOSSES.items(), ("ce", L.ce_per_position)]:
        got = fn(s, t, y, 2.0)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, fn(s.float(), t.float(), y, 2.0), atol=1e-6, rtol=1e-5)
    h, W, ht, Wt, y, w = _rows(dtype=torch.bfloat16)
    out = fused_head.HEADS[head](h, W, y, w, L.DenseTeacher(ht, Wt), loss="dkd", lam=0.5, chunk_size=4)
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


@pytest.mark.parametrize("head", HEADS)
def test_bad_inputs_raise_clear_errors(head):
    head_loss = fused_head.HEADS[head]
    h, W, ht, Wt, y, w = _rows(N=6)
    dense, sparse = L.DenseTeacher(ht, Wt), L.SparseTeacher(*_sparse(ht @ Wt.T, 4))
    with pytest.raises(ValueError, match="--loss"):
        head_loss(h, W, y, w, sparse, loss="dkd")
    with pytest.raises(ValueError, match="--loss"):
        head_loss(h, W, y, w, dense, loss="mse")
    with pytest.raises(ValueError, match="teacher"):
        head_loss(h, W, y, w, None)
    with pytest.raises(ValueError, match="targets"):
        head_loss(h, W, torch.full((6,), 999), w, dense)
    with pytest.raises(ValueError, match="DenseTeacher"):
        head_loss(h, W, y, w, L.DenseTeacher(ht, Wt[:-1]))
    with pytest.raises(ValueError, match="--lam"):
        head_loss(h, W, y, w, dense, lam=1.5)
    with pytest.raises(ValueError, match="temperature"):
        head_loss(h, W, y, w, dense, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        head_loss(h, W, y, w, dense, chunk_size=0)
    # lam = 0 (pure CE) needs no teacher
    out = head_loss(h, W, y, w, None, lam=0.0)
    torch.testing.assert_close(out, (w * F.cross_entropy(h @ W.T, y, reduction="none")).sum())
