"""Tests for selection.py: every metric against a dense fp64 computation, exact budgets under
padding, the unbiasedness of position RS (Appendix A) by Monte Carlo, GLS's quantile threshold,
the curriculum's ends, sample selection and the chunked (no (B, T, V) logits) scoring path."""

import functools
import math
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import fused_head  # noqa: E402
import losses  # noqa: E402
import selection as S  # noqa: E402

ALL_METRICS = ["student_entropy", "teacher_entropy", "student_ce", "teacher_ce", "kl", "reverse_kl",
               "kl_student_entropy", "ce_ratio", "ce_ratio_student_entropy", "random"]
ALL_POLICIES = ["top_k", "gls", "curriculum", "pos_rs", "pos_rs_star", "random"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def call(name, scores, valid, k, seed=0, progress=0.5, state=None, temperature=1.0):
    """Call a policy the way train.py does: every keyword, used or not."""
    state = S.GLSQueue() if state is None else state
    return S.POLICIES[name](scores, valid, k, generator=gen(seed), progress=progress, state=state,
                            temperature=temperature)


def ceil_exact(k, n):
    # reference budget with exact decimal arithmetic, independent of selection.py's integer trick
    return max(math.ceil(Fraction(str(k)) * n), 1) if n > 0 else 0


def holey_valid(B, T, seed):
    """Valid masks with holes anywhere (not just right padding), including an empty and a full row."""
    g = gen(seed)
    v = torch.rand(B, T, generator=g) < 0.6
    v[0] = True
    v[1] = False
    return v


# ----------------------------------------------------------------------------- metrics


def dense_reference(name, s, t, y):
    """Table 1 metrics written directly from their formulas, in float64."""
    s, t = s.double(), t.double()
    q = torch.exp(s - s.max(-1, keepdim=True).values)
    q = q / q.sum(-1, keepdim=True)
    p = torch.exp(t - t.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    Hq = -(q * q.log()).sum(-1)
    Hp = -(p * p.log()).sum(-1)
    ces = -q.gather(-1, y[..., None]).squeeze(-1).log()
    cet = -p.gather(-1, y[..., None]).squeeze(-1).log()
    klf = (p * (p.log() - q.log())).sum(-1)
    klr = (q * (q.log() - p.log())).sum(-1)
    ratio = ces / cet.clamp(min=1e-6)
    return {"student_entropy": Hq, "teacher_entropy": Hp, "student_ce": ces, "teacher_ce": cet,
            "kl": klf, "reverse_kl": klr, "kl_student_entropy": klf + Hq, "ce_ratio": ratio,
            "ce_ratio_student_entropy": ratio + Hq}[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [m for m in ALL_METRICS if m != "random"])
def test_metric_equals_dense_reference(name, dtype):
    g = gen(1)
    V = 37
    s = (torch.randn(2, 3, 5, V, generator=g) * 3).to(dtype)  # 3 leading dims: any leading shape works
    t = (torch.randn(2, 3, 5, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (2, 3, 5), generator=g)
    out = S.METRICS[name](s, t, y)
    assert out.dtype == torch.float32 and out.shape == y.shape
    ref = dense_reference(name, s, t, y)  # reference reads the same (rounded) low-precision values
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_student_only_metrics_take_no_teacher_and_teacher_metrics_refuse_none():
    g = gen(2)
    s, y = torch.randn(2, 4, 11, generator=g), torch.randint(0, 11, (2, 4), generator=g)
    for name in ALL_METRICS:
        if S.needs_teacher(name):
            with pytest.raises(ValueError, match="teacher_logits"):
                S.METRICS[name](s, None, y)
        else:
            assert S.METRICS[name](s, None, y).shape == (2, 4)


def test_needs_teacher():
    assert {m for m in ALL_METRICS if not S.needs_teacher(m)} == {"student_entropy", "student_ce", "random"}
    with pytest.raises(ValueError, match="unknown metric"):
        S.needs_teacher("entropy")


def test_what_a_metric_reads_is_its_own_tag(monkeypatch):
    # a new metric reads the student only; tagged reads_teacher it gets teacher logits too, and tagged
    # reads_student = False it gets no student logits (no student hidden states needed)
    hs, Ws, y, ht, Wt = _hidden(28)
    seen = []

    def margin(student_logits, teacher_logits, targets, generator=None):
        seen.append((student_logits is not None, teacher_logits is not None))
        t = teacher_logits if teacher_logits is not None else student_logits
        return t.float().max(-1).values

    monkeypatch.setitem(S.METRICS, "margin", margin)
    assert not S.needs_teacher("margin")
    S.chunked_scores("margin", hs, Ws, y, chunk_size=8)
    assert set(seen) == {(True, False)}
    monkeypatch.setattr(margin, "reads_teacher", True, raising=False)
    monkeypatch.setattr(margin, "reads_student", False, raising=False)
    seen.clear()
    assert S.needs_teacher("margin")
    out = S.chunked_scores("margin", None, None, y, ht, Wt, chunk_size=8)
    assert set(seen) == {(False, True)}
    torch.testing.assert_close(out, (ht @ Wt.T).max(-1).values)


def test_registries_have_the_public_keys():
    assert set(S.METRICS) == set(ALL_METRICS)
    assert set(ALL_POLICIES) | {"weighted"} == set(S.POLICIES)


def test_entropy_hand_values_and_masked_vocab():
    V = 8
    uniform = torch.zeros(1, V)
    H = S.METRICS["student_entropy"](uniform, None, torch.zeros(1, dtype=torch.long)).item()
    assert H == pytest.approx(math.log(V), rel=1e-6)
    # -inf logits (a masked vocabulary) must give 0 log 0 = 0, not NaN
    onehot = torch.full((1, V), -math.inf)
    onehot[0, 3] = 0.0
    y = torch.tensor([3])
    assert S.METRICS["student_entropy"](onehot, None, y).item() == 0.0
    assert S.METRICS["kl"](torch.zeros(1, V), onehot, y).item() == pytest.approx(math.log(V), rel=1e-6)


def test_ce_ratio_guard_and_ignored_targets():
    V = 5
    s = torch.zeros(1, V)  # CE_s = log 5
    t = torch.full((1, V), -1e4)
    t[0, 2] = 1e4  # teacher certain of y: CE_t = 0 in fp32
    y = torch.tensor([2])
    r = S.METRICS["ce_ratio"](s, t, y)
    assert torch.isfinite(r).all()
    assert S.CE_EPS == 1e-6  # the documented guard
    assert r.item() == pytest.approx(math.log(V) / S.CE_EPS, rel=1e-5)
    # an out-of-vocabulary target (ignore_index) scores CE 0 instead of raising
    y_ign = torch.tensor([-100])
    assert S.METRICS["student_ce"](s, None, y_ign).item() == 0.0
    assert S.METRICS["ce_ratio"](s, t, y_ign).item() == 0.0


def test_random_metric_is_uniform_seeded_and_ignores_logits():
    y = torch.zeros(4, 50, dtype=torch.long)
    a = S.METRICS["random"](None, None, y, generator=gen(3))
    b = S.METRICS["random"](torch.randn(4, 50, 7), None, y, generator=gen(3))
    c = S.METRICS["random"](None, None, y, generator=gen(4))
    assert a.dtype == torch.float32 and a.shape == (4, 50)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and (a < 1).all()


def test_metrics_use_the_one_entropy_and_kl(monkeypatch):
    # one place per idea: the metrics call fused_head.entropy (losses.entropy's value, fast without grad) and
    # losses.kl_per_position / reverse_kl_per_position / ce_per_position, no private copies
    assert not any(hasattr(S, n) for n in ("_entropy", "_kl", "_logprobs", "_fraction"))
    calls = []
    for mod, name in ((fused_head, "entropy"), (losses, "kl_per_position"), (losses, "reverse_kl_per_position"),
                      (losses, "ce_per_position")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    s, t, y = torch.randn(2, 3, 7), torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.long)
    for name in ALL_METRICS:
        S.METRICS[name](s, t, y, generator=gen())
    assert set(calls) == {"entropy", "kl_per_position", "reverse_kl_per_position", "ce_per_position"}


def test_metric_bad_inputs_raise():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="targets"):
        S.METRICS["student_entropy"](s, None, torch.zeros(2, 3))  # float targets
    with pytest.raises(ValueError, match="student_logits"):
        S.METRICS["student_entropy"](s, None, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabularies"):
        S.METRICS["kl"](s, torch.randn(2, 3, 6), torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- budgets & counts


def test_check_fraction():
    assert S.check_fraction(0.5, "k") == 0.5
    assert S.check_fraction(1, "l") == 1.0
    for bad in [0, -0.1, 1.5, float("nan"), "abc", None]:
        with pytest.raises(ValueError, match=r"^--k must be in \(0, 1\], got "):
            S.check_fraction(bad, "k")
    with pytest.raises(ValueError) as e:
        S.check_fraction(2, "l")
    assert str(e.value) == "--l must be in (0, 1], got 2"
    with pytest.raises(ValueError, match="--k"):
        S.top_k(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.0)


def test_num_selected_hand_examples():
    def K(k, n):
        v = torch.zeros(1, 30, dtype=torch.bool)
        v[0, :n] = True
        return S.num_selected(v, k).item()

    assert 0.28 * 25 > 7  # the float trap the budget must avoid: 7.000000000000001
    assert K(0.28, 25) == 7
    assert torch.ceil(torch.tensor([25]) * 0.6).item() == 16  # and the float32 trap
    assert K(0.6, 25) == 15
    assert K(0.7, 10) == 7
    assert K(0.2, 7) == 2  # ceil(1.4)
    assert K(0.5, 5) == 3  # ceil(2.5)
    assert K(1e-9, 20) == 1  # tiny k keeps one position
    assert K(1.0, 13) == 13
    assert K(0.3, 0) == 0


@pytest.mark.parametrize("name", ["top_k", "random", "curriculum"])
@pytest.mark.parametrize("k", [1e-6, 0.1, 0.25, 0.3, 0.7, 1.0])
def test_exact_counts_under_padding(name, k):
    B, T = 6, 23
    valid = holey_valid(B, T, seed=5)
    scores = torch.rand(B, T, generator=gen(6))
    for progress in ([0.0, 0.37, 1.0] if name == "curriculum" else [0.5]):
        w = call(name, scores, valid, k, progress=progress)
        assert w.dtype == torch.float32 and w.shape == (B, T)
        assert (w[~valid] == 0).all()
        for b in range(B):
            n = int(valid[b].sum())
            want = ceil_exact(k, n)
            assert int((w[b] > 0).sum()) == want
            if want:
                assert w[b].sum().item() == pytest.approx(1.0, abs=1e-6)
                assert torch.allclose(w[b][w[b] > 0], torch.full((want,), 1.0 / want))
            else:
                assert (w[b] == 0).all()


def test_top_k_picks_highest_and_breaks_ties_by_earlier_position():
    B, T = 5, 17
    valid = holey_valid(B, T, seed=7)
    scores = torch.randn(B, T, generator=gen(8))
    w = S.top_k(scores, valid, 0.3)
    for b in range(B):
        idx = valid[b].nonzero().flatten()
        K = ceil_exact(0.3, len(idx))
        best = idx[scores[b, idx].argsort(descending=True)[:K]]
        assert set((w[b] > 0).nonzero().flatten().tolist()) == set(best.tolist())
    # all scores equal: the first K valid positions win, padding holes skipped
    valid = torch.tensor([[False, True, True, False, True, True, True, False]])
    w = S.top_k(torch.ones(1, 8), valid, 0.5)  # n = 5, K = 3
    assert (w[0] > 0).nonzero().flatten().tolist() == [1, 2, 4]
    # a partial tie: the earlier of two equal scores at the boundary wins
    s = torch.tensor([[0.1, 0.5, 0.9, 0.5, 0.2]])
    w = S.top_k(s, torch.ones(1, 5, dtype=torch.bool), 0.4)  # K = 2
    assert (w[0] > 0).nonzero().flatten().tolist() == [1, 2]
    # padding never wins even with the highest score
    s = torch.tensor([[9.0, 1.0, 2.0]])
    w = S.top_k(s, torch.tensor([[False, True, True]]), 0.5)
    assert w[0].tolist() == [0.0, 0.0, 1.0]


def test_curriculum_moves_from_lowest_to_highest():
    B, T, k = 4, 31, 0.2
    valid = holey_valid(B, T, seed=9)
    valid[1] = True  # no empty row here
    scores = torch.randn(B, T, generator=gen(10))
    w0 = S.curriculum(scores, valid, k, progress=0.0)
    w1 = S.curriculum(scores, valid, k, progress=1.0)
    assert torch.equal(w1, S.top_k(scores, valid, k))
    means = []
    for b in range(B):
        idx = valid[b].nonzero().flatten()
        K = ceil_exact(k, len(idx))
        order = idx[scores[b, idx].argsort()]
        assert set((w0[b] > 0).nonzero().flatten().tolist()) == set(order[:K].tolist())
        assert set((w1[b] > 0).nonzero().flatten().tolist()) == set(order[-K:].tolist())
    for p in np.linspace(0, 1, 6):
        w = S.curriculum(scores, valid, k, progress=float(p))
        means.append(((w * scores).sum(1)).tolist())
    means = np.array(means)  # (6, B): the selected mean score never decreases as progress grows
    assert (np.diff(means, axis=0) >= -1e-6).all()
    with pytest.raises(ValueError, match="progress"):
        S.curriculum(scores, valid, k)
    with pytest.raises(ValueError, match="progress"):
        S.curriculum(scores, valid, k, progress=1.5)


def test_curriculum_window_start_is_floor_of_progress():
    # the paper's arithmetic: start = floor(progress * (n - K)), progress = step / curriculum_steps
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]])  # ascending ranks: pos 1, 3, 2, 0
    valid = torch.ones(1, 4, dtype=torch.bool)
    progresses = (0.0, 0.5, 0.66, 0.67, 1.0)
    picked = [int(S.curriculum(scores, valid, 0.25, progress=p).argmax()) for p in progresses]
    assert picked == [1, 3, 3, 2, 0]  # n - K = 3: starts 0, floor(1.5) = 1, 1, floor(2.01) = 2, 3
    # progress is the exact decimal: floor(0.29 * 100) = 29, although 0.29 * 100 = 28.999999999999996
    # in float64, and floor(0.53 * 100) = 53 although float32 gives 52.99999
    v = torch.ones(1, 101, dtype=torch.bool)
    for p, start in ((0.29, 29), (0.53, 53), (0.59, 59)):
        w = S.curriculum(torch.arange(101.0)[None], v, 1e-9, progress=p)  # K = 1, n - K = 100
        assert int(w.argmax()) == start
    steps = 4000  # SELECTION_CURRICULUM_STEPS: step 2000 of 4000 is progress 0.5
    assert torch.equal(S.curriculum(scores, valid, 0.25, progress=2000 / steps),
                       S.curriculum(scores, valid, 0.25, progress=0.5))


# ----------------------------------------------------------------------------- weighted & pos_rs


def test_weighted_hand_example_and_fallbacks():
    s = torch.tensor([[1.0, 3.0, 5.0, -2.0], [0.0, 0.0, 0.0, 7.0], [1.0, 1.0, 1.0, 1.0]])
    v = torch.tensor([[True, True, False, True], [True, True, False, False], [False] * 4])
    w = S.weighted(s, v)
    torch.testing.assert_close(w[0], torch.tensor([0.25, 0.75, 0.0, 0.0]))  # padding and s<0 get 0
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # zero sum: uniform
    assert (w[2] == 0).all()  # empty: zero row, no NaN
    assert torch.equal(S.POLICIES["weighted"](s, v, 0.3, generator=gen()), w)  # k ignored


def _mc(policy, scores, valid, losses, k, R, seed, temperature=1.0):
    """R independent draws of sum_t w_t l_t per row, in one batched call (rows are independent)."""
    B, T = scores.shape
    w = S.POLICIES[policy](scores.repeat(R, 1), valid.repeat(R, 1), k, generator=gen(seed),
                           temperature=temperature)
    est = (w * losses.repeat(R, 1)).sum(1).view(R, B).double()
    return est.mean(0), est.std(0) / math.sqrt(R)


def _mc_setup():
    B, T = 3, 16
    g = gen(11)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 10:] = False
    valid[2, ::3] = False
    scores = torch.rand(B, T, generator=g) ** 3 + 0.01  # skewed, all > 0 (q has full support)
    losses = torch.rand(B, T, generator=g) * 2
    losses[~valid] = 1e3  # padding must not leak into any estimate
    return scores, valid, losses


def test_pos_rs_is_unbiased_for_weighted_kd():
    scores, valid, losses = _mc_setup()
    target = (S.weighted(scores, valid) * losses).sum(1).double()
    full = (torch.where(valid, losses, 0).sum(1) / valid.sum(1)).double()
    mean, se = _mc("pos_rs", scores, valid, losses, 0.25, R=4000, seed=12)
    assert (se > 0).all()
    assert ((mean - target).abs() <= 4 * se + 1e-6).all(), (mean, target, se)
    assert ((mean - full).abs() > 4 * se).any()  # the test has power: pos_rs is not Full KD


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_pos_rs_star_is_unbiased_for_full_kd(temperature):
    scores, valid, losses = _mc_setup()
    full = (torch.where(valid, losses, 0).sum(1) / valid.sum(1)).double()
    weighted_kd = (S.weighted(scores, valid) * losses).sum(1).double()
    mean, se = _mc("pos_rs_star", scores, valid, losses, 0.25, R=4000, seed=13, temperature=temperature)
    assert (se > 0).all()
    assert ((mean - full).abs() <= 4 * se + 1e-6).all(), (mean, full, se)
    assert ((mean - weighted_kd).abs() > 4 * se).any()  # and it is not Weighted KD


def test_pos_rs_weights_structure():
    B, T, k = 5, 20, 0.3
    valid = holey_valid(B, T, seed=14)
    scores = torch.rand(B, T, generator=gen(15))
    w = S.pos_rs(scores, valid, k, generator=gen(16))
    for b in range(B):
        K = ceil_exact(k, int(valid[b].sum()))
        if K == 0:
            assert (w[b] == 0).all()
            continue
        counts = w[b] * K  # c_t = number of draws of t: integers summing to K
        torch.testing.assert_close(counts, counts.round())
        assert counts.sum().round().item() == K
    assert (w[~valid] == 0).all()
    # uniform scores: q = 1/n, so pos_rs_star's c/(K n q) equals pos_rs's c/K draw for draw
    ones = torch.ones(B, T)
    torch.testing.assert_close(S.pos_rs_star(ones, valid, k, generator=gen(17)),
                               S.pos_rs(ones, valid, k, generator=gen(17)))
    # temperature flattens: a huge temperature makes q (and so the draws) uniform
    torch.testing.assert_close(S.pos_rs(scores, valid, k, generator=gen(18), temperature=1e9),
                               S.pos_rs(ones, valid, k, generator=gen(18)))
    with pytest.raises(ValueError, match="pos-rs-temp"):
        S.pos_rs(scores, valid, k, temperature=0.0)


# ----------------------------------------------------------------------------- GLS


def test_gls_queue_ring_buffer_and_quantile():
    qu = S.GLSQueue(maxlen=10)
    assert len(qu) == 0
    with pytest.raises(ValueError, match="empty"):
        qu.quantile(0.5)
    qu.push(torch.arange(7.0))
    assert len(qu) == 7 and qu.values().tolist() == list(range(7))
    qu.push(torch.arange(7.0, 14.0))
    assert len(qu) == 10 and qu.values().tolist() == list(range(4, 14))  # oldest dropped, in order
    qu.push(torch.arange(100.0, 125.0))  # more than maxlen at once: the newest 10 survive
    assert qu.values().tolist() == list(range(115, 125))
    vals = torch.rand(37, generator=gen(19))
    qu = S.GLSQueue(maxlen=25)
    qu.push(vals[:20])
    qu.push(vals[20:])
    for q in [0.0, 0.2, 0.5, 0.8, 1.0]:
        assert qu.quantile(q).item() == pytest.approx(float(np.quantile(vals[-25:].numpy(), q)), abs=1e-6)
    copy = S.GLSQueue()
    copy.load_state_dict(qu.state_dict())
    assert copy.maxlen == 25 and torch.equal(copy.values(), qu.values())
    with pytest.raises(ValueError, match="maxlen"):
        S.GLSQueue(0)


def test_gls_threshold_is_queue_quantile_and_batch_is_pushed_after():
    k = 0.3
    qu = S.GLSQueue(maxlen=1000)
    history = torch.rand(500, generator=gen(20))
    qu.push(history)
    thr = float(np.quantile(history.numpy(), 1 - k))
    B, T = 4, 30
    valid = holey_valid(B, T, seed=21)
    scores = torch.rand(B, T, generator=gen(22)) * 1.2  # partly above anything in the queue
    w = S.gls(scores, valid, k, state=qu, generator=gen())
    sel = valid & (scores >= thr)
    assert torch.equal(w > 0, sel)
    for b in range(B):
        c = int(sel[b].sum())
        if c:
            torch.testing.assert_close(w[b].sum(), torch.tensor(1.0))
            torch.testing.assert_close(w[b][sel[b]], torch.full((c,), 1.0 / c))
        else:
            assert (w[b] == 0).all()
    # pushed after: the queue now also holds exactly this batch's valid scores, newest last
    n = int(valid.sum())
    assert len(qu) == 500 + n
    assert torch.equal(qu.values()[-n:].sort().values, scores[valid].sort().values)
    # a row with nothing above the threshold is a zero row, not NaN
    low = torch.zeros(1, 5)
    w = S.gls(low, torch.ones(1, 5, dtype=torch.bool), k, state=qu)
    assert (w == 0).all()


def test_gls_selects_scores_equal_to_the_threshold():
    # Eq. 6: positions with score >= the (1 - k) quantile are selected, ties included
    qu = S.GLSQueue()
    qu.push(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))  # quantile(0.5) = 3 exactly
    scores = torch.tensor([[3.0, 2.0, 5.0, 3.0], [1.0, 2.0, 3.0, 2.5]])
    w = S.gls(scores, torch.ones(2, 4, dtype=torch.bool), 0.5, state=qu)
    assert (w > 0).tolist() == [[True, False, True, True], [False, False, True, False]]
    torch.testing.assert_close(w[0], torch.tensor([1 / 3, 0, 1 / 3, 1 / 3]))


def test_gls_before_data_is_top_k_and_k1_selects_all():
    B, T = 3, 12
    valid = holey_valid(B, T, seed=23)
    scores = torch.rand(B, T, generator=gen(24))
    qu = S.GLSQueue()
    assert torch.equal(S.gls(scores, valid, 0.25, state=qu), S.top_k(scores, valid, 0.25))
    assert len(qu) == int(valid.sum())
    w = S.gls(scores * 0 - 5, valid, 1.0, state=qu)  # below everything queued, still all selected
    assert torch.equal(w > 0, valid)
    with pytest.raises(ValueError, match="GLSQueue"):
        S.gls(scores, valid, 0.25)


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("name", ALL_POLICIES + ["weighted"])
def test_no_nan_on_empty_rows_k1_and_tiny_k(name):
    B, T = 4, 9
    valid = holey_valid(B, T, seed=25)
    scores = torch.rand(B, T, generator=gen(26))
    for k in [1.0, 1e-12]:
        w = call(name, scores, valid, k)
        assert torch.isfinite(w).all() and (w >= 0).all()
        assert (w[1] == 0).all()  # the empty row
        assert (w[~valid] == 0).all()
        if name in ("top_k", "random", "curriculum", "gls"):
            expect = valid.sum(1) if k == 1.0 else (valid.sum(1) > 0).long()
            assert torch.equal((w > 0).sum(1), expect)
    # a batch of only empty rows
    none = torch.zeros(2, T, dtype=torch.bool)
    w = call(name, scores[:2], none, 0.5)
    assert (w == 0).all()
    assert S.batch_mean(w, torch.rand(2, T)).item() == 0.0


@pytest.mark.parametrize("name", ["random", "pos_rs", "pos_rs_star"])
def test_drawing_policies_are_deterministic_under_a_seed(name):
    B, T = 4, 40
    valid = holey_valid(B, T, seed=27)
    scores = torch.rand(B, T, generator=gen(28))
    a, b, c = (call(name, scores, valid, 0.2, seed=s) for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_policy_shape_errors():
    with pytest.raises(ValueError, match="valid"):
        S.top_k(torch.rand(2, 3), torch.ones(2, 4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        S.top_k(torch.rand(6), torch.ones(6, dtype=torch.bool), 0.5)


def test_batch_mean_leaves_out_empty_rows():
    w = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    l = torch.tensor([[2.0, 4.0, float("inf")], [float("nan"), 1.0, 1.0], [9.0, 9.0, 6.0]])
    assert S.batch_mean(w, l).item() == pytest.approx((3.0 + 6.0) / 2)
    assert torch.equal(S.batch_mean(w, l), losses.selective_kd_loss(l, w))  # one Eq. 4 normalisation


# ----------------------------------------------------------------------------- chunked scoring & samples


def _hidden(seed, B=3, T=7, d=6, dt=5, V=19):
    g = gen(seed)
    return (torch.randn(B, T, d, generator=g), torch.randn(V, d, generator=g),
            torch.randint(0, V, (B, T), generator=g), torch.randn(B, T, dt, generator=g),
            torch.randn(V, dt, generator=g))


@pytest.mark.parametrize("name", ALL_METRICS)
def test_chunked_scores_equal_dense_metric_and_bound_rows(name, monkeypatch):
    hs, Ws, y, ht, Wt = _hidden(29)
    dense = S.METRICS[name](hs @ Ws.T, ht @ Wt.T, y, generator=gen(30))
    seen = []
    fn = S.METRICS[name]

    @functools.wraps(fn)  # the spy carries the metric's tags (what it reads)
    def spy(s, t, targets, generator=None):
        for x in (s, t):
            if x is not None:
                seen.append(x.shape[0])
        return fn(s, t, targets, generator=generator)

    monkeypatch.setitem(S.METRICS, name, spy)
    out = S.chunked_scores(name, hs, Ws, y, ht, Wt, chunk_size=4, generator=gen(30))
    assert out.dtype == torch.float32 and out.shape == y.shape
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    assert all(r <= 4 for r in seen)
    if name != "random":  # every position's logits were built exactly once per model read
        reads = (name not in ("teacher_entropy", "teacher_ce")) + S.needs_teacher(name)
        assert sum(seen) == y.numel() * reads


def test_chunked_scores_bf16_and_errors():
    hs, Ws, y, ht, Wt = _hidden(31)
    hs, Ws = hs.bfloat16(), Ws.bfloat16()
    dense = S.METRICS["student_entropy"](hs @ Ws.T, None, y)
    torch.testing.assert_close(S.chunked_scores("student_entropy", hs, Ws, y, chunk_size=5), dense)
    with pytest.raises(ValueError, match="teacher_hidden"):
        S.chunked_scores("kl", hs, Ws, y)
    with pytest.raises(ValueError, match="unknown metric"):
        S.chunked_scores("nope", hs, Ws, y)
    with pytest.raises(ValueError, match="chunk_size"):
        S.chunked_scores("student_entropy", hs, Ws, y, chunk_size=0)
    assert not S.chunked_scores("student_entropy", hs, Ws, y).requires_grad


@pytest.mark.parametrize("name", ["student_entropy", "kl", "ce_ratio_student_entropy"])
def test_sample_scores_is_masked_mean_of_dense_metric(name):
    hs, Ws, y, ht, Wt = _hidden(32, B=4)
    valid = holey_valid(4, 7, seed=33)
    got = S.sample_scores(name, hs, Ws, y, valid, ht, Wt, chunk_size=3)
    dense = S.METRICS[name](hs @ Ws.T, ht @ Wt.T, y)
    assert got.shape == (4,) and got.dtype == torch.float32
    for b in range(4):
        if valid[b].any():
            assert got[b].item() == pytest.approx(dense[b][valid[b]].mean().item(), rel=1e-5)
        else:
            assert got[b].item() == -math.inf
    assert S.DEFAULT_SAMPLE_METRIC == "student_entropy"
    if name == "student_entropy":  # metric=None is the paper's default sample score
        assert torch.equal(S.sample_scores(None, hs, Ws, y, valid, chunk_size=3), got)


def test_sample_ce_ratio_is_ratio_of_sequence_losses():
    # DA-KD's sample score L_s(x) / L_t(x): ratio of the mean CEs, not the mean of per-token ratios
    hs, Ws, y, ht, Wt = _hidden(37, B=4)
    valid = holey_valid(4, 7, seed=38)
    got = S.sample_scores("ce_ratio", hs, Ws, y, valid, ht, Wt, chunk_size=3)
    ce_s, ce_t = S.METRICS["student_ce"](hs @ Ws.T, None, y), S.METRICS["teacher_ce"](None, ht @ Wt.T, y)
    per_token = S.METRICS["ce_ratio"](hs @ Ws.T, ht @ Wt.T, y)
    for b in range(4):
        if valid[b].any():
            want = ce_s[b][valid[b]].mean() / ce_t[b][valid[b]].mean()
            assert got[b].item() == pytest.approx(want.item(), rel=1e-5)
            assert got[b].item() != pytest.approx(per_token[b][valid[b]].mean().item(), rel=1e-3)
        else:
            assert got[b].item() == -math.inf


def test_random_sample_score_is_one_uniform_per_sample_id():
    # RandomSmp: a sample's score is keyed by (seed, sample id) only, whatever its length or batch
    g = gen(39)
    N, T = 8, 40
    y = torch.zeros(N, T, dtype=torch.long)
    valid = torch.rand(N, T, generator=g) < 0.5
    valid[:, 0] = True
    ids = torch.arange(100, 100 + N)
    got = S.sample_scores("random", None, None, y, valid, sample_ids=ids, seed=3)
    want = [common.seed_from(3, "random-sample", int(i)) / 2.0 ** 63 for i in ids]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    again = S.sample_scores("random", None, None, y[[5, 2]], ~valid[[5, 2]], sample_ids=ids[[5, 2]], seed=3)
    assert torch.equal(again, got[[5, 2]])
    assert not torch.equal(S.sample_scores("random", None, None, y, valid, sample_ids=ids, seed=4), got)
    with pytest.raises(ValueError, match="sample_ids"):
        S.sample_scores("random", None, None, y, valid)


def test_random_sample_selection_is_uniform_across_lengths():
    # lengths 20..256 in 4 buckets: each keeps l = 20% of its samples (the mean of per-position
    # uniforms kept 0.33 / 0.24 / 0.16 / 0.11: short samples have more variance and win more often)
    N, T, l = 4000, 256, 0.2
    lengths = torch.randint(20, T + 1, (N,), generator=gen(40))
    valid = torch.arange(T)[None, :] < lengths[:, None]
    y = torch.zeros(N, T, dtype=torch.long)
    scores = S.sample_scores("random", None, None, y, valid, sample_ids=torch.arange(N), seed=1337)
    kept = torch.zeros(N, dtype=torch.bool)
    kept[S.select_samples(scores, l)] = True
    bucket = torch.bucketize(lengths, torch.tensor([79, 138, 197]))  # 20-79, 80-138, 139-197, 198-256
    fracs = [kept[bucket == b].float().mean().item() for b in range(4)]
    assert all(abs(f - l) < 0.04 for f in fracs), fracs  # binomial sd ~ 0.013 per bucket of ~1000


def test_select_samples():
    s = torch.tensor([0.3, 0.9, -math.inf, 0.5, 0.9, 0.1, float("nan")])
    assert S.select_samples(s, 0.3).tolist() == [1, 3, 4]  # ceil(2.1) = 3 highest, ascending index order
    assert S.select_samples(s, 0.2).tolist() == [1, 4]  # ceil(1.4) = 2
    assert S.select_samples(s, 3 / 7).tolist() == [1, 3, 4]  # exactly 3, not 4 from float error
    assert S.select_samples(s, 1.0).tolist() == [0, 1, 3, 4, 5]  # -inf and NaN never kept
    assert S.select_samples(s, 1e-9).tolist() == [1]  # one kept; tie 0.9/0.9: lower index wins
    assert S.select_samples(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5).tolist() == [0, 1]
    with pytest.raises(ValueError, match="--l"):
        S.select_samples(s, 0.0)


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_on_device_and_matches_cpu():
    B, T = 4, 33
    valid = holey_valid(B, T, seed=34)
    scores = torch.rand(B, T, generator=gen(35))
    dev = torch.device("cuda")
    for name in ALL_POLICIES + ["weighted"]:
        for g in (gen(1), torch.Generator(device=dev).manual_seed(1)):
            w = S.POLICIES[name](scores.to(dev), valid.to(dev), 0.3, generator=g, progress=0.4,
                                 state=S.GLSQueue(), temperature=1.0)
            assert w.device.type == "cuda"
            if name in ("top_k", "curriculum", "weighted", "gls"):
                torch.testing.assert_close(w.cpu(), call(name, scores, valid, 0.3, progress=0.4))
    hs, Ws, y, ht, Wt = _hidden(36)
    for name in ALL_METRICS:
        out = S.chunked_scores(name, hs.to(dev), Ws.to(dev), y.to(dev), ht.to(dev), Wt.to(dev),
                               chunk_size=4, generator=gen(2))
        assert out.device.type == "cuda"
        if name != "random":
            torch.testing.assert_close(out.cpu(), S.chunked_scores(name, hs, Ws, y, ht, Wt),
                                       rtol=1e-4, atol=1e-4)


def test_needs_scores(monkeypatch):
    selection = S

    def every_position(scores, valid, k, **kw):  # a new policy that never reads the scores
        return valid.float() / valid.sum(-1, keepdim=True).clamp(min=1)

    monkeypatch.setitem(S.POLICIES, "every_position", every_position)
    assert selection.needs_scores("every_position", 0.2)  # untagged: it reads them
    monkeypatch.setattr(every_position, "reads_scores", False, raising=False)
    assert not selection.needs_scores("every_position", 0.2)
    assert not selection.needs_scores("top_k", 1.0)
    assert selection.needs_scores("top_k", 0.2)
    assert not selection.needs_scores("random", 0.2)
    assert selection.needs_scores("weighted", 1.0) and selection.needs_scores("gls", 1.0)
    # when no scores are needed, all-zero scores give the same weights as any scores would
    valid = torch.rand(3, 10) > 0.2
    w0 = selection.POLICIES["top_k"](torch.zeros(3, 10), valid, 1.0)
    w1 = selection.POLICIES["top_k"](torch.rand(3, 10), valid, 1.0)
    assert torch.equal(w0, w1) and torch.equal(w0 > 0, valid)


def test_chunked_scores_reuse_one_logits_buffer():
    """An fp32 head outside autocast: every chunk's logits go into one (chunk, V) buffer per head (a
    fresh tensor per chunk faults its pages in again on a CPU); under bf16 autocast the logits stay bf16
    matmul outputs (no fp32 buffer, half the bytes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    hs, Ws, y, ht, Wt = _hidden(31)  # 21 positions: 3 chunks of 8
    with Ops() as ops:
        out = S.chunked_scores("kl", hs, Ws, y, ht, Wt, chunk_size=8)
    mm_out, mm_new = ops.seen.count(torch.ops.aten.mm.out), ops.seen.count(torch.ops.aten.mm.default)
    assert (mm_out, mm_new) == (6, 0)  # 3 chunks x (student, teacher), all into the two buffers
    dense = S.METRICS["kl"](hs @ Ws.T, ht @ Wt.T, y)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16), Ops() as ops:
        S.chunked_scores("student_entropy", hs, Ws, y, chunk_size=8)
    assert ops.seen.count(torch.ops.aten.mm.out) == 0 and ops.seen.count(torch.ops.aten.mm.default) == 3
