"""Held-out metrics: ECE, the student against a live teacher (true KL) and against an RS-KD cache
(the estimate, losses.sparse_kl), each equal to the same numbers computed from dense logits."""
import math

import pytest
import torch
import torch.nn.functional as F

import heldout
import losses
import models
from conftest import make_model


def test_ece_hand_example():
    ece = heldout.expected_calibration_error([0.95, 0.9, 0.62, 0.55, 0.2], [1, 0, 1, 0, 0])
    assert abs(ece - 0.416) < 1e-9
    assert heldout.expected_calibration_error([0.75, 0.75], [1, 0]) == pytest.approx(0.25)
    assert heldout.expected_calibration_error([], []) == 0.0


def test_heldout_metrics_match_dense(tiny_tok):
    st, te = make_model(tiny_tok, layers=1, seed=1), make_model(tiny_tok, layers=2, seed=2)
    x = torch.randint(2, len(tiny_tok), (3, 9))
    y = torch.randint(2, len(tiny_tok), (3, 9))
    valid = torch.rand(3, 9) > 0.3
    out = heldout.heldout_metrics(st, [(x, y, valid)], te, len(tiny_tok), chunk_size=4)
    with torch.no_grad():
        ls = F.log_softmax(st(x).logits[valid].float(), -1)
        lt = F.log_softmax(te(x).logits[valid].float(), -1)
    ce = -ls.gather(1, y[valid][:, None]).mean()
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    assert out["loss"] == pytest.approx(float(ce), rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert out["kl_to_teacher"] == pytest.approx(float(kl), rel=1e-4)
    assert out["top1_agree"] == pytest.approx(float((ls.argmax(-1) == lt.argmax(-1)).float().mean()))
    assert out["tokens"] == int(valid.sum())
    tconf, tpred = lt.exp().max(-1)
    assert out["teacher_ece"] == pytest.approx(heldout.expected_calibration_error(tconf, tpred == y[valid]), abs=1e-6)
    assert out["teacher_loss"] == pytest.approx(float(-lt.gather(1, y[valid][:, None]).mean()), rel=1e-5)
    calls = []  # teacher_states replaces the teacher's trunk call, with the same numbers
    memo = lambda ids: calls.append(ids.shape) or models.trunk(te, ids)  # noqa: E731
    assert heldout.heldout_metrics(st, [(x, y, valid)], te, len(tiny_tok), 4, teacher_states=memo) == out
    assert calls == [x.shape]


def test_heldout_metrics_use_the_one_kl(tiny_tok, monkeypatch):
    st, te = make_model(tiny_tok, layers=1, seed=1), make_model(tiny_tok, layers=2, seed=2)
    x = torch.randint(2, len(tiny_tok), (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    calls = []
    kl = losses.kl_from_log_probs
    spy = lambda s, t, *a, **k: calls.append((s, t)) or kl(s, t, *a, **k)  # noqa: E731
    monkeypatch.setattr(losses, "kl_from_log_probs", spy)
    out = heldout.heldout_metrics(st, [(x, x, valid)], te, len(tiny_tok))
    assert len(calls) == 1
    with torch.no_grad():  # student log-probs first, teacher second (the contract's argument order)
        zs, zt = st(x).logits[valid].float(), te(x).logits[valid].float()
        assert torch.allclose(calls[0][0], torch.log_softmax(zs, -1), atol=1e-5)
        assert torch.allclose(calls[0][1], torch.log_softmax(zt, -1), atol=1e-5)
        assert out["kl_to_teacher"] == pytest.approx(float(losses.kl_per_position(zs, zt).mean()), rel=1e-5)


class FakeCache:
    """An RS-KD cache's read side: get(sample_ids) -> ids (b, T, U), probs (b, T, U) = counts / U."""

    def __init__(self, ids, probs):
        self.ids, self.probs = ids, probs

    def get(self, sample_ids):
        return self.ids[sample_ids], self.probs[sample_ids]


def rs_cache(V, B, T, U=6, seed=0):
    """Per position U draws from a random distribution over V: distinct ids first, then padding (id 0,
    prob 0) up to Umax."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(B * T, V, generator=g), -1)
    drawn = torch.multinomial(p, U, replacement=True, generator=g)  # (B*T, U)
    umax = U
    ids, probs = torch.zeros(B * T, umax, dtype=torch.long), torch.zeros(B * T, umax)
    for r in range(B * T):
        u, c = drawn[r].unique(return_counts=True)
        ids[r, :len(u)], probs[r, :len(u)] = u, c.float() / U
    return ids.view(B, T, umax), probs.view(B, T, umax)


def test_heldout_metrics_sparse_match_dense(tiny_tok, monkeypatch):
    """The RS-KD estimate is sum_u p~ (log p~ - log q) at the cached ids (padding contributes 0), read
    through losses.sparse_kl; batches take their cache rows in order; any chunk size gives the same."""
    st = make_model(tiny_tok, layers=1, seed=1)
    V, B, T = len(tiny_tok), 3, 7
    ids, probs = rs_cache(V, B, T)
    assert (probs == 0).any()  # some positions have padding entries
    cache, order = FakeCache(ids, probs), torch.tensor([2, 0, 1])
    x = torch.randint(2, V, (B, T))
    y = torch.randint(2, V, (B, T))
    valid = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.25
    batches = [(x[:2], y[:2], valid[:2]), (x[2:], y[2:], valid[2:])]
    calls = []
    kl = losses.sparse_kl
    monkeypatch.setattr(losses, "sparse_kl", lambda lq, p: calls.append((lq, p)) or kl(lq, p))
    out = heldout.heldout_metrics_sparse(st, batches, cache, order, V, chunk_size=4)
    n = int(valid.sum())
    assert len(calls) == math.ceil(int(valid[:2].sum()) / 4) + math.ceil(int(valid[2:].sum()) / 4)
    with torch.no_grad():
        ls = F.log_softmax(st(x).logits[valid].float(), -1)  # (N, V)
    ic, pc = ids[order][valid], probs[order][valid]  # (N, U): sample order[b] for batch row b
    lq = ls.gather(1, ic)
    est = sum(float(p * (math.log(p) - q)) for p, q in zip(pc.flatten(), lq.flatten()) if p > 0) / n
    assert out["kl_rs_estimate"] == pytest.approx(est, rel=1e-5)
    assert out["kl_estimator"] == "rs_kd_sampled_target" and "kl_to_teacher" not in out
    top = ic.gather(1, pc.argmax(1, keepdim=True))[:, 0]
    assert out["top1_agree"] == pytest.approx(float((ls.argmax(-1) == top).float().mean()))
    ce = -ls.gather(1, y[valid][:, None]).mean()
    assert out["loss"] == pytest.approx(float(ce), rel=1e-5) and out["tokens"] == n
    assert out["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    conf, pred = ls.exp().max(-1)
    assert out["ece"] == pytest.approx(heldout.expected_calibration_error(conf, pred == y[valid]), abs=1e-6)
    for chunk in (1, 1000):  # one row at a time, or every row at once: the same numbers
        again = heldout.heldout_metrics_sparse(st, batches, cache, order, V, chunk_size=chunk)
        assert again.keys() == out.keys()
        for k, v in out.items():
            assert again[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), k


def test_heldout_metrics_chunking_is_exact(tiny_tok):
    """Chunks of 1, 4 or all rows (common.row_chunks) give the same held-out numbers."""
    st, te = make_model(tiny_tok, layers=1, seed=4), make_model(tiny_tok, layers=2, seed=5)
    x = torch.randint(2, len(tiny_tok), (2, 8))
    valid = torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) > 0.2
    runs = [heldout.heldout_metrics(st, [(x, x.roll(-1, 1), valid)], te, len(tiny_tok), chunk_size=c)
            for c in (1, 4, 100)]
    assert runs[0]["tokens"] == int(valid.sum())
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for k, v in runs[0].items():
            assert other[k] == pytest.approx(v, rel=1e-5), k
    with pytest.raises(ValueError, match="chunk size"):
        heldout.heldout_metrics(st, [(x, x, valid)], te, len(tiny_tok), chunk_size=0)
