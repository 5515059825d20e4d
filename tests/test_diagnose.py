"""diagnose.py on the toy sandbox pair: the step-1 ratios and the held-out quintile table."""
import os

import pytest
import torch

import data
import diagnose
import eval as eval_
import heldout
import models
import report
import sandbox
import selection
import suite
import train
from common import UserError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # laid out as $NANO_SEKD_HOME, where suite.examples looks
    return dict(sandbox.build(os.path.join(str(home), sandbox.VERSION), scale="toy", log=lambda m: None), home=str(home))


def flags(p, *extra):
    return ["--teacher", p["teacher"], "--student", p["student"], "--data", p["kd"], "--seq-len", "32",
            "--tokens", "512", "--eval-tokens", "128", "--batch-size", "4", "--dtype", "fp32", *extra]


def test_step1_ratios(toy):
    ratios, head = diagnose.step1(flags(toy, "--seed", "1"), k=0.25, batches=2)
    assert set(ratios) == set(selection.METRICS) and all(len(v) == 2 for v in ratios.values())
    # top-k by KL maximises each row's selected KL sum, and the selected count is the same for every metric
    for m, v in ratios.items():
        assert all(a <= b + 1e-6 for a, b in zip(v, ratios["kl"])), m
    assert min(ratios["kl"]) > 1.0 and "2 batches of 4 x 32, seed 1" in head
    # student entropy's ratio, recomputed densely from step 1's batch
    teacher, tok = models.load_model(toy["teacher"])
    student, _ = models.load_model(toy["student"])
    x, y, valid = next(data.load_splits(tok, toy["kd"], 32, 512, 128, 1)["train"].batches(4))  # batch 1
    with torch.no_grad():
        q, p = (m(x).logits[..., :len(tok)].float() for m in (student, teacher))
    kl = selection.kl(q, p, y)
    sel = selection.top_k(selection.student_entropy(q, p, y), valid, 0.25) > 0
    assert ratios["student_entropy"][0] == pytest.approx(float(kl[sel].mean() / kl[valid].mean()), rel=1e-4)
    text = diagnose.format_step1(ratios, head)
    assert text.index("| kl |") < text.index("| student_entropy |")  # sorted by ratio, highest first


def test_per_position_matches_heldout_metrics(toy):
    teacher, tok = models.load_model(toy["teacher"])
    student, _ = models.load_model(toy["student"])
    held = data.load_splits(tok, toy["kd"], 32, 512, 128)["val"]
    per = heldout.per_position(student, held.batches(4), teacher, len(tok), chunk_size=7)
    ref = heldout.heldout_metrics(student, held.batches(4), teacher, len(tok))
    assert per["kl"].numel() == ref["tokens"] == int(held.valid.sum())
    assert float(per["kl"].mean()) == pytest.approx(ref["kl_to_teacher"], rel=1e-5)
    assert float(per["ce"].mean()) == pytest.approx(ref["loss"], rel=1e-5)
    assert (per["entropy"] >= 0).all() and set(per["top1"].tolist()) <= {0.0, 1.0}


def test_quintiles(toy, tmp_path):
    runs = []
    for name, lr, seed in (("frozen", "0", 0), ("frozen", "0", 1), ("kd", "3e-3", 0), ("kd", "3e-3", 1)):
        out = str(tmp_path / name / f"seed{seed}")
        train.main(flags(toy, "--lr", lr, "--seed", str(seed), "--run-name", name, "--out-dir", out))
        runs.append(out)
    edges, out, n = diagnose.quintiles(runs, split="val", log=lambda m: None)
    assert len(edges) == diagnose.QUINTILES - 1 and (edges[1:] >= edges[:-1]).all()
    assert set(out) == {"undistilled", "frozen", "kd"} and set(out["kd"]) == {0, 1}
    for seed in (0, 1):  # lr 0: the run is the undistilled student, group by group
        for m in ("kl", "ce", "top1"):
            assert torch.allclose(out["frozen"][seed][m], out["undistilled"][0][m])
    # the groups are equal fifths, so their mean is the held-out mean: KD lowered the held-out KL
    kl = lambda rows: float(rows["kl"].mean())  # noqa: E731
    assert kl(out["kd"][0]) < kl(out["undistilled"][0])
    summary = report.read_json(os.path.join(runs[2], "summary.json"))
    assert abs(kl(out["kd"][0]) - summary["student_after"]["kl_to_teacher"]) < 0.05  # val, ~equal fifths
    text = diagnose.format_quintiles(edges, out, n, baseline="frozen")
    assert "| Δ kd | 2 |" in text and "| Δ frozen" not in text and text.count("**") == 6


def test_quintiles_refuse_a_run_without_a_model(tmp_path):
    with pytest.raises(UserError, match="model/"):
        diagnose.quintiles([str(tmp_path)])


def test_quintiles_refuse_runs_on_other_held_out_text(tmp_path):
    for name, seq_len in (("a", 32), ("b", 64)):  # checked before any model loads
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(
            f'{{"teacher": "T", "student": "S", "data": "D", "seq_len": {seq_len}, "seed": 0}}')
    with pytest.raises(UserError, match="different --seq-len"):
        diagnose.quintiles([str(tmp_path / "a"), str(tmp_path / "b")])


def test_deciding_positions():
    # context [1, 2]: the distribution at index 1 predicts the continuation's first token
    assert diagnose.deciding([1, 2], [[5, 6, 7], [5, 8, 7], [5, 6]], 0) == [2, 3]  # parts after the shared 5
    assert diagnose.deciding([1, 2], [[5, 6, 7], [9, 6, 7]], 1) == [1, 2, 3]  # parts at once
    assert diagnose.deciding([1, 2], [[5, 6]], 0) == [1, 2]  # no other choice: every token decides
    assert diagnose.deciding([1, 2], [[5], [5, 6]], 0) == [1]  # the gold a prefix of another: its last token


def test_answers_on_the_toy_suite(toy, monkeypatch):
    monkeypatch.setenv("NANO_SEKD_HOME", toy["home"])
    edges, out, head = diagnose.answers(flags(toy), split="validation")
    # the edges are the quintiles' edges: the undistilled student's entropy on the held-out test text
    teacher, tok = models.load_model(toy["teacher"])
    student, _ = models.load_model(toy["student"])
    held = data.load_splits(tok, toy["kd"], 32, 512, 128, splits=("test",))["test"]
    ref = diagnose.quintile_edges(heldout.per_position(student, held.batches(16), teacher, len(tok))["entropy"])
    assert torch.allclose(edges, ref) and f"{int(held.valid.sum())} positions" in head
    for task in suite.SUITE:
        n, h_all, h_first = out[task]
        exs = suite.examples(task, "validation")
        assert n == len(exs) == h_first.numel() and h_all.numel() >= n and (h_all >= 0).all()
        # the first deciding position of example 0: the gold's token there differs from another choice's, and
        # its entropy is the student's at the position before that token
        ex = exs[0]
        pairs = [eval_.encode_pair(tok, ex["context"], " " + c) for c in ex["choices"]]
        ctx, g = pairs[ex["gold"]]
        j = diagnose.deciding(ctx, [c for _, c in pairs], ex["gold"])[0] - (len(ctx) - 1)
        assert any(c[:j] == g[:j] and c[j:j + 1] != g[j:j + 1] for i, (_, c) in enumerate(pairs) if i != ex["gold"])
        with torch.no_grad():
            q = student(torch.tensor([ctx + g])).logits[0, len(ctx) - 1 + j, :len(tok)].double().softmax(-1)
        assert float(h_first[0]) == pytest.approx(float(-(q * q.log()).sum()), rel=1e-4)
    text = diagnose.format_answers(edges, out, head)
    assert text.count("| the first deciding |") == len(suite.SUITE) and "Q5 [" in text
