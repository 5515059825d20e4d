"""The README's fork recipes, followed literally: each adds a registry entry at run time (the same
line a fork adds at the bottom of the module) and trains a step with it through train.py's flags."""
import functools
import json

import pytest
import torch

import fused_head
import losses
import selection
import train
from conftest import train_args


def _run(tiny_dir, out, *flags):
    train.main(train_args(tiny_dir, out, "--max-steps", "1", *flags))
    return json.load(open(out / "summary.json"))


def test_recipe_new_position_metric(tiny_dir, tmp_path, monkeypatch):
    calls = []

    def low_confidence(student_logits, teacher_logits, targets, generator=None):
        """Toy metric: 1 - max_v q(v), the student's doubt about its top guess."""
        calls.append(tuple(student_logits.shape))
        return 1.0 - torch.softmax(student_logits.float(), -1).max(-1).values

    monkeypatch.setitem(selection.METRICS, "low_confidence", low_confidence)
    s = _run(tiny_dir, tmp_path, "--pos-metric", "low_confidence", "--k", "0.25")
    assert calls and 0.25 <= s["sup_frac_positions"] < 0.3


def test_recipe_new_policy(tiny_dir, tmp_path, monkeypatch):
    def first_half(scores, valid, k, **kw):
        """Toy policy: the first half of each sequence's valid positions, uniform weights (Eq. 4)."""
        sel = valid & (valid.cumsum(1) <= (valid.sum(1, keepdim=True) + 1) // 2)
        return sel.float() / sel.sum(1, keepdim=True).clamp_min(1)

    monkeypatch.setitem(selection.POLICIES, "first_half", first_half)
    s = _run(tiny_dir, tmp_path, "--policy", "first_half", "--k", "0.5")
    assert 0.45 <= s["sup_frac_positions"] <= 0.55


def test_recipe_new_loss(tiny_dir, tmp_path, monkeypatch):
    def jsd(student_logits, teacher_logits, targets, temperature=1.0):
        """Toy loss: Jensen-Shannon divergence per position."""
        lp, lq = losses.log_probs(teacher_logits, temperature), losses.log_probs(student_logits, temperature)
        lm = torch.logsumexp(torch.stack([lp, lq]), 0) - torch.log(torch.tensor(2.0))
        return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))

    monkeypatch.setitem(losses.LOSSES, "jsd", jsd)  # the one line a fork adds: nothing else
    s = _run(tiny_dir, tmp_path, "--loss", "jsd", "--k", "0.2")
    kd = [json.loads(l)["kd"] for l in open(tmp_path / "metrics.jsonl")]
    assert s["steps"] == 1 and 0 < kd[0] <= torch.log(torch.tensor(2.0)).item() + 1e-6  # JSD <= log 2


def test_recipe_a_copied_loss_trains_on_its_own_body(tiny_dir, tmp_path, monkeypatch):
    # a fork copies forward KL with everything it carries (name, doc, tags: functools.wraps) and changes the
    # body: the fast head's closed form belongs to kl_per_position itself, so the copy trains on its body
    @functools.wraps(losses.kl_per_position)
    def half_kl(student_logits, teacher_logits, targets=None, temperature=1.0):
        return 0.5 * losses.kl_per_position(student_logits, teacher_logits, targets, temperature)

    monkeypatch.setitem(losses.LOSSES, "half_kl", half_kl)
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(9, 4, generator=g, requires_grad=True), torch.randn(13, 4, generator=g, requires_grad=True)
    teacher = losses.DenseTeacher(torch.randn(9, 3, generator=g), torch.randn(13, 3, generator=g))
    y, w = torch.randint(0, 13, (9,), generator=g), torch.rand(9, generator=g)
    full, half = (fused_head.head_loss(h, W, y, w, teacher, loss=n, chunk_size=4) for n in ("kl", "half_kl"))
    torch.testing.assert_close(half, full / 2)
    for a, b in zip(torch.autograd.grad(half, [h, W]), torch.autograd.grad(full, [h, W])):
        torch.testing.assert_close(a, b / 2)
    rows = {}
    for name in ("kl", "half_kl"):
        _run(tiny_dir, tmp_path / name, "--loss", name, "--k", "0.2", "--head", "fused")
        rows[name] = json.loads(open(tmp_path / name / "metrics.jsonl").readline())
    assert rows["kl"]["kd"] > 0.1
    assert rows["half_kl"]["kd"] == pytest.approx(rows["kl"]["kd"] / 2, rel=1e-5)
    assert rows["half_kl"]["grad_norm"] == pytest.approx(rows["kl"]["grad_norm"] / 2, rel=1e-4)
