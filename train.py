"""Selective knowledge distillation: one run, top to bottom.

    python train.py --pos-metric student_entropy --k 0.2      # SE-KD (the paper's Eq. 6), offline
    python train.py --k 1.0                                   # Full KD (Eq. 1-2)
    python train.py --preset paper ...                        # Qwen3-8B -> Qwen3-1.7B on FineWeb-Edu
    python train.py --matrix table3 --seeds 0,1,2             # a whole table of the paper (study.py)

A step: student trunk -> score positions (chunked, no (B, T, V) logits) -> pick positions
(selection.POLICIES) -> selective LM head on the picked rows -> KL(p_t || q_t) there (losses.head_loss)
-> normalise per sequence (Eq. 4) -> optimizer step. Flags live in config.py; see README "How it works".
"""
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import cache
import common
import config
import data
import eval as eval_  # the benchmark scorers (LAMBADA's for --probe)
import losses
import models
import selection
import study

# -----------------------------------------------------------------------------
# setup: processes, devices, precision, the out-dir


def setup(args, shared):
    ddp, rank, world, t_dev, s_dev = models.run_devices(args.teacher_device, args.student_device)
    # bf16: the teacher's weights in bf16; the student keeps fp32 master weights and runs under bf16
    # autocast, so small updates (lr 1e-5) are not rounded away as they would be in bf16 weights
    # auto: bf16 on a GPU, and on a CPU only where bf16 GEMMs are clearly faster (bf16 matrix units)
    bf16, why = (args.dtype == "bf16", "--dtype " + args.dtype) if args.dtype != "auto" else models.auto_bf16(s_dev)
    r = SimpleNamespace(args=args, shared=shared, ddp=ddp, rank=rank, world=world, master=rank == 0,
                        t_dev=t_dev, s_dev=s_dev, bf16=bf16, precision_why=why, t_dtype=torch.bfloat16 if bf16 else torch.float32,
                        timing=dict(scoring_s=0.0, cache_s=0.0, train_s=0.0, eval_s=0.0, load_s=0.0),
                        t_start=time.time(), teacher=None, config_key=study.config_key(args))
    r.log = print if r.master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    if args.keep_freed_memory and "cpu" in {torch.device(t_dev).type, torch.device(s_dev).type}:
        models.keep_freed_memory()  # (c, V) logits chunks reuse pages instead of faulting them in again
    models.trim_freed_memory()  # free pages the previous run of a matrix kept do not count in this one's peak
    for dev in {t_dev, s_dev}:
        models.reset_peak_memory(dev)  # each run of a matrix reports its own peak
    if r.master:
        study.prepare_out_dir(args, r.config_key, r.log)
    return r


def amp(r):
    """bf16 autocast for the student when --dtype bf16 (fp32 master weights), a no-op otherwise."""
    return torch.autocast(torch.device(r.s_dev).type, dtype=torch.bfloat16, enabled=r.bf16)


# -----------------------------------------------------------------------------
# models: the teacher loads lazily (a reused cache never needs it); the student keeps fp32 weights

def load_models(r):
    args, t0 = r.args, time.time()
    tok_from = (args.teacher, "--teacher") if args.teacher else (args.student, "--student")  # --lam 0: no teacher
    r.tok = study.share(r.shared, ("tokenizer", tok_from[0]), lambda: models.load_tokenizer(*tok_from))
    r.memo = study.share(r.shared, ("memo", args.teacher, r.t_dev, str(r.t_dtype)),
                         lambda: study.TeacherMemo(args.teacher_memo_gb))
    r.keep = None
    if args.student:
        r.student, s_tok = models.load_model(args.student, r.s_dev, torch.float32, flag="--student")
        r.V = models.check_vocab(r.tok, s_tok)
    else:  # the teacher with --student-layers kept; with --cache-dir saved once, so reuse runs teacher-free
        preset = args.student_layers == config.PRESETS[args.preset].get("student_layers")
        flag = "--student-layers" + (f" (--preset {args.preset}'s default, used as no --student was given)"
                                     if preset else "")
        r.keep = models.parse_layers(args.student_layers, models.load_config(args.teacher).num_hidden_layers, flag)
        tag = common.seed_from(args.teacher, args.student_layers, str(r.t_dtype))
        init_dir = os.path.join(args.cache_dir, f"student_init_{tag:x}") if args.cache_dir else None
        if init_dir and os.path.exists(os.path.join(init_dir, "config.json")):
            r.student = models.load_model(init_dir, r.s_dev, torch.float32)[0]
        else:
            r.student = models.student_from_teacher(get_teacher(r), r.keep).to(r.s_dev, torch.float32)
            if init_dir and r.master:
                models.save_model(r.student, r.tok, init_dir)
        r.V = len(r.tok)
    r.student.requires_grad_(True).train()
    if r.teacher is not None:
        models.check_vocab(r.tok, r.tok, r.teacher, r.student)
    r.Ws = models.head_weight(r.student, r.V)  # (V, d), cut to the tokenizer (Qwen pads its head)
    r.timing["load_s"] = time.time() - t0


def get_teacher(r):
    if r.args.teacher is None:  # config.check refuses every flag that needs one when --lam 0 dropped it
        raise common.UserError("this run has no teacher (--lam 0 without --teacher)")
    if r.teacher is None:
        def load():
            r.log(f"loading teacher {r.args.teacher} on {r.t_dev}")
            return models.load_model(r.args.teacher, r.t_dev, r.t_dtype)[0].requires_grad_(False)
        r.teacher = study.share(r.shared, ("teacher", r.args.teacher, r.t_dev, str(r.t_dtype)), load)
    return r.teacher


@torch.no_grad()
def teacher_states(r, x, remember=False):
    """(b, T) -> the teacher's final hidden states (b, T, d_t) on the student's device. remember: through
    the memo (held-out rows always; training rows within a --matrix), so its trunk runs once per row."""
    trunk = lambda ids: models.trunk(get_teacher(r), ids.to(r.t_dev))  # noqa: E731
    return (r.memo.states(trunk, x) if remember else trunk(x)).to(r.s_dev)


# -----------------------------------------------------------------------------
# data: packed rows of T + 1 tokens, a held-out split chosen by document hash

def load_data(r):
    args = r.args
    if args.task == "gsm8k":
        splits = data.pack_gsm8k(data.load_gsm8k_rows(args.task_data), r.tok, args.seq_len, args.tokens, args.seed)
    else:
        splits = data.load_splits(r.tok, args.data, args.seq_len, args.tokens, args.eval_tokens, args.seed,
                                  args.text_field, args.tokenizer_backend, models.tokenizer_fingerprint(r.tok))
    r.train, r.held = splits["train"], splits[args.eval_split]
    if len(r.held) == 0 or not r.held.valid.any():
        raise common.UserError(f"--data {args.data or 'stdlib'}: the {args.eval_split} split is empty, so "
                               "nothing could be measured; give more documents or a larger --eval-tokens")
    if not r.train.valid.any():
        raise common.UserError(f"--data {args.data or 'stdlib'}: no position to supervise (every target "
                               "follows an end-of-text token); nothing would train")
    r.sup_frac_samples, r.n_train_all = 1.0, len(r.train)
    r.probe = None
    if args.probe:  # config.check made sure the file exists
        rows = eval_.read_jsonl(args.probe)
        if not all(isinstance(row, dict) and isinstance(row.get("text"), str) for row in rows):
            raise common.UserError(f"--probe {args.probe}: every row needs a string field 'text'")
        r.probe = [eval_.lambada_example(row) for row in rows]
        if not r.probe:
            raise common.UserError(f"--probe {args.probe}: no examples")


# -----------------------------------------------------------------------------
# sample selection (Table 4, TopSmp): score every training sequence once with the frozen student

def select_samples(r):
    args = r.args
    if args.sample_metric == "none":
        return
    t0 = time.time()
    cfg = dict(metric=args.sample_metric, l=args.sample_frac, data_fingerprint=r.train.fingerprint, seed=args.seed,
               student=args.student or f"{args.teacher}:{args.student_layers}", teacher=args.teacher)
    path = os.path.join(args.cache_dir or os.path.join(args.out_dir, ".."), "selections",
                        f"{common.seed_from(sorted(cfg.items())):x}.json")
    kept = cache.load_selection(path, cfg)  # the kept ids are cached: the table's other runs reuse them
    if kept is None:
        need_t = selection.needs_teacher(args.sample_metric)
        with amp(r):
            scores = selection.score_samples(
                args.sample_metric, r.train, lambda x: models.trunk(r.student, x), r.Ws,
                (lambda x: teacher_states(r, x)) if need_t else None,
                models.head_weight(get_teacher(r), r.V).to(r.s_dev) if need_t else None,
                args.batch_size, args.entropy_chunk, args.seed, r.s_dev)
        kept = selection.select_samples(scores, args.sample_frac)
        if r.master:
            cache.save_selection(path, kept, cfg)
    r.sup_frac_samples = len(kept) / len(r.train)
    r.train = r.train.subset(kept)
    r.train.fingerprint = f"{common.seed_from(r.train.fingerprint, kept.tolist()):016x}"  # names its cache
    r.timing["scoring_s"] = time.time() - t0
    r.log(f"sample selection: kept {len(kept)}/{r.n_train_all} sequences by {args.sample_metric}")


# -----------------------------------------------------------------------------
# the offline teacher cache (RS-KD classes): the teacher runs once, over the kept samples

def open_teacher_cache(r):
    args, t0 = r.args, time.time()
    r.tcache = r.held_cache = None
    r.teacher_cached = {}
    if not args.cache_dir:
        return
    r.log(f"teacher cache {args.cache_dir}: RS-KD with U = {args.rs_u} sampled classes per position")
    # (b, T) -> (b, T, V) teacher logits on the teacher's device, where the cache samples; the teacher
    # loads only if a cache is missing
    logits = lambda x: teacher_states(r, x).to(r.t_dev) @ models.head_weight(get_teacher(r), r.V).T  # noqa: E731
    for split, packed in (("train", r.train), (args.eval_split, r.held)):
        d = os.path.join(args.cache_dir, f"{split}-{packed.fingerprint}-seed{args.seed}")  # draws depend on seed
        meta = dict(teacher=args.teacher, vocab_size=r.V, seq_len=args.seq_len, dtype=str(r.t_dtype),
                    tokenizer_fingerprint=models.tokenizer_fingerprint(r.tok), data_fingerprint=packed.fingerprint)
        c = cache.open_or_build(d, logits, packed, meta, args.rs_u, args.temperature, args.seed,
                                args.cache_shard_size, r.rank, r.world, dist.barrier if r.ddp else None,
                                r.master, r.log)
        r.tcache, r.held_cache = (c, r.held_cache) if split == "train" else (r.tcache, c)
    ref = os.path.join(d, "teacher_heldout.json")  # the teacher's own held-out numbers, kept with the cache
    if not os.path.exists(ref) and r.master:
        common.atomic_json(ref, models.heldout_metrics(get_teacher(r), r.held.batches(args.batch_size), None, r.V,
                                                       args.entropy_chunk))
    r.teacher_cached = common.read_json(ref) if os.path.exists(ref) else {}
    r.timing["cache_s"] = time.time() - t0


# -----------------------------------------------------------------------------
# optimizer, schedule, resume, the untrained student's numbers

def prepare_training(r):
    """Optimizer, schedule, resume, the untrained student's held-out numbers, config.json."""
    args = r.args
    r.dense_teacher = r.tcache is None and (args.lam > 0 or selection.needs_teacher(args.pos_metric))
    r.Wt = models.head_weight(get_teacher(r), r.V).to(r.s_dev) if r.dense_teacher else None  # moved once
    r.policy = losses.policy_for(args.loss, args.policy)  # Weighted KD brings its own weights
    r.opt = make_optimizer(r)
    r.global_batch = args.batch_size * args.grad_accum * r.world  # sequences per optimizer step, all ranks
    if len(r.train) < r.global_batch:
        raise common.UserError(f"--tokens: {len(r.train)} training sequences < one step's {r.global_batch} "
                               "(--batch-size x --grad-accum x processes)")
    r.steps_per_epoch = len(r.train) // r.global_batch
    r.max_steps = args.max_steps or max(1, int(args.epochs * r.steps_per_epoch))
    r.curriculum_steps = args.curriculum_steps or r.max_steps
    r.ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    r.step, r.hist, r.before, r.gls, r.tokens_seen, r.sel_sum, r.valid_sum = \
        0, [], None, selection.GLSQueue(args.gls_queue), 0, 0, 0
    if args.resume and os.path.exists(r.ckpt_path):
        ck = torch.load(r.ckpt_path, map_location="cpu", weights_only=False)
        r.student.load_state_dict(ck["student"])
        r.opt.load_state_dict(ck["opt"])
        for k in RESUMED:
            setattr(r, k, ck[k])
        r.log(f"resumed from {r.ckpt_path} at step {r.step}")
    if r.shared.get("matrix") and args.teacher_memo_gb > 0 and r.dense_teacher and not args.on_policy:
        # the memo runs the teacher once per sequence for the whole matrix: fill it now, outside this
        # run's wall time (like an offline cache's build); held-out rows first, every evaluation reads them
        r.timing["teacher_memo_s"] = r.memo.fill([r.held, r.train], lambda x: teacher_states(r, x, True),
                                                 args.batch_size)
        r.t_start += r.timing["teacher_memo_s"]
    key = ("before", r.config_key if args.student else (args.teacher, args.student_layers), r.held.fingerprint,
           args.eval_split, str(r.t_dtype), args.entropy_chunk, args.batch_size,
           (args.cache_dir, args.rs_u, args.temperature, args.seed) if r.held_cache is not None else None)
    if r.before is None:  # the untrained student on the held-out split: the same for every run of a matrix
        r.before = dict(study.share(r.shared, key, lambda: heldout(r)))
        kl = r.before.get("kl_to_teacher", r.before.get("kl_rs_estimate"))
        r.log(f"before: student {args.eval_split} loss {r.before['loss']:.4f}" + (f" kl {kl:.4f}" if kl else ""))
    if r.master:
        common.atomic_json(os.path.join(args.out_dir, "config.json"), dict(
            vars(args), config_key=r.config_key, git_hash=common.git_hash(), student_layers_kept=r.keep,
            world_size=r.world, global_batch_seqs=r.global_batch, devices=dict(teacher=r.t_dev, student=r.s_dev),
            precision=("bf16 autocast, fp32 master weights" if r.bf16 else "fp32") + f" ({r.precision_why})"))
    r.log(f"run: {args.teacher or 'no teacher (plain CE)'} -> {args.student or f'its layers {args.student_layers}'} | "
          f"{len(r.train)} train / {len(r.held)} {args.eval_split} seqs of {args.seq_len} | k {args.k} "
          f"{args.policy} {args.pos_metric} | U {args.rs_u or '-'} | {args.loss} | "
          f"{'bf16 autocast (fp32 master)' if r.bf16 else 'fp32'} ({r.precision_why}) | teacher {r.t_dev}, student {r.s_dev} | "
          f"global batch {args.batch_size} x {args.grad_accum} x {r.world} processes = {r.global_batch} seqs | "
          f"{r.max_steps} steps")


# -----------------------------------------------------------------------------
# the training step: one micro-batch, from token ids to the selective KD loss

def micro_step(r, idx, g):
    """Loss of the micro-batch `idx` (rows of r.train); returns (loss with grad, kd, n_selected, n_valid)."""
    args = r.args
    x, y, valid = (t[idx].to(r.s_dev) for t in (r.train.input_ids, r.train.targets, r.train.valid))
    if args.on_policy:  # the student writes the continuation; its tokens are what we supervise
        x, y, valid = on_policy_batch(r, x, g)
    with amp(r):
        hs = models.trunk(r.student, x)  # (B, T, d) with grad
    ht = teacher_states(r, x, r.shared.get("matrix", False)) if r.dense_teacher else None  # (B, T, d_t)
    # score positions: rows of logits at a time, never a (B, T, V) tensor (paper Sec. 4)
    chunk = args.entropy_chunk if args.selective_head else x.numel()
    scores = torch.zeros(y.shape, device=y.device)
    if selection.needs_scores(r.policy, args.k):
        with amp(r):
            scores = selection.chunked_scores(args.pos_metric, hs.detach(), r.Ws.detach(), y, ht, r.Wt, chunk, g)
    w = selection.POLICIES[r.policy](scores, valid, args.k, generator=g, state=r.gls, temperature=args.pos_rs_temp,
                                     progress=min(r.step / r.curriculum_steps, 1.0))  # (B, T)
    sel = w > 0 if args.selective_head else valid  # the rows that reach the LM head
    rows_w = losses.normalise_by_samples(w)[sel]  # Eq. 4: per-sequence weights, mean over kept sequences
    target = teacher_target(r, ht, sel, r.train.sample_ids[idx], chunk)
    # lam * KD + (1 - lam) * CE on the selected rows only (Eq. 1/3); lam = 1 is the paper's pure KD
    with amp(r):
        loss = losses.head_loss(hs[sel], r.Ws, y[sel], rows_w, target, loss=args.loss,
                                temperature=args.temperature, lam=args.lam, chunk_size=chunk)
        kd = loss if args.lam in (0.0, 1.0) else losses.head_loss(
            hs[sel].detach(), r.Ws.detach(), y[sel], rows_w, target, loss=args.loss,
            temperature=args.temperature, lam=1.0, chunk_size=chunk)
    return loss, float(kd.detach()) if args.lam > 0 else 0.0, int((w > 0).sum()), int(valid.sum())


def teacher_target(r, ht, sel, sample_ids, chunk):
    """The teacher at the selected rows: dense logits, or RS-KD's U sampled classes (online or cached)."""
    if r.args.lam == 0:
        return None
    U = r.args.rs_u
    if r.tcache is not None:  # RS-KD target straight from the offline cache (no teacher in memory)
        ids, probs = r.tcache.get(sample_ids)  # (B, T, U)
        return losses.SparseTeacher(ids.to(r.s_dev)[sel], probs.to(r.s_dev)[sel])
    if U:  # RS-KD online: the cache's sampler, keyed by (seed, sample id, position), chunk by chunk
        u = losses.rs_uniforms(r.args.seed, sample_ids, sel.shape[1], U)[sel.cpu()]  # (N, U)
        hts = ht[sel]  # (N, d_t)
        draws = [losses.sample_classes(hts[i:i + chunk] @ r.Wt.T, u[i:i + chunk], r.args.temperature)
                 for i in range(0, max(hts.shape[0], 1), chunk)]
        ids, counts = (torch.cat([d[j] for d in draws]).to(r.s_dev) for j in (0, 1))
        return losses.SparseTeacher(ids, counts.float() / U)  # p~ = count / U, exactly
    return losses.DenseTeacher(ht[sel], r.Wt)


@torch.no_grad()
def on_policy_batch(r, x, g):
    """Student-generated continuations of the first --gen-prompt-len tokens; only generated tokens count."""
    P = r.args.gen_prompt_len
    r.student.eval()
    with amp(r):
        seq = models.generate(r.student, x[:, :P], r.args.gen_tokens, r.V, g)  # (B, P + gen), ids < V
    r.student.train()
    valid = torch.zeros_like(seq[:, 1:], dtype=torch.bool)
    valid[:, P - 1:] = True
    return seq[:, :-1], seq[:, 1:], valid


# -----------------------------------------------------------------------------
# the loop: gradient accumulation, data parallel averaging, clipping, checkpoints

def train(r):
    args, t0 = r.args, time.time()
    while r.step < r.max_steps:
        t_step = time.time()
        for group in r.opt.param_groups:
            group["lr"] = lr_at(r, r.step)
        stats = torch.zeros(4, dtype=torch.float64)  # loss, kd, selected, valid (summed over micro-batches)
        for micro in range(args.grad_accum):
            g = common.generator(args.seed, r.step, micro, r.rank)  # draws depend on the step, not history
            loss, kd, n_sel, n_valid = micro_step(r, batch_indices(r, r.step, micro), g)
            (loss / args.grad_accum).backward()  # gradients accumulate over micro-batches
            stats += torch.tensor([float(loss.detach()) / args.grad_accum, kd / args.grad_accum, n_sel, n_valid],
                                  dtype=torch.float64)
        if r.ddp:  # data parallel: average gradients and the logged loss over ranks (the global batch)
            for p in r.student.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= r.world
            dist.all_reduce(stats)
            stats[:2] /= r.world
        torch.nn.utils.clip_grad_norm_(r.student.parameters(), 1.0)
        r.opt.step()
        r.opt.zero_grad(set_to_none=True)
        r.step += 1
        loss, kd, n_sel, n_valid = stats.tolist()
        r.sel_sum, r.valid_sum = r.sel_sum + n_sel, r.valid_sum + n_valid
        r.tokens_seen += args.batch_size * args.grad_accum * r.world * args.seq_len
        dt = time.time() - t_step
        row = dict(step=r.step, loss=loss, kd=kd, sel=n_sel / max(n_valid, 1), lr=lr_at(r, r.step - 1), dt=dt,
                   tok_s=r.global_batch * args.seq_len / dt)
        if args.eval_every and r.step % args.eval_every == 0 and r.step < r.max_steps:  # the held-out curve
            ev = heldout(r, probe=False)
            row.update(val_loss=ev["loss"], val_kl=ev.get("kl_to_teacher", ev.get("kl_rs_estimate")))
        r.hist.append(row)
        if r.step % args.log_every == 0 or r.step in (1, r.max_steps):
            r.log(f"step {r.step:5d}/{r.max_steps} | loss {loss:.4f} | kd {kd:.4f} | sel {row['sel']:.3f} | "
                  f"lr {row['lr']:.2e} | dt {dt * 1000:.0f}ms | tok/s {row['tok_s']:.0f}", flush=True)
        if os.environ.get("NANO_SEKD_CRASH_AT") == str(r.step):  # test hook: simulate a kill
            os._exit(17)
        if args.ckpt_every and r.step % args.ckpt_every == 0 and r.step < r.max_steps:
            r.timing["train_s"] += time.time() - t0
            t0 = time.time()
            save_checkpoint(r)
    r.timing["train_s"] += time.time() - t0


def lr_at(r, step):
    """Linear warmup, then constant or cosine to 10% of --lr."""
    args, warm = r.args, int(r.args.warmup * r.max_steps)
    if step < warm:
        return args.lr * (step + 1) / warm
    if args.schedule == "constant":
        return args.lr
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(r.max_steps - warm, 1))))


def batch_indices(r, step, micro):
    """Rows of micro-batch `micro` of `step` for this rank: a fresh permutation per epoch, seeded."""
    a = r.args
    epoch, j = divmod(step * a.grad_accum + micro, r.steps_per_epoch * a.grad_accum)
    perm = torch.randperm(len(r.train), generator=torch.Generator().manual_seed(a.seed * 1000 + epoch))
    start = (j * r.world + r.rank) * a.batch_size
    return perm[start:start + a.batch_size]


def make_optimizer(r):
    args = r.args
    if args.optim == "adam8bit":
        import bitsandbytes as bnb  # checked in main(), before any model loads
        return bnb.optim.Adam8bit(r.student.parameters(), lr=args.lr)
    params = list(r.student.parameters())
    # fused: one pass over each tensor, no (V, d) temporaries for the update (7x faster on a CPU; equal
    # to the loop version to fp32 rounding); torch has it for CPU and CUDA tensors
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


RESUMED = ("step", "hist", "before", "gls", "timing", "tokens_seen", "sel_sum", "valid_sum")


def save_checkpoint(r):
    if not r.master:
        return
    r.timing["prior_wall_s"] = r.timing.get("prior_wall_s", 0.0) + time.time() - r.t_start
    r.t_start = time.time()
    common.atomic_torch_save(dict(student=r.student.state_dict(), opt=r.opt.state_dict(), config_key=r.config_key,
                                  **{k: getattr(r, k) for k in RESUMED}), r.ckpt_path)


# -----------------------------------------------------------------------------
# held-out evaluation, save

def heldout(r, probe=True):
    """The student's held-out loss, PPL, top-1 agreement, ECE and KL to the teacher (true KL with a teacher;
    with --cache-dir and no teacher, the RS-KD estimate, named kl_rs_estimate)."""
    t0 = time.time()
    r.student.eval()
    with amp(r):
        if r.held_cache is not None:
            out = models.heldout_metrics_sparse(r.student, r.held.batches(r.args.batch_size), r.held_cache,
                                                r.held.sample_ids, r.V, r.args.entropy_chunk)
        elif r.args.teacher is None:  # plain CE (--lam 0): the student's own loss, PPL, ECE
            out = models.heldout_metrics(r.student, r.held.batches(r.args.batch_size), None, r.V, r.args.entropy_chunk)
        else:
            out = models.heldout_metrics(r.student, r.held.batches(r.args.batch_size), get_teacher(r), r.V,
                                         r.args.entropy_chunk, teacher_states=lambda x: teacher_states(r, x, True))
        if r.probe and probe:  # LAMBADA-style last-word accuracy (--probe)
            scored, _ = eval_.score_lambada(r.student, r.tok, r.probe, r.args.batch_size, progress=False)
            out.update(probe_acc=scored["acc"], probe_ppl=scored["ppl"], probe_n=scored["n"])
    r.student.train()
    r.timing["eval_s"] += time.time() - t0
    out["tokens"] = int(r.held.valid.sum())
    return out


def finish(r):
    args = r.args
    after = heldout(r)
    teacher = {k[len("teacher_"):]: v for k, v in after.items() if k.startswith("teacher_")} or r.teacher_cached
    if not r.master:
        return
    if args.save_model:
        models.save_model(r.student, r.tok, os.path.join(args.out_dir, "model"))
    common.atomic_write(os.path.join(args.out_dir, "metrics.jsonl"),
                        "".join(json.dumps(row) + "\n" for row in r.hist))
    wall = time.time() - r.t_start + r.timing.get("prior_wall_s", 0.0)
    kl = "kl_to_teacher" if "kl_to_teacher" in after else "kl_rs_estimate"
    summary = dict(
        run_name=args.run_name, config_key=r.config_key, wall_time_s=wall, wall_time_split=r.timing,
        tokens_seen=r.tokens_seen, steps=r.step, global_batch_seqs=r.global_batch,
        sup_frac_positions=r.sel_sum / max(r.valid_sum, 1), sup_frac_samples=r.sup_frac_samples,
        teacher_loaded=r.teacher is not None, cache_bytes=r.tcache.bytes_on_disk if r.tcache is not None else 0,
        peak_mem_bytes={"student": models.peak_memory(r.s_dev), "teacher": models.peak_memory(r.t_dev),
                        "measure": "cuda max allocated" if "cuda" in r.s_dev else "process max RSS"},
        student_before=r.before, student_after=after, teacher=teacher, eval_split=args.eval_split,
        eval_tokens=after["tokens"], val_loss=after["loss"], val_ppl=after["ppl"],
        **({f"val_{kl}": after[kl]} if kl in after else {}), teacher_val_loss=teacher.get("loss"))
    common.atomic_json(os.path.join(args.out_dir, "summary.json"), summary)  # last: marks the run done
    if os.path.exists(r.ckpt_path):
        os.remove(r.ckpt_path)
    vs_teacher = (f", {kl} {r.before.get(kl, float('nan')):.4f} -> {after.get(kl) or float('nan'):.4f} "
                  f"(teacher loss {teacher.get('loss', float('nan')):.4f})" if args.teacher else " (no teacher)")
    print(f"done in {wall:.0f}s: student {args.eval_split} loss {r.before['loss']:.4f} -> {after['loss']:.4f}"
          f"{vs_teacher}; supervised "
          f"{summary['sup_frac_positions']:.1%} of positions; summary in {args.out_dir}/summary.json")


# -----------------------------------------------------------------------------
# one run, start to end; main() also hands a --matrix to study.py

def run(args, shared=None):
    """One run: setup, models, data, (sample selection), (teacher cache), train, evaluate, save.
    `shared` (from study.run_matrix) holds what the runs of a matrix share: teacher, tokenizer, memo."""
    r = setup(args, {} if shared is None else shared)
    load_models(r)
    load_data(r)
    select_samples(r)  # no-op without --sample-metric
    open_teacher_cache(r)  # no-op without --cache-dir
    prepare_training(r)
    train(r)
    finish(r)
    if r.ddp:
        dist.destroy_process_group()


KNOWN_ERRORS = (common.UserError, FileNotFoundError)  # the cache's errors are UserErrors too


def main(argv=None):
    args = config.parse_args(argv, raw=True)
    try:
        config.check_environment(args)
        if args.matrix:
            study.run_matrix(args, run)
        else:
            run(config.finalize(args))
    except KNOWN_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
