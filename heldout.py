"""Held-out metrics: the student's numbers against its teacher on the held-out split of the distillation text.

heldout_metrics scores the student (and, given one, a live teacher) on (input_ids, targets, valid)
batches: CE / perplexity, calibration (expected_calibration_error), and the true KL(p || q) with top-1
agreement. heldout_metrics_sparse scores it against an offline RS-KD cache instead, whose KL is the
RS-KD estimate (losses.sparse_kl) under its own name, so no table mixes it with the true KL.
Logits are built a chunk of rows at a time (common.row_chunks) from the trunk/head split of models.py.
"""
import math

import torch

import losses
import models
from common import row_chunks
from fused_head import matmul_weight


def expected_calibration_error(confidence, correct, n_bins=15):
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over `n_bins` equal-width bins of confidence (0,1].

    A confidence of exactly 0 goes to the first bin. Returns 0.0 for empty input.
    """
    conf = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    corr = torch.as_tensor(correct, dtype=torch.float64).flatten()
    if conf.numel() == 0:
        return 0.0
    b = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    s_conf = torch.bincount(b, weights=conf, minlength=n_bins)
    s_corr = torch.bincount(b, weights=corr, minlength=n_bins)
    return float((s_conf - s_corr).abs().sum() / conf.numel())


@torch.no_grad()
def heldout_metrics(student, batches, teacher=None, vocab_size=None, chunk_size=1024, device=None,
                    teacher_device=None, teacher_states=None):
    """Token-level held-out metrics of the student on (input_ids, targets, valid) batches.

    Returns loss (mean CE over valid positions), ppl = exp(loss), ece (15 bins over the top-1
    confidence), and with a teacher: kl_to_teacher = mean KL(p || q), top1_agree, teacher_loss,
    teacher_ece. Logits are built `chunk_size` rows at a time, in fp32. `teacher_states` (optional,
    input_ids (B, T) -> the teacher's final hidden states (B, T, d)) replaces the teacher's trunk call,
    so a caller that keeps those states (train.py does) runs the teacher once for many evaluations.
    """
    device = device or next(student.parameters()).device
    teacher_device = teacher_device or (next(teacher.parameters()).device if teacher else None)
    if teacher is not None and teacher_states is None:
        teacher_states = lambda x: models.trunk(teacher, x.to(teacher_device))  # noqa: E731
    # cast once under autocast, not per chunk
    Ws = matmul_weight(models.head_weight(student, vocab_size))  # (V, d)
    Wt = matmul_weight(models.head_weight(teacher, vocab_size)) if teacher is not None else None
    tot = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "tce": 0.0, "n": 0}
    confs, corrs, tconfs, tcorrs = [], [], [], []
    for input_ids, targets, valid in batches:
        hs = models.trunk(student, input_ids.to(device))[valid.to(device)]  # (N, d)
        y = targets.to(device)[valid.to(device)]  # (N,)
        ht = teacher_states(input_ids)[valid.to(teacher_device)] if teacher is not None else None  # (N, d_t)
        for i0, i1 in row_chunks(hs.shape[0], chunk_size):
            ls = losses.log_probs((hs[i0:i1] @ Ws.T).float())  # (n, V) student log-probs
            yc = y[i0:i1]
            tot["ce"] += float(-ls.gather(1, yc[:, None]).sum())
            conf, pred = ls.exp().max(-1)
            confs.append(conf.cpu())
            corrs.append((pred == yc).cpu())
            if teacher is not None:
                lt = losses.log_probs((ht[i0:i1] @ Wt.T).float().to(device))  # (n, V) teacher log-probs
                tot["kl"] += float(losses.kl_from_log_probs(ls, lt).sum())  # forward KL(p_teacher || q_student)
                tot["agree"] += float((lt.argmax(-1) == pred).sum())
                tot["tce"] += float(-lt.gather(1, yc[:, None]).sum())
                tconf, tpred = lt.exp().max(-1)
                tconfs.append(tconf.cpu())
                tcorrs.append((tpred == yc).cpu())
        tot["n"] += int(hs.shape[0])
    n = max(tot["n"], 1)
    out = {"loss": tot["ce"] / n, "tokens": tot["n"]}
    out["ppl"] = math.exp(min(out["loss"], 50.0))
    out["ece"] = expected_calibration_error(torch.cat(confs), torch.cat(corrs)) if confs else 0.0
    if teacher is not None:
        out.update(kl_to_teacher=tot["kl"] / n, top1_agree=tot["agree"] / n, teacher_loss=tot["tce"] / n,
                   teacher_ece=expected_calibration_error(torch.cat(tconfs), torch.cat(tcorrs)) if tconfs else 0.0)
    return out


@torch.no_grad()
def heldout_metrics_sparse(student, batches, teacher_cache, sample_ids, vocab_size=None, chunk_size=1024,
                           device=None):
    """heldout_metrics against an offline RS-KD cache instead of a live teacher.

    kl_rs_estimate (named apart from heldout_metrics' true kl_to_teacher, so no table mixes the two) is
    the RS-KD estimate losses.sparse_kl = sum_v p~(v) (log p~(v) - log q(v)) with p~ the cached
    sampled target: it exceeds the true KL(p || q) by H(p) - E[H(p~)] >= 0, a constant of the cache
    (the same for every student), so it ranks students like the true KL but is not equal to it.
    top1_agree compares with the most-sampled cached class.
    """
    device = device or next(student.parameters()).device
    Ws = matmul_weight(models.head_weight(student, vocab_size))  # (V, d)
    tot = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "n": 0}
    confs, corrs, start = [], [], 0
    for input_ids, targets, valid in batches:
        b = input_ids.shape[0]
        ids, probs = teacher_cache.get(sample_ids[start:start + b])  # (b, T, U) each
        start += b
        v = valid.to(device)
        hs = models.trunk(student, input_ids.to(device))[v]  # (N, d)
        y, ids, probs = targets.to(device)[v], ids.to(device)[v], probs.to(device)[v]  # (N,), (N, U), (N, U)
        for i0, i1 in row_chunks(hs.shape[0], chunk_size):
            ls = losses.log_probs((hs[i0:i1] @ Ws.T).float())  # (n, V)
            yc, ic, pc = y[i0:i1], ids[i0:i1], probs[i0:i1]
            tot["ce"] += float(-ls.gather(1, yc[:, None]).sum())
            conf, pred = ls.exp().max(-1)
            confs.append(conf.cpu())
            corrs.append((pred == yc).cpu())
            tot["kl"] += float(losses.sparse_kl(ls.gather(1, ic), pc).sum())
            tot["agree"] += float((ic.gather(1, pc.argmax(1, keepdim=True))[:, 0] == pred).sum())
        tot["n"] += int(hs.shape[0])
    n = max(tot["n"], 1)
    out = {"loss": tot["ce"] / n, "tokens": tot["n"], "kl_rs_estimate": tot["kl"] / n, "top1_agree": tot["agree"] / n,
           "kl_estimator": "rs_kd_sampled_target"}
    out["ppl"] = math.exp(min(out["loss"], 50.0))
    out["ece"] = expected_calibration_error(torch.cat(confs), torch.cat(corrs)) if confs else 0.0
    return out


@torch.no_grad()
def per_position(student, batches, teacher, vocab_size=None, chunk_size=1024):
    """heldout_metrics' numbers position by position, for tables that split the held-out positions into
    groups: {entropy H(q), kl KL(p || q), ce -log q(y), top1 [argmax q == y]}, each (N,) float64 over
    the valid positions of `batches` in order (so two students' rows line up position by position)."""
    device = next(student.parameters()).device
    Ws = matmul_weight(models.head_weight(student, vocab_size))  # (V, d)
    Wt = matmul_weight(models.head_weight(teacher, vocab_size))  # (V, d_t)
    out = {"entropy": [], "kl": [], "ce": [], "top1": []}
    for input_ids, targets, valid in batches:
        v = valid.to(device)
        hs, y = models.trunk(student, input_ids.to(device))[v], targets.to(device)[v]
        ht = models.trunk(teacher, input_ids.to(device))[v]
        for i0, i1 in row_chunks(hs.shape[0], chunk_size):
            zs = (hs[i0:i1] @ Ws.T).float()  # (n, V) student logits
            ls = losses.log_probs(zs)
            lt = losses.log_probs((ht[i0:i1] @ Wt.T).float())  # (n, V)
            yc = y[i0:i1]
            out["entropy"].append(losses.entropy(zs))
            out["kl"].append(losses.kl_from_log_probs(ls, lt))
            out["ce"].append(-ls.gather(1, yc[:, None])[:, 0])
            out["top1"].append((ls.argmax(-1) == yc).float())
    return {k: torch.cat(v).double().cpu() if v else torch.zeros(0, dtype=torch.float64) for k, v in out.items()}
