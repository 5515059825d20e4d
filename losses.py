"""Distillation objectives and the plain selective LM head of nano-sekd.

Notation (paper "Rethinking Selective Knowledge Distillation", Tavor et al.)
---------------------------------------------------------------------------
For a sequence x_1..x_T and a position t, the teacher predicts p_t = softmax(z^T_t / tau)
and the student q_t = softmax(z^S_t / tau) over a vocabulary of V classes; y_t is the
ground-truth next token. All losses here work on *rows*: a row is one (b, t) position,
so logits are (N, V) (or any (..., V)) and a per-position loss is (N,) / (...).

    forward KL   KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))       (true KL, incl. -H(p_t))
    reverse KL   KL(q_t || p_t)                                               (on-policy distillation)
    CE           -log q_t(y_t)                                                (hard labels, tau = 1)

With a temperature tau != 1 every KD term is multiplied by tau^2 (Hinton et al. 2015), so
that its gradient keeps the same scale as at tau = 1. CE never uses tau.

Selective KD (paper Eq. 3-5). A selection policy (selection.py) turns a score per position
(e.g. the student entropy H(q_t)) into weights w_{i,t} >= 0 (m_t = 1[w_{i,t} > 0] is the
position mask; sample selection by the score s_i zeroes whole sequences). The step loss is

    L = 1/|I| * sum_{i in I} sum_t w_{i,t} * (lam * KD_{i,t} + (1 - lam) * CE_{i,t})

where I is the set of sequences that have any weight (so dropped samples do not dilute the
mean) and lam is the KD weight (lam = 1: pure KD; the KD/CE mixture of Eq. 1/3).
`selective_kd_loss` computes this on dense (B, T) per-position losses; `head_loss` computes
the same quantity from hidden states without ever building (B, T, V) logits.

Weighted KD (paper Table 1) is forward KL with selection.py's `weighted` policy, which emits
weights proportional to the metric; `policy_for` tells train.py to use that policy.

Every loss here takes `(student_logits, teacher_logits, targets, temperature=1.0)` (torchtune's
order) and returns (N,) fp32; `LOSSES` at the bottom is the one registry (`--loss NAME`): a new
loss is one such function plus one line there. What a loss needs beyond that is a function
attribute, read with getattr and a default (`policy`, `ranks_rows`, `rs_kd`; see the registry).

Classes (RS-KD, class axis): instead of the full p_t, keep U classes sampled from p_t with
replacement; p~_t(v) = count(v) / U is an unbiased estimate of p_t(v), so the gradient of
sum_v p~_t(v) (log p~_t(v) - log q_t(v)) is an unbiased estimate of the gradient of
KL(p_t || q_t) (`rs_uniforms`, `sample_classes`, `sparse_kl`, `rs_kd_loss`).

Other objectives: Decoupled KD (`dkd_loss`, Zhao et al. 2022) and AT-KD (`atkd_loss`,
Zhong et al. 2024), both built on the DKD identity
    KL(p || q) = TCKD + (1 - p(y)) * NCKD.

Memory (paper Sec. 4, Appendix H)
---------------------------------
The LM head is the memory hog: (B, T, V) fp32 logits for a 150k vocabulary are ~0.6 GB per
1k tokens, twice (teacher and student), plus softmax copies and their gradients. So the head
works on rows, `chunk_size` rows at a time (common.row_chunks):
 * `chunked_entropy` scores all positions (no grad) with one chunk of logits alive at a time.
 * `head_loss` is the selective LM head: the caller gathers the hidden states of the selected
   rows only (h[m]); per chunk it computes the student logits h @ W^T, the teacher's (no grad)
   and the weighted loss, under torch.utils.checkpoint, so a chunk's (c, V) logits are
   recomputed in backward instead of kept (as torchtune's chunked KD loss calls the plain loss
   chunk by chunk). Full KD (k = 100%) is the same call with every valid row selected.
fused_head.py computes the same values and gradients faster (gradients in the forward pass,
closed forms for forward KL and CE, reused buffers); train.py runs it by default (--head fused)
and tests/test_head_parity.py holds the two paths equal.

Numerics: every softmax is in fp32 (a log_softmax; bf16/fp16 inputs are upcast after the head
matmul, which runs in the model's dtype like the model's own head would); terms p log p with
p = 0 are exactly 0, so -inf logits (masked vocabulary) never produce NaN. A row needs at
least one finite logit.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch.utils.checkpoint import checkpoint

import common


# ----------------------------------------------------------------------------- log-probs, entropy, KL

def check_temperature(temperature):
    """A one-line ValueError unless temperature > 0 (both heads, log_probs, the entropies)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs(logits, temperature=1.0):
    """log softmax(logits / tau) over the last dim, in fp32: the one place logits become log-probs."""
    check_temperature(temperature)
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def kl_from_log_probs(student_log_probs, teacher_log_probs):
    """Forward KL(p || q) over the last dim from log-probs (q the student's, p the teacher's); classes with
    p = 0 contribute exactly 0. kl_per_position's core, for callers that already hold both log-probs.

    Both log-probs are replaced by 0 where p = 0 *before* subtracting, so -inf - (-inf) never
    happens, neither in the value nor in the gradient.
    """
    lq, lp = student_log_probs, teacher_log_probs
    p = lp.exp()
    keep = p > 0
    return (p * (torch.where(keep, lp, 0.0) - torch.where(keep, lq, 0.0))).sum(-1)


def _logsumexp(x):
    """logsumexp over the last dim that is -inf (not NaN in backward) for all -inf rows."""
    ok = torch.isfinite(x.amax(-1, keepdim=True))  # (..., 1)
    out = torch.logsumexp(torch.where(ok, x, 0.0), -1)
    return torch.where(ok.squeeze(-1), out, float("-inf"))


def entropy(logits, temperature=1.0):
    """Shannon entropy H(softmax(logits / tau)) = -sum_v q(v) log q(v) in nats, fp32.

    logits (..., V) -> (...). Classes with -inf logits contribute 0 (0 log 0 = 0); a row with no
    finite logit is NaN. (fused_head.entropy is the same value, faster without grad.)
    """
    lq = log_probs(logits, temperature)
    q = lq.exp()
    return -(q * torch.where(q > 0, lq, 0.0)).sum(-1)


@torch.no_grad()
def chunked_entropy(hidden, lm_head_weight, chunk_size=1024):
    """Entropy of softmax(hidden @ W^T) per position without materialising all logits.

    hidden (B, T, d) (any leading dims), lm_head_weight (V, d) -> (B, T) fp32. No grad; at most
    `chunk_size` rows of logits are alive at once. The matmul runs in the hidden states' dtype
    (as the model's head would), the softmax in fp32: entropy(hidden @ W^T), chunk by chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(f"hidden dim {hidden.shape[-1]} != lm_head_weight dim "
                         f"{lm_head_weight.shape[-1]}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    W = lm_head_weight.to(h.dtype)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,)
    for i0, i1 in common.row_chunks(h.shape[0], chunk_size):
        out[i0:i1] = entropy(h[i0:i1] @ W.T)  # (c, V) alive
    return out.reshape(hidden.shape[:-1])


# ----------------------------------------------------------------------------- exact fractions of counts

def decimal_fraction(x):
    """x as the decimal it prints as, num / den (0.28 is 28/100), den <= 1e9 so num * n stays far inside
    int64 for any count n."""
    f = Fraction(repr(float(x))).limit_denominator(10**9)
    return f.numerator, f.denominator


def ceil_fraction(k, n):
    """ceil(k * n) in exact integer arithmetic (int or int64 tensor n >= 0): ceil(0.28 * 25) = 7, where the
    float product is 7.000000000000001. The one count of a fraction: selection budgets, AT-KD's hard rows."""
    num, den = decimal_fraction(k)
    return (n * num + den - 1) // den


# ----------------------------------------------------------------------------- per-position objectives
# fn(student_logits (..., V), teacher_logits (..., V), targets (...), temperature=1.0) -> (...) fp32

def kl_per_position(student_logits, teacher_logits, targets=None, temperature=1.0):
    """Forward KL(p || q) per row, fp32 (Hinton et al. 2015; the dense KD term of the paper).

    KL(p || q) = sum_v p(v) (log p(v) - log q(v)) with p = softmax(t / tau), q = softmax(s / tau):
    the true KL (it includes the teacher entropy term, so it is 0 iff p = q), multiplied by
    tau^2. Classes with p = 0 contribute exactly 0. targets are unused.
    """
    lp, lq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    return kl_from_log_probs(lq, lp) * temperature ** 2


def reverse_kl_per_position(student_logits, teacher_logits, targets=None, temperature=1.0):
    """Reverse KL(q || p) = sum_v q(v) (log q(v) - log p(v)) per row, fp32, times tau^2.

    The mode-seeking objective used for on-policy distillation (e.g. GKD, MiniLLM).
    """
    lp, lq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    return kl_from_log_probs(lp, lq) * temperature ** 2  # KL(q || p)


def weighted_kd(student_logits, teacher_logits, targets=None, temperature=1.0):
    """Weighted KD (paper Table 1): forward KL(p || q) per row; what makes it Weighted KD is its
    policy: position weights proportional to the metric (selection.POLICIES['weighted'])."""
    return kl_per_position(student_logits, teacher_logits, targets, temperature)




def ce_per_position(student_logits, teacher_logits, targets, temperature=1.0):
    """Cross-entropy -log q(y) per row at tau = 1 always (teacher and temperature are unused).

    A target outside [0, V) (e.g. ignore_index -100) scores 0: callers mask it out.
    """
    lq = log_probs(student_logits)
    V = lq.shape[-1]
    inside = (targets >= 0) & (targets < V)
    ce = -lq.gather(-1, targets.clamp(0, V - 1).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, ce, 0.0)


def dkd_terms(student_logits, teacher_logits, targets, temperature=1.0):
    """(TCKD, NCKD) per row of Decoupled KD (Zhao et al. 2022), fp32, each times tau^2.

    With b = [p(y), 1 - p(y)] the binary target/non-target split and p^ the teacher
    distribution renormalised over the non-target classes (same for q^, the student):
        TCKD = KL(b^p || b^q)
        NCKD = KL(p^ || q^)
    and KL(p || q) = TCKD + (1 - p(y)) * NCKD exactly (the DKD decomposition).
    log(1 - p(y)) is computed as logsumexp over the non-target log-probs (no cancellation).
    If the teacher puts all its mass on y, p^ is undefined and NCKD is set to 0 (its
    coefficient 1 - p(y) is 0 anyway). (..., V), (..., V), (...) -> (...), (...).
    """
    lp, lq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)  # (..., V)
    y = targets.unsqueeze(-1)
    lp_y, lq_y = lp.gather(-1, y).squeeze(-1), lq.gather(-1, y).squeeze(-1)  # (...)
    is_y = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, y, True)
    lp_rest = lp.masked_fill(is_y, float("-inf"))  # non-target log-probs, target removed
    lq_rest = lq.masked_fill(is_y, float("-inf"))
    lp_not, lq_not = _logsumexp(lp_rest), _logsumexp(lq_rest)  # log(1 - p(y)), log(1 - q(y))
    # binary KL; each of its two terms is 0 where the teacher's binary prob is 0
    tckd = kl_from_log_probs(torch.stack([lq_y, lq_not], -1), torch.stack([lp_y, lp_not], -1))
    # renormalised non-target distributions; guard rows where 1 - p(y) = 0 (all mass on y)
    has_rest = torch.isfinite(lp_not)
    lp_hat = lp_rest - torch.where(has_rest, lp_not, 0.0).unsqueeze(-1)
    lq_hat = lq_rest - torch.where(has_rest, lq_not, 0.0).unsqueeze(-1)
    nckd = torch.where(has_rest, kl_from_log_probs(lq_hat, lp_hat), 0.0)
    return tckd * temperature ** 2, nckd * temperature ** 2


def dkd_loss(student_logits, teacher_logits, targets, temperature=1.0, alpha=1.0, beta=8.0):
    """Decoupled KD per row: alpha * TCKD + beta * NCKD (Zhao et al. 2022), fp32.

    Unlike KL (= TCKD + (1 - p(y)) NCKD), NCKD is not suppressed on positions where the
    teacher is confident. Defaults alpha = 1, beta = 8 as in the DKD paper. See dkd_terms.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


# ----------------------------------------------------------------------------- AT-KD

def _atkd_uncertainty(teacher_logits, targets):
    """1 - p_t(y) per row (teacher at tau = 1): AT-KD's ranking signal."""
    return 1 - log_probs(teacher_logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()


def _atkd_row_coefs(unc, weights, hard_frac, lam):
    """Per-row coefficients of AT-KD given the uncertainty (N,) and row weights (N,).

    Rows are ranked by uncertainty 1 - p_t(y) (descending; ties keep row order); the first
    ceil(hard_frac * N) are hard. Each group's loss is the weighted mean of its rows,
        L_g = sum_{n in g} w_n l_n / sum_{n in g} w_n        (0 if the group is empty/weightless)
    and L = W * (lam * L_easy + (1 - lam) * L_hard), W = sum_n w_n. Returns (coef (N,), hard (N,) bool)
    with L = sum_n coef_n * l_n, where l_n = NCKD_n for easy rows and TCKD_n + NCKD_n for hard ones.
    """
    n = unc.shape[0]
    order = torch.sort(unc, descending=True, stable=True).indices
    hard = torch.zeros(n, dtype=torch.bool, device=unc.device)
    hard[order[:min(n, ceil_fraction(hard_frac, n))]] = True
    w = weights.float()
    w_hard, w_easy = (w * hard).sum(), (w * ~hard).sum()
    # clamp only guards the 0/0 of an empty group: then every w_n in it is 0 and so is coef_n
    coef = torch.where(hard, (1 - lam) * w / w_hard.clamp_min(1e-30), lam * w / w_easy.clamp_min(1e-30))
    return coef * w.sum(), hard


def atkd_per_position(student_logits, teacher_logits, targets, temperature=1.0, hard=None):
    """AT-KD's per-row term (Zhong et al. 2024): l = NCKD on easy rows, TCKD + NCKD on hard ones.

    hard (N,) bool marks the hard rows; None ranks the rows given here (the top half by 1 - p_t(y)).
    Its group means need every row first: head_loss sees `ranks_rows` and runs one no-grad pass
    that ranks all rows and turns the weights into group-mean coefficients (head_coefs).
    """
    if hard is None:
        unc = _atkd_uncertainty(teacher_logits, targets)
        hard = _atkd_row_coefs(unc, torch.ones_like(unc), 0.5, 0.2)[1]
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    return nckd + hard * tckd


def atkd_loss(student_logits, teacher_logits, targets, valid, hard_frac=0.5, lam=0.2):
    """AT-KD (Zhong et al. 2024, "Revisiting KD for Autoregressive LMs"), scalar fp32 (dense reference).

    The uncertainty of a position is 1 - p_t(y_t) (teacher at tau = 1). Among the valid
    positions, the top ceil(hard_frac * n_valid) by uncertainty are *hard*, the rest *easy*.
    Easy positions get only the non-target (diversity) term, hard ones target + non-target:
        l_easy = NCKD,   l_hard = TCKD + NCKD       (DKD terms, see dkd_terms)
    NCKD is used *decoupled*, without the (1 - p(y)) factor it has inside KL: on easy
    positions that factor is near 0 and would erase the only term they get.
    Normalisation: each group is averaged over its own positions (mean over easy, mean over
    hard), then L = lam * L_easy + (1 - lam) * L_hard, so lam sets the relative weight of
    the groups regardless of their sizes. An empty group contributes 0 (no renormalisation).
    student/teacher (..., V), targets (...), valid (...) bool -> scalar.
    """
    valid = valid.bool()
    s, t, y = student_logits[valid], teacher_logits[valid], targets[valid]  # (n, V), (n, V), (n,)
    unc = _atkd_uncertainty(t, y)  # (n,)
    coef, hard = _atkd_row_coefs(unc, torch.ones_like(unc), hard_frac, lam)
    coef = coef / max(1, unc.shape[0])  # W = n_valid above; the group means need W = 1
    return (coef * atkd_per_position(s, t, y, hard=hard)).sum()


# ----------------------------------------------------------------------------- RS-KD (class axis)

def rs_uniforms(seed, sample_ids, seq_len, U):
    """The uniforms of RS-KD's class draws: (B, seq_len, U) float64 on the CPU.

    Sample b's (seq_len, U) block comes from common.generator(seed, "rs-kd", sample_ids[b]) alone,
    so the classes drawn at a position depend on (seed, sample id, position) only, never on the
    batch, the selection, the rank or a resume: online RS-KD and the cache build draw the same.
    """
    blocks = [torch.rand(seq_len, U, dtype=torch.float64, generator=common.generator(seed, "rs-kd", int(i)))
              for i in sample_ids]
    return torch.stack(blocks) if blocks else torch.empty(0, seq_len, U, dtype=torch.float64)


@torch.no_grad()
def sample_classes(teacher_logits, uniforms, temperature=1.0, chunk_size=1024):
    """Draw U = uniforms.shape[1] classes per row from p = softmax(teacher_logits / tau), with replacement.

    teacher_logits (N, V), uniforms (N, U) in [0, 1) (rs_uniforms; moved to the logits' device)
    -> ids (N, U) long, counts (N, U) int32, on the logits' device: the unique drawn ids
    (ascending) first, each with how often it was drawn; padding id 0 / count 0 after them.
    The RS-KD target is p~(v) = count(v) / U, an unbiased estimate of p(v) (E[count] = U p(v)).
    Inverse CDF: draw u is class v when cdf(v-1) <= u * cdf(V) < cdf(v). p is fp32 (log_probs),
    its cdf is summed in fp64 (a V-long fp32 sum drifts), chunk_size rows at a time. A class
    with p = 0 (a -inf logit) is never drawn; a row with no finite logit is an error.
    """
    if teacher_logits.dim() != 2 or uniforms.dim() != 2 or uniforms.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"teacher_logits must be (N, V) and uniforms (N, U), got "
                         f"{tuple(teacher_logits.shape)} and {tuple(uniforms.shape)}")
    if uniforms.shape[1] < 1:
        raise ValueError("uniforms must hold U >= 1 draws per row")
    check_temperature(temperature)
    N, V = teacher_logits.shape
    uniforms = uniforms.to(teacher_logits.device, torch.float64)
    draws = torch.empty(uniforms.shape, dtype=torch.long, device=teacher_logits.device)  # (N, U)
    for i0, i1 in common.row_chunks(N, chunk_size):
        p = log_probs(teacher_logits[i0:i1], temperature).exp()  # (c, V) fp32
        cdf = p.cumsum(-1, dtype=torch.float64)  # (c, V), flat over classes with p = 0
        total = cdf[:, -1:]  # (c, 1), 1 up to rounding
        if not torch.isfinite(total).all():
            raise ValueError("teacher_logits has a row with no finite logit")
        # right=True: the first class whose cdf exceeds x, never one with p = 0 (its cdf equals
        # its predecessor's); the minimum guards x rounding up to the total
        idx = torch.searchsorted(cdf, uniforms[i0:i1] * total, right=True)  # (c, U)
        last = V - 1 - (p > 0).flip(-1).int().argmax(-1, keepdim=True)  # last class with p > 0
        draws[i0:i1] = torch.minimum(idx, last)
    drawn = draws.sort(dim=-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]  # first occurrence of each id in the sorted row
    slot = first.long().cumsum(-1) - 1  # (N, U) output slot of every draw
    counts = torch.zeros(drawn.shape, dtype=torch.int32, device=drawn.device).scatter_add_(
        -1, slot, torch.ones_like(drawn, dtype=torch.int32))
    ids = torch.zeros_like(drawn).scatter_(-1, slot, drawn)  # duplicates write the same id
    return ids, counts


def rs_kd_loss(student_logits, ids, probs, temperature=1.0):
    """RS-KD loss per row with a sparse teacher target (random-sampling KD).

        l = tau^2 * sum_u p~(v_u) (log p~(v_u) - log q(v_u)),   p~ = count / U

    with q = softmax(s / tau) the *full-vocabulary* student softmax (the teacher sample should
    come from sample_classes(..., temperature=tau)). Entries with prob 0 are padding and
    contribute 0. Its gradient w.r.t. the student logits, tau (q - p~), is an unbiased estimate
    of that of tau^2 KL(p || q). student_logits (N, V), ids (N, U) long, probs (N, U) -> (N,) fp32.
    """
    lq = log_probs(student_logits, temperature).gather(-1, ids)  # (N, U)
    return sparse_kl(lq, probs) * temperature ** 2


def sparse_kl(student_log_probs_at_ids, probs):
    """The one RS-KD KL: sum_u p~_u (log p~_u - lq_u) per row, fp32, no tau^2.

    student_log_probs_at_ids (N, U) = log q at the sampled ids, probs (N, U) = p~ (count / U);
    entries with p~ = 0 (padding) contribute exactly 0, in the value and the gradient, even
    where lq is -inf. -> (N,).
    """
    lq, pr = student_log_probs_at_ids, probs.float()
    keep = pr > 0
    diff = torch.where(keep, pr.clamp_min(1e-38).log(), 0.0) - torch.where(keep, lq, 0.0)
    return (pr * diff).sum(-1)


# ----------------------------------------------------------------------------- dense selective KD (reference)

def normalise_by_samples(weights):
    """weights (B, T) -> weights / |I|, I = sequences with any weight > 0 (paper Eq. 3-5).

    The one per-sequence normalisation: the step loss is a mean over *sequences* (not over
    selected tokens). This is the per-row weight `head_loss` expects (gather it with the same
    mask as the hidden states). With no selected sequence the weights (all 0) come back as they are.
    """
    return weights / (weights > 0).any(-1).sum().clamp_min(1)


def selective_kd_loss(kd, weights, ce=None, lam=1.0):
    """Selective KD step loss from dense per-position losses (paper Eq. 3-5), scalar fp32.

        L = 1/|I| sum_{i,t} w_{i,t} (lam * kd_{i,t} + (1 - lam) * ce_{i,t})

    kd, weights, ce: (B, T). I = sequences with any weight. Positions with weight 0 are
    excluded with `where` (not multiplied), so inf/NaN there cannot leak in. Equal to
    head_loss on the selected rows; this dense form is the reference and the simple path.
    """
    if lam != 1.0 and ce is None:
        raise ValueError("selective_kd_loss: lam != 1 needs the ce per-position losses")
    per = lam * kd.float() if lam != 0 else torch.zeros_like(weights, dtype=torch.float32)
    if lam != 1.0:
        per = per + (1 - lam) * ce.float()
    w = normalise_by_samples(weights.float())
    return torch.where(w > 0, w * per, 0.0).sum()


def selective_logits(hidden, head_weight, mask):
    """Selective LM head: logits only for the selected positions.

    hidden (B, T, d), head_weight (V, d), mask (B, T) bool -> (N, V), N = mask.sum().
    Gathers first, multiplies second, so the (B, T, V) logits are never formed.
    """
    return hidden[mask] @ head_weight.T


# ----------------------------------------------------------------------------- the training-step loss

@dataclass
class DenseTeacher:
    """Teacher given by its final hidden states of the selected rows and its LM head.

    hidden (N, d_t), head (V, d_t). Logits are computed per chunk, without grad, in fp32.
    """
    hidden: torch.Tensor
    head: torch.Tensor


@dataclass
class SparseTeacher:
    """RS-KD teacher target: ids (N, U) long, probs (N, U) float = counts / U, probs == 0 is padding.

    From the offline cache (cache.py) or from sample_classes on live teacher logits.
    """
    ids: torch.Tensor
    probs: torch.Tensor


def check_head_inputs(student_hidden, student_head, targets, weights, teacher, loss, temperature, lam,
                      chunk_size):
    """head_loss's inputs (both paths): a one-line ValueError naming the flag or argument that is wrong."""
    check_temperature(temperature)
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"--lam must be in [0, 1], got {lam}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.dim() != 2 or student_head.dim() != 2 \
            or student_hidden.shape[1] != student_head.shape[1]:
        raise ValueError(f"student_hidden (N, d) and student_head (V, d) mismatch: "
                         f"{tuple(student_hidden.shape)} vs {tuple(student_head.shape)}")
    N, V = student_hidden.shape[0], student_head.shape[0]
    if targets.shape != (N,) or weights.shape != (N,):
        raise ValueError(f"targets and weights must be ({N},), got {tuple(targets.shape)} "
                         f"and {tuple(weights.shape)}")
    if N and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"targets must be in [0, {V}) (padding rows must not be selected)")
    if lam == 0:
        return
    if isinstance(teacher, SparseTeacher):
        if not supports_rs_kd(loss):
            raise ValueError(f"--loss {loss} needs full teacher logits; "
                             "a sparse (RS-KD) teacher only supports forward KL (--loss kl or weighted)")
        if teacher.ids.shape[0] != N or teacher.probs.shape != teacher.ids.shape:
            raise ValueError(f"SparseTeacher ids/probs must both be ({N}, U), got "
                             f"{tuple(teacher.ids.shape)} and {tuple(teacher.probs.shape)}")
        if N and (teacher.ids.min() < 0 or teacher.ids.max() >= V):
            raise ValueError(f"SparseTeacher ids must be in [0, {V})")
    elif isinstance(teacher, DenseTeacher):
        if teacher.hidden.dim() != 2 or teacher.hidden.shape[0] != N \
                or teacher.head.shape != (V, teacher.hidden.shape[1]):
            raise ValueError(f"DenseTeacher hidden must be ({N}, d_t) and head ({V}, d_t) "
                             f"(same vocabulary as the student; slice a padded head to {V}), "
                             f"got {tuple(teacher.hidden.shape)} and {tuple(teacher.head.shape)}")
    elif teacher is None:
        raise ValueError("teacher is None but --lam > 0 needs a teacher")
    else:
        raise ValueError(f"teacher must be DenseTeacher or SparseTeacher, got {type(teacher).__name__}")


def head_coefs(kd_fn, teacher_rows, targets, weights, chunks, lam, hard_frac=0.5, atkd_lam=0.2):
    """head_loss's weights as per-row coefficients: L = sum_n kd_coef_n kd_n + ce_coef_n ce_n.

    kd_coef = lam w (None when lam = 0: no KD term), ce_coef = (1 - lam) w (None when lam = 1). A loss
    that `ranks_rows` (AT-KD) first needs every row: one no-grad pass over the chunks of teacher logits
    (teacher_rows(i0, i1) -> (c, V)) ranks the rows and makes its group-mean coefficients
    (_atkd_row_coefs); it returns its hard mask (N,) bool too, else hard is None.
    """
    w = weights.detach().float()
    kd_coef, ce_coef, hard = (lam * w if lam > 0 else None), ((1 - lam) * w if lam < 1 else None), None
    if kd_coef is not None and getattr(kd_fn, "ranks_rows", False):
        with torch.no_grad():
            unc = torch.cat([_atkd_uncertainty(teacher_rows(i0, i1), targets[i0:i1]) for i0, i1 in chunks]
                            or [w.new_zeros(0)])
        coef, hard = _atkd_row_coefs(unc, w, hard_frac, atkd_lam)
        kd_coef = lam * coef
    return kd_coef, ce_coef, hard


def rows_loss(student_logits, teacher_rows, targets, kd_coef, ce_coef, kd_fn=kl_per_position,
              temperature=1.0, hard=None):
    """sum_n kd_coef_n kd_n + ce_coef_n ce_n over one chunk of rows, fp32 scalar (coefficients: head_coefs).

    student_logits (c, V); teacher_rows: (c, V) teacher logits -> kd_n = kd_fn at tau (AT-KD gets its
    hard rows), or a SparseTeacher of c rows -> kd_n = rs_kd_loss; ce_n = -log q(y_n) at tau = 1.
    kd_coef / ce_coef (c,) or None (that term is off). `where`, not a product, so a 0-weight row with an
    infinite loss adds nothing.
    """
    z, y = student_logits, targets
    out = z.new_zeros((), dtype=torch.float32)
    if kd_coef is not None:
        if isinstance(teacher_rows, SparseTeacher):
            kd = rs_kd_loss(z, teacher_rows.ids, teacher_rows.probs, temperature)
        elif hard is not None:
            kd = kd_fn(z, teacher_rows, y, temperature, hard=hard)
        else:
            kd = kd_fn(z, teacher_rows, y, temperature)
        out = out + torch.where(kd_coef > 0, kd_coef * kd, 0.0).sum()
    if ce_coef is not None:
        out = out + torch.where(ce_coef > 0, ce_coef * ce_per_position(z, None, y), 0.0).sum()
    return out


def head_loss(student_hidden, student_head, targets, weights, teacher, loss="kl",
              temperature=1.0, lam=1.0, chunk_size=1024, hard_frac=0.5, atkd_lam=0.2):
    """Selective KD loss of one training step, straight from hidden states (paper Eq. 3-5).

        L = sum_n w_n * (lam * kd_n + (1 - lam) * ce_n)

    student_hidden (N, d): the student's final hidden states of the selected rows only
    (h_s[sel], sel = weights_BT > 0); student_head (V, d) its LM head (may be tied to the
    embedding); targets (N,) long the next tokens; weights (N,) the selection weights of those
    rows already divided by the number of sequences with any weight (normalise_by_samples),
    so L is exactly Eq. 3-5. lam is the KD weight; ce_n = -log q(y_n) at tau = 1.

    teacher: DenseTeacher(hidden (N, d_t), head (V, d_t)) -> kd_n = LOSSES[loss] at tau
    (teacher logits per chunk, no grad), or SparseTeacher(ids, probs) -> kd_n = rs_kd_loss
    (forward KL only, see supports_rs_kd), or None when lam == 0 (pure CE).

    A loss marked `ranks_rows` (AT-KD): a first chunked no-grad pass computes p_t(y) for every
    row; the top ceil(hard_frac * N) rows by 1 - p_t(y) are hard (tau = 1 for the ranking). The
    weights act inside each group as a weighted mean (sum_g w_n l_n / sum_g w_n, so the
    selection policy's relative weights are kept), and the two group means are combined as
    atkd_lam * easy + (1 - atkd_lam) * hard, then multiplied by W = sum_n w_n so the KD term
    has the same overall scale as the other losses (with w_n = 1/N it equals atkd_loss).

    Memory: logits exist for at most chunk_size rows at a time, in forward and backward (each
    chunk is checkpointed). Returns an fp32 scalar; with N = 0 it is a 0 still connected to
    student_head/student_hidden, so backward() works and gives zero grads.
    fused_head.head_loss is the same function, faster.
    """
    check_head_inputs(student_hidden, student_head, targets, weights, teacher, loss, temperature, lam,
                      chunk_size)
    kd_fn, chunks = LOSSES[loss], common.row_chunks(student_hidden.shape[0], chunk_size)

    def teacher_rows(i0, i1):  # what rows i0:i1's KD term is measured against, no grad
        if isinstance(teacher, SparseTeacher):
            return SparseTeacher(teacher.ids[i0:i1], teacher.probs[i0:i1])
        with torch.no_grad():
            return (teacher.hidden[i0:i1] @ teacher.head.to(teacher.hidden.dtype).T).float()  # (c, V)

    # lam w and (1 - lam) w per row; AT-KD (`ranks_rows`) first ranks every row by a no-grad teacher pass
    kd_coef, ce_coef, hard = head_coefs(kd_fn, teacher_rows, targets, weights, chunks, lam, hard_frac, atkd_lam)

    def chunk_loss(h, W, i0, i1):  # rows i0:i1 -> scalar; the only (c, V) logits alive
        z = (h @ W.T).float()  # (c, V)
        t = teacher_rows(i0, i1) if lam > 0 else None
        kd_c, ce_c, hard_c = (None if c is None else c[i0:i1] for c in (kd_coef, ce_coef, hard))
        return rows_loss(z, t, targets[i0:i1], kd_c, ce_c, kd_fn, temperature, hard_c)

    # checkpoint: backward recomputes a chunk's logits instead of keeping them (memory bounded by a chunk)
    grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    total = (student_hidden[:0].sum() + student_head[:0].sum()).float()  # 0, connected to both inputs
    for i0, i1 in chunks:
        args = (student_hidden[i0:i1], student_head, i0, i1)
        total = total + (checkpoint(chunk_loss, *args, use_reentrant=False) if grad else chunk_loss(*args))
    return total


# ----------------------------------------------------------------------------- the loss registry

def policy_for(loss_name, policy):
    """The selection policy a run with --loss loss_name uses: the loss's own `policy` tag
    (Weighted KD -> 'weighted') or else --policy."""
    return getattr(LOSSES[loss_name], "policy", policy)


def supports_rs_kd(loss_name):
    """Whether --loss loss_name can train on a sparse RS-KD target: its `rs_kd` tag says that rs_kd_loss
    (an unbiased estimate of forward KL's gradient) may stand in for it."""
    return getattr(LOSSES.get(loss_name), "rs_kd", False)


# What a loss needs beyond (student_logits, teacher_logits, targets, temperature), as function attributes
# read with getattr and a default: `policy` (the selection policy it brings), `ranks_rows` (head_loss ranks
# every row first and passes hard=), `rs_kd` (a sparse RS-KD target may replace it). No tag picks a
# gradient: fused_head's closed form is chosen by the function itself, so any new loss trains on its body.
weighted_kd.policy = "weighted"
kl_per_position.rs_kd = weighted_kd.rs_kd = True
atkd_per_position.ranks_rows = True

# `--loss NAME`: fn(student_logits, teacher_logits, targets, temperature=1.0) -> (N,) fp32.
# A new loss is one function plus one line here.
LOSSES = {
    "kl": kl_per_position,                  # Full / selective KD, forward KL(p || q)
    "weighted": weighted_kd,                # Weighted KD: forward KL, weights proportional to the metric
    "reverse_kl": reverse_kl_per_position,  # KL(q || p), on-policy distillation (Table 5)
    "dkd": dkd_loss,                        # Decoupled KD (Zhao et al. 2022): 1 * TCKD + 8 * NCKD
    "atkd": atkd_per_position,              # AT-KD (Zhong et al. 2024), group means via head_loss
}
