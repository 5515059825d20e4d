"""The fast path of the selective LM head: losses.head_loss's values and gradients, in less time.

losses.head_loss is the plain path (chunk by chunk: logits, loss, autograd, checkpointing). Read it
first; this module computes the same numbers (tests/test_head_parity.py) with the speed machinery
kept out of the plain one:

 * gradients in the forward pass (_FusedHead, _run_chunks): each chunk's d loss / d logits is folded
   into grad_h (N, d) and grad_W (V, d) right away, so nothing of size (chunk, V) outlives its chunk
   and the logits are computed once (checkpointing computes them twice); backward is a rescale;
 * closed-form gradients for forward KL (dense or RS-KD) and CE (_forward_kl_ce_grad), written over
   the logits buffer: tau (S q - p) and softmax(z) - onehot(y). They are used only when LOSSES[loss]
   *is* losses.kl_per_position or losses.weighted_kd (CLOSED_FORM, by identity), for a sparse RS-KD
   teacher and for pure CE: any other loss - a new one, or a copy with every attribute - trains on
   its own body through autograd;
 * one (chunk, V) fp32 buffer reused by every chunk's logits (ChunkLogits; selection.chunked_scores
   scores into the same kind of buffer), and the head cast once under autocast (matmul_weight);
 * block-wise no-grad entropy for scoring (entropy): fewer passes than the exact form, same value.

train.py picks a head by `--head`: HEADS at the bottom. Imports: common <- losses <- fused_head.
"""
import torch

import common
import losses


# ----------------------------------------------------------------------------- the head's matmul

def matmul_weight(W):
    """W (V, d) as a matmul under the active autocast uses it, cast once: multiplied chunk by chunk, an
    fp32 head under bf16 autocast would otherwise be cast again for every chunk (a (V, d) copy each).
    Same values as autocast's own cast; W itself outside autocast."""
    dev = W.device.type
    if W.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return W.to(torch.get_autocast_dtype(dev))
    return W


class ChunkLogits:
    """Logits h @ W^T of one chunk of rows after another, written into one reused (rows, V) fp32 buffer.

    A fresh (c, V) tensor per chunk faults its pages in again on a CPU; the buffer is made at the first
    call and every call overwrites it. The matmul runs in W's dtype, as the model's own head (bf16 under
    autocast): an fp32 matmul writes straight into the buffer; any other is copied into it when fp32=True
    (the fused head needs fp32 logits it may overwrite), else returned as it is (scoring: half the bytes).
    """

    def __init__(self, rows, fp32=False):
        self.rows, self.fp32, self.buf = rows, fp32, None

    def __call__(self, h, W):  # (c, d), (V, d) -> (c, V)
        direct = W.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type)
        if not (direct or self.fp32):
            return h @ W.T
        if self.buf is None:
            self.buf = torch.empty(self.rows, W.shape[0], dtype=torch.float32, device=h.device)
        out = self.buf[:h.shape[0]]
        return torch.matmul(h, W.T, out=out) if direct else out.copy_(h @ W.T)

    def release(self):
        self.buf = None


def _row_blocks(n, V, device):
    """(r0, r1) blocks of rows for elementwise passes over (n, V): <= 1M elements (4 MB) each on the CPU,
    so a block's temporaries stay small and its passes run from cache; all rows at once elsewhere."""
    return common.row_chunks(n, max(1, (1 << 20) // max(1, V)) if device.type == "cpu" else max(1, n))


# ----------------------------------------------------------------------------- entropy without grad

def entropy(logits, temperature=1.0):
    """losses.entropy, faster without grad: H(softmax(logits / tau)) in nats, fp32, (..., V) -> (...).

    With z = logits / tau, m = max_v z, e = exp(z - m), s = sum_v e:  H = log s - sum_v e (z - m) / s,
    in blocks of rows (_row_blocks): fewer passes than log_softmax -> exp -> where -> mul -> sum, no
    temporary beyond a block, and more accurate (torch's CPU fp32 log_softmax is ~1e-4 off at V = 150k).
    A row where that is NaN (a -inf logit gives 0 * -inf; also rows with no finite logit) is redone in
    the exact form, so it comes out as losses.entropy's. With grad: losses.entropy itself.
    """
    if (torch.is_grad_enabled() and logits.requires_grad) or logits.shape[-1] == 0:
        return losses.entropy(logits, temperature)
    losses.check_temperature(temperature)
    x = logits.reshape(-1, logits.shape[-1])  # (n, V)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for r0, r1 in _row_blocks(*x.shape, x.device):
        z = x[r0:r1].float()
        if temperature != 1.0:
            z = z / temperature
        zm = z - z.amax(-1, keepdim=True)  # (r, V) <= 0
        e = zm.exp()
        s = e.sum(-1)
        out[r0:r1] = s.log() - e.mul_(zm).sum(-1) / s
    bad = out.isnan()
    if bad.any():
        out[bad] = losses.entropy(x[bad], temperature)
    return out.reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------- closed-form chunk gradient

def _forward_kl_ce_grad(z, teacher_rows, y, kd_coef, ce_coef, temperature):
    """One chunk of losses.rows_loss for forward KL / RS-KD and CE, in closed form: (total, g = d total / d z).

    kd_n = tau^2 KL(p_n || q_n), q = softmax(z / tau): against dense teacher logits teacher_rows (c, V)
    (as kl_per_position) or a losses.SparseTeacher of c rows (ids, probs: as rs_kd_loss, its value by
    losses.sparse_kl); ce_n = -log softmax(z)(y_n) at tau = 1. a_n, b_n are kd_coef, ce_coef (c,) where
    > 0, else 0 (None: that term is off). The gradient autograd gets through log_softmax:
        d/dz tau^2 KL(p || q) = tau (S q - p)        S = sum_v p(v): 1 dense, sum_u p~_u RS-KD
        d/dz CE(z, y)         = softmax(z) - onehot(y)
    z (c, V) fp32 is overwritten with that gradient, dense teacher logits with scratch; the passes run
    over blocks of rows (_row_blocks), so temporaries stay block-sized. Returns None where autograd must
    decide: a row with no finite max logit, or a NaN total (a teacher class with p = 0, a -inf logit,
    gives 0 * -inf in the dense KL here; kl_per_position's `where` gives 0).
    """
    c, V = z.shape
    tau = temperature
    sparse = isinstance(teacher_rows, losses.SparseTeacher)
    a = None if kd_coef is None else torch.where(kd_coef > 0, kd_coef, 0.0)  # (c,)
    b = None if ce_coef is None else torch.where(ce_coef > 0, ce_coef, 0.0)
    kd, ce = z.new_zeros(c), z.new_zeros(c)
    for r0, r1 in _row_blocks(c, V, z.device):
        zb, yb = z[r0:r1], y[r0:r1, None]  # (r, V), (r, 1)
        q_coef = z.new_zeros(r1 - r0)  # g = q_coef * q + ...
        if b is not None:
            if tau != 1.0:  # CE needs softmax(z) at tau = 1 besides q
                e1 = zb - zb.amax(-1, keepdim=True)  # (r, V)
                ce[r0:r1] = -e1.gather(-1, yb).squeeze(-1)
                s1 = e1.exp_().sum(-1)  # e1 = s1 softmax(z)
                ce[r0:r1] += s1.log()
            else:
                q_coef += b[r0:r1]
        if tau != 1.0:
            zb.div_(tau)
        m = zb.amax(-1, keepdim=True)
        if not torch.isfinite(m).all():
            return None
        zb.sub_(m)  # z' = z / tau - max: log q = z' - log s
        zy = zb.gather(-1, yb).squeeze(-1)
        if a is not None and not sparse:  # dense teacher: log p = t' - log st
            tb = teacher_rows[r0:r1]
            if tau != 1.0:
                tb.div_(tau)
            mt = tb.amax(-1, keepdim=True)
            if not torch.isfinite(mt).all():
                return None
            et = tb.sub_(mt).exp()  # (r, V) = st p
            st = et.sum(-1)
            cross = tb.sub_(zb).mul_(et).sum(-1) / st  # sum_v p (t' - z')
        elif a is not None:  # RS-KD: the sampled classes' z', before zb becomes exp(z')
            ids, pr = teacher_rows.ids[r0:r1], teacher_rows.probs[r0:r1].float()  # (r, U)
            pr_keep = torch.where(pr > 0, pr, 0.0)
            z_ids = zb.gather(-1, ids)
        s = zb.exp_().sum(-1)  # zb = s q
        ls = s.log()
        if b is not None and tau == 1.0:
            ce[r0:r1] = ls - zy
        if a is not None:
            ar = a[r0:r1] * tau  # KD's grad is ar (S q - p)
            if not sparse:
                kd[r0:r1] = (cross - st.log() + ls) * tau ** 2
                q_coef += ar
            else:
                kd[r0:r1] = losses.sparse_kl(z_ids - ls[:, None], pr) * tau ** 2
                q_coef += ar * pr_keep.sum(-1)
        zb.mul_((q_coef / s)[:, None])  # q_coef * q
        if a is not None and not sparse:
            zb.addcmul_(et, (-ar / st)[:, None])  # - ar p
        elif a is not None:
            zb.scatter_add_(-1, ids, -ar[:, None] * pr_keep)  # - ar p~ (a repeated id adds up)
        if b is not None:
            if tau != 1.0:
                zb.addcmul_(e1, (b[r0:r1] / s1)[:, None])  # + b softmax(z)
            zb.scatter_add_(-1, yb, -b[r0:r1, None])  # - b onehot(y)
    # `where`, not a product, so a 0-weight row with an infinite loss adds nothing (as rows_loss)
    total = z.new_zeros(())
    if a is not None:
        total = total + torch.where(kd_coef > 0, kd_coef * kd, 0.0).sum()
    if b is not None:
        total = total + torch.where(ce_coef > 0, ce_coef * ce, 0.0).sum()
    return None if torch.isnan(total) else (total, z)


# ----------------------------------------------------------------------------- gradients in the forward pass

class _FusedHead(torch.autograd.Function):
    """loss = chunk_loss over chunks of rows of (h @ W^T); grads are computed in forward.

    forward: for each chunk of rows, logits (c, V) -> loss -> d loss / d logits (c, V) ->
    grad_h[chunk] = g @ W and grad_W += g^T @ h[chunk]; the chunk's (c, V) tensors die
    there. backward only multiplies the stored grad_h (N, d) and grad_W (V, d, fp32) by the
    incoming scalar gradient. (Same memory as recomputing each chunk in backward with
    torch.utils.checkpoint, without computing the logits twice.) d loss / d logits comes from
    chunk_grad when given (a closed form, see _forward_kl_ce_grad), else from autograd.
    """

    @staticmethod
    def forward(ctx, h, W, chunk_loss, chunk_size, chunk_grad=None):
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, gh, gW = _run_chunks(h, W, chunk_loss, chunk_size, need_h, need_W, chunk_grad)
        ctx.w_dtype = W.dtype
        ctx.save_for_backward(gh, gW)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gW = ctx.saved_tensors
        if bool(grad_out != 1):  # a loss scaled before backward (e.g. / grad_accum); 1 needs no copy
            gh = None if gh is None else gh * grad_out.to(gh.dtype)
            gW = None if gW is None else gW * grad_out
        return gh, None if gW is None else gW.to(ctx.w_dtype), None, None, None  # .to: no-op for fp32 heads


def _run_chunks(h, W, chunk_loss, chunk_size, need_h=False, need_W=False, chunk_grad=None):
    """Sum chunk_loss(i0, i1, logits_fp32) over row chunks; optionally its grads wrt h and W.

    The grad wrt a chunk's logits: chunk_grad(i0, i1, z) -> (loss, g) when given (it may overwrite z, a
    buffer shared by all chunks) unless it returns None; else autograd through chunk_loss.
    """
    N = h.shape[0]
    Wd, hd = matmul_weight(W.detach()), h.detach()  # (V, d) in the matmul's dtype, cast once
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    gh = torch.zeros_like(hd) if need_h else None  # (N, d)
    gW = None  # (V, d) fp32, made at the first chunk's gradient: after chunk_grad has dropped its scratch
    logits = ChunkLogits(min(N, chunk_size), fp32=True)  # chunk_grad's logits, then their grad
    for i0, i1 in common.row_chunks(N, chunk_size):
        hc = hd[i0:i1]  # (c, d)
        if need_h or need_W:
            done = None
            if chunk_grad is not None:
                done = chunk_grad(i0, i1, logits(hc, Wd))  # the only student logits alive
            if done is not None:
                loss, g = done
            else:
                z = (hc @ Wd.T).float().requires_grad_(True)  # (c, V)
                with torch.enable_grad():
                    loss = chunk_loss(i0, i1, z)
                    (g,) = torch.autograd.grad(loss, z, allow_unused=True)
                del z
            if g is not None:
                g = g.to(W.dtype)  # (c, V), same cast autograd does for logits.float()
                if need_h:  # in the matmul's dtype (bf16 under autocast), as autocast would cast g and W
                    gh[i0:i1] = g.to(Wd.dtype) @ Wd
                if need_W:  # accumulate in fp32 (in place, so bf16 autocast leaves it fp32), no (V, d) temporary
                    first = gW is None  # beta = 0 ignores the fresh tensor's contents (no zero fill)
                    if first:
                        gW = torch.empty(W.shape, dtype=torch.float32, device=W.device)
                    gW.addmm_(g.T.float(), hc.float(), beta=0.0 if first else 1.0)
            del g
        else:
            loss = chunk_loss(i0, i1, (hc @ Wd.T).float())
        total += loss.detach()
    if need_W and gW is None:  # no rows (N = 0) or no gradient: zeros
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
    return total, gh, gW


# ----------------------------------------------------------------------------- the fast head

# The losses whose chunk gradient has a closed form, by identity: a new function never matches, whatever
# attributes it copies, so it trains on its own body.
CLOSED_FORM = (losses.kl_per_position, losses.weighted_kd)


def head_loss(student_hidden, student_head, targets, weights, teacher, loss="kl",
              temperature=1.0, lam=1.0, chunk_size=1024, hard_frac=0.5, atkd_lam=0.2):
    """losses.head_loss (same arguments, value and gradients), fast: see the module docstring.

    Memory: logits exist for at most chunk_size rows at a time (the reused buffers); the stored
    gradients are grad_h (N, d) and grad_W (V, d) fp32.
    """
    losses.check_head_inputs(student_hidden, student_head, targets, weights, teacher, loss, temperature, lam,
                             chunk_size)
    N, kd_fn = student_hidden.shape[0], losses.LOSSES[loss]
    chunks = common.row_chunks(N, chunk_size)
    dense = isinstance(teacher, losses.DenseTeacher)
    t_head = matmul_weight(teacher.head.detach().to(teacher.hidden.dtype)) if dense else None  # cast once
    t_logits = ChunkLogits(min(N, chunk_size), fp32=True)  # the closed form's teacher logits, then scratch

    def teacher_rows(i0, i1, logits=None):  # (c, V) fp32 teacher logits, no grad, or a SparseTeacher of c rows
        if not dense:
            return losses.SparseTeacher(teacher.ids[i0:i1], teacher.probs[i0:i1])
        with torch.no_grad():
            h = teacher.hidden[i0:i1].detach()
            return (h @ t_head.T).float() if logits is None else logits(h, t_head)

    kd_coef, ce_coef, hard = losses.head_coefs(kd_fn, teacher_rows, targets, weights, chunks, lam,
                                               hard_frac, atkd_lam)

    def part(x, i0, i1):
        return None if x is None else x[i0:i1]

    def chunk_loss(i0, i1, z):  # z (c, V) fp32 student logits -> scalar, by losses.rows_loss
        t = teacher_rows(i0, i1) if lam > 0 else None
        return losses.rows_loss(z, t, targets[i0:i1], part(kd_coef, i0, i1), part(ce_coef, i0, i1), kd_fn,
                                temperature, part(hard, i0, i1))

    def chunk_grad(i0, i1, z):  # forward KL / RS-KD + CE: (loss, d loss / d z) in closed form, or None
        t = teacher_rows(i0, i1, t_logits) if lam > 0 else None
        if i1 == N:  # the last chunk: its teacher scratch dies with this call, before the (V, d) weight grad
            t_logits.release()
        return _forward_kl_ce_grad(z, t, targets[i0:i1], part(kd_coef, i0, i1), part(ce_coef, i0, i1),
                                   temperature)

    closed = lam == 0 or not dense or any(kd_fn is f for f in CLOSED_FORM)  # pure CE, RS-KD, forward KL
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
        return _FusedHead.apply(student_hidden, student_head, chunk_loss, chunk_size,
                                chunk_grad if closed else None)
    return _run_chunks(student_hidden, student_head, chunk_loss, chunk_size)[0]


# `--head NAME` (train.py): the same loss, fast or plain.
HEADS = {"fused": head_loss, "reference": losses.head_loss}
