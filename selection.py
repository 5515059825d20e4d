"""Selection along the position and sample axes of selective knowledge distillation.

Tavor et al., "Rethinking Selective Knowledge Distillation" (arXiv 2602.01395), split selective KD
into three axes: which token *positions* get teacher supervision, which vocabulary *classes* (see
losses.py / cache.py, RS-KD) and which training *samples*. This module holds the first and the last,
as plain tensor functions.

Notation (as in the paper)
    p_t   teacher distribution over the vocabulary at position t   = softmax(teacher logits)
    q_t   student distribution at position t                       = softmax(student logits)
    y_t   the target (next) token at position t
    m_t   selection mask/weight of position t (here: w[b, t], already normalised, see below)
    s_i   score of training sample i

A selective KD run is metric + policy:

1. An importance *metric* (Table 1) scores every position, e.g. the student entropy H(q_t).
   ``METRICS[name](student_logits, teacher_logits, targets, generator=None) -> scores``
   logits (..., V) of any float dtype, targets (...) integer, scores (...) float32. All math in fp32.
   Scores are constants: inputs are detached, nothing here is ever back-propagated.

2. A selection *policy* turns scores into per-position weights.
   ``POLICIES[name](scores (B, T), valid (B, T) bool, k, **kw) -> w (B, T) float32``
   The weights already hold Eq. 4's per-sequence normalisation, so the KD loss of sequence b is
   ``sum_t w[b, t] * l[b, t]`` with l the per-position KL(p_t || q_t); for a hard mask m this is
   (1 / sum_t m_t) * sum_t m_t l_t. Invalid (padding/prompt) positions always get weight 0, and a
   sequence with nothing selected gets an all-zero row, which ``batch_mean`` leaves out of the batch
   average (never a 0/0 = NaN). Every policy accepts and ignores keyword arguments it does not use, so
   train.py can call them all alike:
   ``POLICIES[name](scores, valid, k, generator=g, progress=p, state=gls_queue, temperature=tau)``.

   The budget of sequence b is K_b = ceil(k * n_b), n_b = its number of valid positions (Eq. 6).
   k is read as an exact decimal (0.28 means 28/100, so ceil(0.28 * 25) = 7 even though the float
   product is 7.000000000000001), and any non-empty sequence gets at least one position.

3. Sample selection keeps the ceil(l * N) samples with the highest score s_i, where s_i is the mean
   of a metric over the valid positions of sample i (the CE ratio: L_s(x) / L_t(x); random: one
   uniform per sample), computed by a frozen student (``sample_scores``) without ever materialising
   the (B, T, V) logits (``chunked_scores``, the paper's efficiency point).

Shapes: B batch, T positions, V vocabulary, d hidden size, N samples.
"""

import math

import torch

import common
import fused_head
import losses

# ---------------------------------------------------------------------------------------------
# small helpers


def check_fraction(x, name):
    """Return x as a float if 0 < x <= 1, else raise a one-line ValueError naming the CLI flag."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be in (0, 1], got {x}") from None
    if not (0.0 < v <= 1.0):  # also rejects NaN
        raise ValueError(f"--{name} must be in (0, 1], got {x}")
    return v


def num_selected(valid, k):
    """Budget K_b = ceil(k * n_b) per row of valid (B, T) -> (B,) int64 (Eq. 6).

    Exact integer arithmetic; 1 <= K_b <= n_b for a non-empty row, 0 for an empty one.
    """
    k = check_fraction(k, "k")
    n = valid.sum(-1).long()  # (B,)
    K = losses.ceil_fraction(k, n)  # k read as the decimal it prints as
    K = torch.minimum(K.clamp(min=1), n)  # tiny k still keeps one position; an empty row keeps 0
    return K


def _check_policy_inputs(scores, valid):
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, T), got shape {tuple(scores.shape)}")
    if valid.shape != scores.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must have the shape of scores {tuple(scores.shape)}")
    return scores.detach().float(), valid.bool()


def _normalise(sel, valid):
    """Hard mask (B, T) -> weights 1/count on each selected valid position; zero rows stay zero.

    This is Eq. 4's within-sequence mean (1 / sum_t m_t); the mean over sequences is
    losses.normalise_by_samples, applied later to the weights of the whole batch."""
    sel = sel & valid
    cnt = sel.sum(-1, keepdim=True).clamp(min=1)  # clamp: an empty row is 0/1 = 0, not 0/0
    return sel.float() / cnt


def _rank_desc(scores, valid):
    """Rank (B, T) int64 of every position in the order (valid first, score descending, earlier
    position first among equal scores). Valid positions of row b get ranks 0 .. n_b - 1.

    Tie rule: two sorts, both stable. NaN scores count as -inf (the least important).
    """
    B, T = scores.shape
    s = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (B, T)
    invalid = (~valid).gather(-1, order).to(torch.uint8)  # 0 = valid, 1 = padding
    order = order.gather(-1, torch.sort(invalid, dim=-1, stable=True).indices)  # valid first
    pos = torch.arange(T, device=scores.device).expand(B, T)
    return torch.empty_like(order).scatter_(-1, order, pos)  # rank[b, order[b, j]] = j


def _draw_device(generator, device):
    # A torch.Generator only feeds tensors on its own device; draw there, then move to the input's.
    return generator.device if generator is not None else device


def _rand(shape, device, generator):
    d = _draw_device(generator, device)
    return torch.rand(shape, generator=generator, device=d).to(device)


def batch_mean(weights, position_losses):
    """Eq. 4 batch loss: mean over sequences with any weight of sum_t w[b, t] * l[b, t].

    Rows with no weight (no valid / no selected position) are left out of the mean; an all-empty
    batch gives 0, never NaN. weights, position_losses: (B, T) -> scalar float32.
    (= losses.selective_kd_loss, which uses losses.normalise_by_samples.)
    """
    return losses.selective_kd_loss(position_losses, weights)


# ---------------------------------------------------------------------------------------------
# metrics (Table 1): fn(student_logits, teacher_logits, targets, generator=None) -> scores (...)

# A ratio's denominator is clamped here: a teacher that is (numerically) certain of y_t has
# CE_t = -log p_t(y_t) ~ 0, and the ratio becomes CE_s / 1e-6 (large but finite) instead of inf/NaN.
CE_EPS = 1e-6


def _checked(logits, name, targets):
    """The logits a metric reads, detached, after checking them against the targets."""
    if logits is None:
        raise ValueError(f"{name} is required by this metric, got None")
    if not torch.is_floating_point(logits):
        raise ValueError(f"{name} must be a float tensor, got {logits.dtype}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"{name} {tuple(logits.shape)} must be targets {tuple(targets.shape)} + (V,)")
    return logits.detach()


def _check_targets(targets):
    if targets is None or torch.is_floating_point(targets) or targets.is_complex():
        raise ValueError("targets must be an integer tensor of token ids")
    return targets.detach()


def _both(student_logits, teacher_logits, targets):
    targets = _check_targets(targets)
    s = _checked(student_logits, "student_logits", targets)
    t = _checked(teacher_logits, "teacher_logits", targets)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"student and teacher vocabularies differ: {s.shape[-1]} vs {t.shape[-1]}")
    return s, t, targets


def _ce(logits, targets):
    # -log p(y); a target outside [0, V) (e.g. ignore_index -100) scores 0: callers mask it by `valid`
    return losses.ce_per_position(logits, None, targets)


def student_entropy(student_logits, teacher_logits, targets, generator=None):
    """Student entropy H(q_t) = -sum_v q_t(v) log q_t(v) (Table 1; SE-KD's signal)."""
    targets = _check_targets(targets)
    return fused_head.entropy(_checked(student_logits, "student_logits", targets))


def teacher_entropy(student_logits, teacher_logits, targets, generator=None):
    """Teacher entropy H(p_t) = -sum_v p_t(v) log p_t(v) (Table 1)."""
    targets = _check_targets(targets)
    return fused_head.entropy(_checked(teacher_logits, "teacher_logits", targets))


def student_ce(student_logits, teacher_logits, targets, generator=None):
    """Student cross-entropy CE_s = -log q_t(y_t) (Table 1)."""
    targets = _check_targets(targets)
    return _ce(_checked(student_logits, "student_logits", targets), targets)


def teacher_ce(student_logits, teacher_logits, targets, generator=None):
    """Teacher cross-entropy CE_t = -log p_t(y_t) (Table 1)."""
    targets = _check_targets(targets)
    return _ce(_checked(teacher_logits, "teacher_logits", targets), targets)


def kl(student_logits, teacher_logits, targets, generator=None):
    """Forward KL(p_t || q_t) = sum_v p_t(v) log(p_t(v) / q_t(v)), the per-position KD loss (Table 1)."""
    return losses.kl_per_position(*_both(student_logits, teacher_logits, targets))


def reverse_kl(student_logits, teacher_logits, targets, generator=None):
    """Reverse KL(q_t || p_t) = sum_v q_t(v) log(q_t(v) / p_t(v)) (Table 1)."""
    return losses.reverse_kl_per_position(*_both(student_logits, teacher_logits, targets))


def kl_student_entropy(student_logits, teacher_logits, targets, generator=None):
    """KL + student entropy: KL(p_t || q_t) + H(q_t), a plain unweighted sum as in Table 1.

    No term is rescaled: both are in nats, and rescaling would be a different metric from the paper's.
    """
    s, t, targets = _both(student_logits, teacher_logits, targets)
    return losses.kl_per_position(s, t) + fused_head.entropy(s)


def ce_ratio(student_logits, teacher_logits, targets, generator=None):
    """CE ratio CE_s / CE_t = log q_t(y_t) / log p_t(y_t) (Table 1): high where the student is far
    worse on the target than the teacher. Guard: the denominator is clamped to >= CE_EPS (1e-6)."""
    s, t, targets = _both(student_logits, teacher_logits, targets)
    return _ce(s, targets) / _ce(t, targets).clamp(min=CE_EPS)


def ce_ratio_student_entropy(student_logits, teacher_logits, targets, generator=None):
    """CE ratio + student entropy: CE_s / max(CE_t, 1e-6) + H(q_t), a plain sum as in Table 1
    (no normalisation of either term)."""
    s, t, targets = _both(student_logits, teacher_logits, targets)
    return _ce(s, targets) / _ce(t, targets).clamp(min=CE_EPS) + fused_head.entropy(s)


def random_metric(student_logits, teacher_logits, targets, generator=None):
    """Random baseline (Table 1): s_t ~ U[0, 1) i.i.d. from `generator`; reads no logits at all."""
    targets = _check_targets(targets)
    return _rand(targets.shape, targets.device, generator)


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")


def needs_teacher(metric):
    """True if METRICS[metric] reads teacher logits: its `reads_teacher` tag (default False)."""
    _check_metric(metric)
    return getattr(METRICS[metric], "reads_teacher", False)


def _reads_student(metric):
    """True unless METRICS[metric] is tagged `reads_student = False` (it never reads the student)."""
    return getattr(METRICS[metric], "reads_student", True)


def needs_scores(policy, k):
    """Whether a step must score positions at all. Not for a policy tagged `reads_scores = False` (random),
    nor for top_k at k = 1 (it takes every valid position): Full KD pays for no scoring pass, as in the
    paper's Full KD baseline."""
    return getattr(POLICIES.get(policy), "reads_scores", True) and not (policy == "top_k" and k >= 1.0)


# ---------------------------------------------------------------------------------------------
# position policies: fn(scores (B, T), valid (B, T), k, **kw) -> weights (B, T) float32


def top_k(scores, valid, k, **kw):
    """Top-k% per sequence (Eq. 6): the K_b = ceil(k * n_b) highest-scoring valid positions of each
    sequence, weight 1 / K_b each. Ties: the earlier position wins (deterministic)."""
    s, valid = _check_policy_inputs(scores, valid)
    K = num_selected(valid, k)  # (B,)
    sel = _rank_desc(s, valid) < K[:, None]  # (B, T)
    return _normalise(sel, valid)


def random_positions(scores, valid, k, generator=None, **kw):
    """Random positions: K_b = ceil(k * n_b) valid positions uniformly without replacement, weight
    1 / K_b. (Top-K of i.i.d. uniform keys is a uniform K-subset.) scores only give the shape."""
    s, valid = _check_policy_inputs(scores, valid)
    keys = _rand(s.shape, s.device, generator)  # (B, T)
    sel = _rank_desc(keys, valid) < num_selected(valid, k)[:, None]
    return _normalise(sel, valid)


def curriculum(scores, valid, k, progress=None, **kw):
    """Curriculum: a window of K_b = ceil(k * n_b) positions over the score-sorted valid positions,
    sliding from the easiest (lowest scores) at progress 0 to the hardest (highest) at progress 1.

    The paper's arithmetic: progress = step / curriculum_steps (clamped to 1 after the curriculum;
    SELECTION_CURRICULUM_STEPS = 4000 in the paper) and, with positions sorted ascending
    (rank a = 0 .. n_b - 1), the window a in [start, start + K_b) with
        start = floor(progress * (n_b - K_b)).
    progress is read as the exact decimal it prints as (like k), so 0.29 * 100 floors to 29, not 28.
    The order is top_k's reversed, so progress=1 equals top_k exactly (ties: earlier position
    counts as harder).
    """
    s, valid = _check_policy_inputs(scores, valid)
    if progress is None:
        raise ValueError("curriculum needs progress= in [0, 1]")
    p = float(progress)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    K = num_selected(valid, k)[:, None]  # (B, 1)
    n = valid.sum(-1, keepdim=True).long()  # (B, 1)
    asc = n - 1 - _rank_desc(s, valid)  # ascending rank; valid positions get 0 .. n_b - 1
    num, den = losses.decimal_fraction(p)
    start = (n - K) * num // den  # floor(progress * (n_b - K_b)), exact, in [0, n_b - K_b]
    sel = (asc >= start) & (asc < start + K)
    return _normalise(sel, valid)


def weighted(scores, valid, k=1.0, **kw):
    """Weighted KD (Table 1's loss): w[b, t] = s_t / sum_t' s_t' over valid positions; every valid
    position is supervised in proportion to its score. Scores are clamped at >= 0 (NaN -> 0,
    +inf -> the largest float); a sequence whose scores sum to 0 falls back to uniform 1 / n_b.
    k is ignored (the policy-shaped signature lets train.py call it like the others)."""
    s, valid = _check_policy_inputs(scores, valid)
    return _position_probs(s, valid, 1.0)


def _position_probs(s, valid, temperature):
    """q(t) proportional to max(s_t, 0) ** (1 / temperature) over valid positions; rows sum to 1,
    zero-mass rows are uniform, empty rows are all zero. (B, T) float32."""
    tau = float(temperature)
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError(f"--pos-rs-temp must be a positive number, got {temperature}")
    big = torch.finfo(torch.float32).max
    s = torch.nan_to_num(s, nan=0.0, posinf=big, neginf=0.0).clamp(min=0)
    s = torch.where(valid, s, torch.zeros_like(s))
    # divide by the row max first: same ratios, but the sum cannot overflow and s ** (1/tau) of a
    # value in [0, 1] cannot either (for tau < 1 the maximum stays exactly 1)
    m = s.amax(-1, keepdim=True)
    s = torch.where(m > 0, s / m.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(s))
    if tau != 1.0:
        s = s ** (1.0 / tau)
    tot = s.sum(-1, keepdim=True)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    uniform = valid.float() / n
    return torch.where(tot > 0, s / tot.clamp(min=torch.finfo(torch.float32).tiny), uniform)


def _pos_rs_draw(scores, valid, k, generator, temperature):
    """K_b draws per row with replacement from q; returns counts c (B, T), K (B,), q (B, T)."""
    s, valid = _check_policy_inputs(scores, valid)
    q = _position_probs(s, valid, 1.0 if temperature is None else temperature)
    K = num_selected(valid, k)  # (B,)
    B, T = s.shape
    counts = torch.zeros(B, T, device=s.device)
    kmax = int(K.max()) if B > 0 else 0  # one host sync: the number of draws to make
    if kmax > 0:
        # empty rows get any proper distribution so multinomial accepts them; their draws are dropped
        qq = torch.where(K[:, None] > 0, q, torch.ones_like(q))
        d = _draw_device(generator, s.device)
        idx = torch.multinomial(qq.to(d), kmax, replacement=True, generator=generator).to(s.device)
        keep = (torch.arange(kmax, device=s.device)[None, :] < K[:, None]).float()  # (B, kmax)
        counts.scatter_add_(-1, idx, keep)
    return counts, K, q, valid


def pos_rs(scores, valid, k, generator=None, temperature=1.0, **kw):
    """Position random sampling (Appendix A): draw K_b = ceil(k * n_b) positions with replacement,
    P(t) = q(t) proportional to max(s_t, 0) ** (1 / temperature) (temperature > 1 flattens q toward
    uniform), and weight w_t = c_t / K_b with c_t the number of times t was drawn.

    E[c_t] = K_b q(t), so E[sum_t w_t l_t] = sum_t q(t) l_t: at temperature 1 an unbiased estimator
    of Weighted KD (exactly the `weighted` policy's weights)."""
    counts, K, q, valid = _pos_rs_draw(scores, valid, k, generator, temperature)
    return counts / K.clamp(min=1)[:, None].float()


def pos_rs_star(scores, valid, k, generator=None, temperature=1.0, **kw):
    """Position RS* (Appendix A): the same draws as pos_rs with importance weights
    w_t = c_t / (K_b * n_b * q(t)), so E[w_t] = 1 / n_b and E[sum_t w_t l_t] = (1/n_b) sum_t l_t:
    an unbiased estimator of Full KD (for any temperature) over the support of q. A position with
    score 0 (while some other has mass) is never drawn, so its loss is not represented."""
    counts, K, q, valid = _pos_rs_draw(scores, valid, k, generator, temperature)
    n = valid.sum(-1, keepdim=True).float()
    denom = K[:, None].float() * n * q
    drawn = counts > 0  # drawn implies q > 0, so the division is safe where it is used
    return torch.where(drawn, counts / denom.clamp(min=torch.finfo(torch.float32).tiny),
                       torch.zeros_like(counts))


class GLSQueue:
    """Ring buffer of the most recent valid position scores, for Global-Level Selection.

    push(scores) appends (oldest dropped beyond maxlen), quantile(q) is torch.quantile (linear
    interpolation) over what is held, len() is how many are held. Lives on the device of the scores.
    """

    def __init__(self, maxlen=30000):
        if int(maxlen) != maxlen or maxlen < 1:
            raise ValueError(f"GLS queue maxlen must be a positive integer, got {maxlen}")
        self.maxlen = int(maxlen)
        self.buf = None  # (maxlen,) float32, allocated on first push
        self.ptr = 0  # next slot to write
        self.count = 0

    def __len__(self):
        return self.count

    def push(self, scores):
        x = scores.detach().float().reshape(-1)
        x = x[~torch.isnan(x)]  # a NaN would poison every later quantile
        n = x.numel()
        if n == 0:
            return
        if self.buf is None:
            self.buf = torch.zeros(self.maxlen, device=x.device)
        elif self.buf.device != x.device:
            self.buf = self.buf.to(x.device)
        if n >= self.maxlen:  # only the newest maxlen survive
            self.buf = x[-self.maxlen:].clone()
            self.ptr, self.count = 0, self.maxlen
            return
        idx = (self.ptr + torch.arange(n, device=x.device)) % self.maxlen
        self.buf[idx] = x
        self.ptr = (self.ptr + n) % self.maxlen
        self.count = min(self.count + n, self.maxlen)

    def values(self):
        """The held scores, oldest first, (len,) float32."""
        if self.buf is None:
            return torch.zeros(0)
        if self.count < self.maxlen:
            return self.buf[: self.count]
        return torch.roll(self.buf, -self.ptr)

    def quantile(self, q):
        if self.count == 0:
            raise ValueError("GLS queue is empty: push scores before asking for a quantile")
        if not (0.0 <= float(q) <= 1.0):
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        return torch.quantile(self.values(), float(q))

    def state_dict(self):
        return {"maxlen": self.maxlen, "values": self.values().cpu().clone()}

    def load_state_dict(self, sd):
        self.__init__(sd["maxlen"])
        self.push(sd["values"])


def gls(scores, valid, k, state=None, **kw):
    """Global-Level Selection (Eq. 6): select valid positions whose score is >= a global
    threshold, the (1 - k) quantile of `state` (a GLSQueue of recent scores, default 30,000), then
    normalise per sequence (weight 1 / count). The threshold uses only *previous* batches' scores:
    this batch's valid scores are pushed after it is computed. Before the queue holds anything the
    policy is top_k; k = 1 selects every valid position. A sequence with no position above the
    threshold gets an all-zero row (it contributes no KD loss this step)."""
    s, valid = _check_policy_inputs(scores, valid)
    if not isinstance(state, GLSQueue):
        raise ValueError("gls needs state=GLSQueue(...), the queue of recent scores")
    k = check_fraction(k, "k")
    if k >= 1.0:
        w = _normalise(valid, valid)
    elif len(state) == 0:
        w = top_k(s, valid, k)
    else:
        thr = state.quantile(1.0 - k)
        w = _normalise(s >= thr, valid)  # Eq. 6: ties with the threshold are selected
    state.push(s[valid])  # after: the threshold never sees the batch it selects from
    return w


# ---------------------------------------------------------------------------------------------
# scoring from hidden states without (B, T, V) logits, and sample selection


def chunked_scores(metric, student_hidden, student_head, targets, teacher_hidden=None,
                   teacher_head=None, chunk_size=1024, generator=None):
    """METRICS[metric] for every position, computed chunk_size rows at a time from hidden states.

    student_hidden (B, T, d) is the state right before the LM head (after the final norm),
    student_head (V, d) its weight; logits = hidden @ head.T. Only chunk_size rows of logits (and
    their fp32 softmax temporaries) are ever alive. The matmul runs in the head's dtype, as the
    model's own lm_head would; the metric math is fp32. Runs under torch.no_grad.
    The `random` metric reads no logits: it is drawn once for all (B, T), like the dense call.
    Returns (B, T) float32 on the targets' device.
    """
    _check_metric(metric)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    targets = _check_targets(targets)
    if targets.dim() != 2:
        raise ValueError(f"targets must be (B, T), got shape {tuple(targets.shape)}")
    B, T = targets.shape
    fn = METRICS[metric]
    reads_s, reads_t = _reads_student(metric), needs_teacher(metric)
    if not (reads_s or reads_t):  # random: drawn once for all (B, T), like the dense call
        return fn(None, None, targets, generator=generator)

    def rows(hidden, head, who):
        if hidden is None or head is None:
            raise ValueError(f"metric {metric!r} needs {who}_hidden and {who}_head")
        if hidden.shape[:2] != (B, T) or hidden.dim() != 3:
            raise ValueError(f"{who}_hidden must be (B, T, d) = ({B}, {T}, d), got {tuple(hidden.shape)}")
        if head.dim() != 2 or head.shape[1] != hidden.shape[2]:
            raise ValueError(f"{who}_head must be (V, {hidden.shape[2]}), got {tuple(head.shape)}")
        return hidden.reshape(B * T, -1)

    hs = rows(student_hidden, student_head, "student") if reads_s else None
    ht = rows(teacher_hidden, teacher_head, "teacher") if reads_t else None
    y = targets.reshape(-1)
    out = torch.empty(B * T, dtype=torch.float32, device=targets.device)
    rows_max = min(int(chunk_size), B * T)
    s_logits, t_logits = fused_head.ChunkLogits(rows_max), fused_head.ChunkLogits(rows_max)  # one buffer each

    with torch.no_grad():
        Ws = fused_head.matmul_weight(student_head.detach()) if reads_s else None  # cast once, not per chunk
        Wt = fused_head.matmul_weight(teacher_head.detach()) if reads_t else None
        for i0, i1 in common.row_chunks(B * T, int(chunk_size)):
            ls = s_logits(hs[i0:i1].to(Ws.dtype), Ws) if reads_s else None  # (c, V)
            lt = t_logits(ht[i0:i1].to(Wt.dtype), Wt) if reads_t else None  # (c, V)
            out[i0:i1] = fn(ls, lt, y[i0:i1], generator=generator)
            del ls, lt  # free this chunk's logits (outside a buffer) before the next one is built
    return out.view(B, T)


DEFAULT_SAMPLE_METRIC = "student_entropy"  # the paper's sample score: mean H(q_t) of a frozen student


def sample_scores(metric, student_hidden, student_head, targets, valid, teacher_hidden=None,
                  teacher_head=None, chunk_size=1024, sample_ids=None, seed=0):
    """Sample score s_i of each sample (row) i, for select_samples. metric=None means
    'student_entropy' of a frozen student (the paper's default); then:

      'random' (RandomSmp): one uniform per sample, u_i = common.seed_from(seed, "random-sample", id_i)
          / 2^63, keyed by sample_ids; its law does not depend on the sample's length (a mean of
          per-position uniforms would: short samples have more variance and win the top-l% more often).
      'ce_ratio' (DA-KD, paper Sec. 2): L_s(x) / L_t(x), the ratio of the sequence losses (mean CE
          over the valid positions of student and teacher; the denominator is clamped at CE_EPS),
          not the mean of the per-token ratios.
      any other metric: the mean of METRICS[metric] over the valid positions of sample i.

    Shapes as chunked_scores with N samples in place of B; valid (N, T); sample_ids (N,) ints (needed
    by 'random'). Returns (N,) float32; a sample with no valid position gets -inf so select_samples
    never keeps it. Call it batch by batch and concatenate.
    """
    metric = DEFAULT_SAMPLE_METRIC if metric is None else metric
    valid = valid.bool()
    if valid.shape != targets.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must have the shape of targets {tuple(targets.shape)}")
    n = valid.sum(-1)

    def mean_of(name):  # (N,) mean of a position metric over the valid positions
        per = chunked_scores(name, student_hidden, student_head, targets, teacher_hidden, teacher_head,
                             chunk_size)  # (N, T)
        per = torch.where(valid, per, torch.zeros_like(per))  # an inf at a padded position must not leak
        return per.sum(-1) / n.clamp(min=1)

    if metric == "random":
        if sample_ids is None or len(sample_ids) != targets.shape[0]:
            raise ValueError(f"sample_scores('random') needs sample_ids, one per row ({targets.shape[0]})")
        uniforms = [common.seed_from(seed, "random-sample", int(i)) / 2.0 ** 63 for i in sample_ids]
        score = torch.tensor(uniforms, dtype=torch.float32, device=targets.device)
    elif metric == "ce_ratio":
        score = mean_of("student_ce") / mean_of("teacher_ce").clamp(min=CE_EPS)
    else:
        score = mean_of(metric)
    return torch.where(n > 0, score, torch.full_like(score, -math.inf))


def select_samples(scores, l):
    """Indices (ascending, int64) of the ceil(l * N) highest sample scores s_i (ties: lower index
    wins). Samples scoring -inf or NaN (no valid position) are never kept, so fewer may come back."""
    l = check_fraction(l, "l")
    if scores.dim() != 1:
        raise ValueError(f"sample scores must be (N,), got shape {tuple(scores.shape)}")
    s = scores.detach().float()
    N = s.numel()
    K = min(max(losses.ceil_fraction(l, N), 1), N) if N > 0 else 0
    ok = ~torch.isnan(s) & (s > -math.inf)
    rank = _rank_desc(s[None], ok[None])[0]
    keep = (rank < K) & ok
    return torch.nonzero(keep).flatten()  # nonzero is ascending


@torch.no_grad()
def score_samples(metric, packed, student_trunk, student_head, teacher_trunk=None, teacher_head=None,
                  batch_size=4, chunk_size=1024, seed=0, device="cpu"):
    """sample_scores of every row of `packed` (data.Packed), batch by batch: (N,) on the CPU.
    student_trunk / teacher_trunk: (b, T) token ids -> (b, T, d) final hidden states (frozen models)."""
    scores = []
    for i in range(0, len(packed), batch_size):
        b = slice(i, i + batch_size)
        x, y, v = (t[b].to(device) for t in (packed.input_ids, packed.targets, packed.valid))
        ht = teacher_trunk(x) if teacher_trunk is not None else None
        scores.append(sample_scores(metric, student_trunk(x), student_head, y, v, ht, teacher_head, chunk_size,
                                    sample_ids=packed.sample_ids[b], seed=seed).cpu())
    return torch.cat(scores)


# ---------------------------------------------------------------------------------------------
# registries (train.py and outside checks use exactly these names)

# What a metric or policy reads beyond its signature, as function attributes read with getattr and a
# default (as losses.py's tags): a metric reads the student's logits unless tagged `reads_student = False`,
# the teacher's only when tagged `reads_teacher = True` (train.py refuses it when only a cache exists); a
# policy reads the scores unless tagged `reads_scores = False` (then a step pays for no scoring pass).
teacher_entropy.reads_teacher = teacher_ce.reads_teacher = kl.reads_teacher = reverse_kl.reads_teacher = True
kl_student_entropy.reads_teacher = ce_ratio.reads_teacher = ce_ratio_student_entropy.reads_teacher = True
teacher_entropy.reads_student = teacher_ce.reads_student = random_metric.reads_student = False
random_positions.reads_scores = False

METRICS = {
    "student_entropy": student_entropy,
    "teacher_entropy": teacher_entropy,
    "student_ce": student_ce,
    "teacher_ce": teacher_ce,
    "kl": kl,
    "reverse_kl": reverse_kl,
    "kl_student_entropy": kl_student_entropy,
    "ce_ratio": ce_ratio,
    "ce_ratio_student_entropy": ce_ratio_student_entropy,
    "random": random_metric,
}

POLICIES = {
    "top_k": top_k,
    "gls": gls,
    "curriculum": curriculum,
    "pos_rs": pos_rs,
    "pos_rs_star": pos_rs_star,
    "random": random_positions,
    "weighted": weighted,
}
