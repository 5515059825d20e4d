"""The README's fork recipes, followed literally: each adds a registry entry at run time (the same
line a fork adds at the bottom of the module) and trains a step with it through train.py's flags."""
import json

import torch

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
