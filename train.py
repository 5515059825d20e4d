"""Selective knowledge distillation: one run, top to bottom.

    python train.py --pos-metric student_entropy --k 0.2      # SE-KD (the paper's Eq. 6), offline
    python train.py --k 1.0                                   # Full KD (Eq. 1-2)
    python train.py --preset paper ...                        # Qwen3-8B -> Qwen3-1.7B on FineWeb-Edu
    python train.py --matrix table3 --seeds 0,1,2             # a whole table of the paper (study.py)

A step: student trunk -> score positions (chunked, no (B, T, V) logits) -> pick positions
(selection.POLICIES) -> selective LM head on the picked rows -> KL(p_t || q_t) there (fused_head.HEADS)
-> normalise per sequence (Eq. 4) -> optimizer step. A run's state is two dataclasses: Run, what the
environment supplies (rebuilt at every start), and Progress, what a checkpoint saves. Flags live in
config.py; see README "How a step works".
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import cache
import common
import config
import data
import eval as eval_  # the benchmark scorers (LAMBADA's for --probe)
import fused_head
import heldout
import losses
import models
import selection
import study
import suite  # suite_acc: the downstream suite's headline
import system


@dataclass
class Run:
    """What the environment supplies a run, rebuilt at every start: flags, devices, models, data, optimizer."""
    args: object
    shared: study.Shared  # what the runs of a matrix share; a single run has its own
    ddp: bool
    rank: int
    world: int
    master: bool  # rank 0: the only one that writes files and logs
    t_dev: str
    s_dev: str
    # bf16: the teacher in bf16, the student under bf16 autocast over fp32 master weights (its small updates,
    # lr 1e-5, would round away in bf16 weights)
    bf16: bool
    t_dtype: torch.dtype
    precision_why: str
    config_key: str  # the flags that change the numbers (study.config_key)
    log: object  # print on rank 0, silent elsewhere
    t_start: float  # this start's wall clock (a resumed run adds the checkpoint's prior_wall_s)
    run_dir: str = None  # where files go: --out-dir, or its stage while a finished run there is replaced
    tok: object = None
    student: torch.nn.Module = None
    teacher: torch.nn.Module = None  # loaded lazily: a reused cache never needs it
    memo: study.TeacherMemo = None
    keep: list = None  # the teacher layers the default student kept
    V: int = 0  # the tokenizer's vocabulary; a padded head is cut to it
    Ws: torch.Tensor = None  # (V, d) the student's head
    Wt: torch.Tensor = None  # (V, d_t) the teacher's head on the student's device; None: no live teacher
    train: data.Packed = None
    held: data.Packed = None
    n_train_all: int = 0  # training sequences before sample selection
    probe: list = None  # --probe's LAMBADA-style examples
    tcache: object = None  # the offline cache's RS-KD targets of the training rows (cache.py)
    held_cache: object = None  # ... and of the held-out rows
    teacher_cached: dict = field(default_factory=dict)  # the teacher's held-out numbers, kept with the cache
    opt: torch.optim.Optimizer = None
    global_batch: int = 0  # sequences per optimizer step, all ranks
    steps_per_epoch: int = 0
    max_steps: int = 0


@dataclass
class Progress:
    """What a checkpoint saves beside the weights and the optimizer (its fields are the checkpoint's keys)."""
    step: int = 0
    hist: list = field(default_factory=list)  # the rows of metrics.jsonl
    before: dict = None  # the untrained student's held-out numbers
    gls: selection.GLSQueue = None  # GLS's queue of recent scores
    timing: dict = field(default_factory=lambda: dict.fromkeys(("scoring_s", "cache_s", "train_s", "eval_s",
                                                                 "load_s"), 0.0))  # seconds per phase
    tokens_seen: int = 0
    sel_sum: int = 0  # selected / valid positions so far: sup_frac_positions
    valid_sum: int = 0


# -----------------------------------------------------------------------------
# setup: processes, devices, precision, the out-dir

def setup(args, shared):
    ddp, rank, world, t_dev, s_dev = system.run_devices(args.teacher_device, args.student_device)
    # auto: bf16 on a GPU, and on a CPU only where bf16 GEMMs are clearly faster (bf16 matrix units)
    bf16, why = (args.dtype == "bf16", "--dtype " + args.dtype) if args.dtype != "auto" else system.auto_bf16(s_dev)
    r = Run(args, shared, ddp, rank, world, rank == 0, t_dev, s_dev, bf16, torch.bfloat16 if bf16 else torch.float32,
            why, study.config_key(args), print if rank == 0 else lambda *a, **k: None, time.time())
    torch.manual_seed(args.seed)
    system.start_run_memory((t_dev, s_dev), args.keep_freed_memory)  # this run's own peak memory
    where = [study.prepare_out_dir(args, r.config_key, r.log) if r.master else None]
    if ddp:  # rank 0 alone reads and cleans the out-dir; every rank writes to and resumes from its answer
        dist.broadcast_object_list(where)
    r.run_dir = where[0]
    return r, Progress(gls=selection.GLSQueue(args.gls_queue))


def amp(r):
    """bf16 autocast for the student when --dtype bf16 (fp32 master weights), a no-op otherwise."""
    return torch.autocast(torch.device(r.s_dev).type, dtype=torch.bfloat16, enabled=r.bf16)


# -----------------------------------------------------------------------------
# models: the teacher loads lazily (a reused cache never needs it); the student keeps fp32 weights

def load_models(r, s):
    args, t0 = r.args, time.time()
    tok_from = (args.teacher, "--teacher") if args.teacher else (args.student, "--student")  # --lam 0: no teacher
    r.tok = study.share(r.shared.tokenizers, tok_from[0], lambda: models.load_tokenizer(*tok_from))
    r.memo = study.share(r.shared.memos, (args.teacher, r.t_dev, str(r.t_dtype)),
                         lambda: study.TeacherMemo(args.teacher_memo_gb))
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
        r.student = models.layer_dropped_student(lambda: get_teacher(r), r.keep, r.s_dev, r.tok, init_dir, r.master)
        r.V = len(r.tok)
    r.student.requires_grad_(True).train()
    if r.teacher is not None:
        models.check_vocab(r.tok, r.tok, r.teacher, r.student)
    r.Ws = models.head_weight(r.student, r.V)  # (V, d), cut to the tokenizer (Qwen pads its head)
    s.timing["load_s"] = time.time() - t0


def get_teacher(r):
    if r.args.teacher is None:  # config.check refuses every flag that needs one when --lam 0 dropped it
        raise common.UserError("this run has no teacher (--lam 0 without --teacher)")
    if r.teacher is None:
        def load():
            r.log(f"loading teacher {r.args.teacher} on {r.t_dev}")
            return models.load_model(r.args.teacher, r.t_dev, r.t_dtype)[0].requires_grad_(False)
        r.teacher = study.share(r.shared.teachers, (r.args.teacher, r.t_dev, str(r.t_dtype)), load)
    return r.teacher


@torch.no_grad()
def teacher_states(r, x, remember=False):
    """(b, T) -> the teacher's final hidden states (b, T, d_t) on the student's device. remember: through
    the memo, so its trunk runs once per row (held-out rows always; training rows when Shared says so)."""
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
    if not r.held.valid.any():  # data.load_splits refuses this for text; a small GSM8K file can hit it
        raise common.UserError(f"--task-data {args.task_data}: the {args.eval_split} split is empty; give more examples")
    r.n_train_all = len(r.train)
    r.probe = eval_.load_probe(args.probe) if args.probe else None


# -----------------------------------------------------------------------------
# sample selection (Table 4, TopSmp): score every training sequence once with the frozen student

def select_samples(r, s):
    args = r.args
    if args.sample_metric == "none":
        return
    t0, need_t = time.time(), selection.needs_teacher(args.sample_metric)
    cfg = dict(metric=args.sample_metric, l=args.sample_frac, data_fingerprint=r.train.fingerprint, seed=args.seed,
               student=args.student or f"{args.teacher}:{args.student_layers}", teacher=args.teacher)

    def select():  # the frozen student's (and teacher's) score of every training sequence, top l% kept
        with amp(r):
            scores = selection.score_samples(
                args.sample_metric, r.train, lambda x: models.trunk(r.student, x), r.Ws,
                (lambda x: teacher_states(r, x)) if need_t else None,
                models.head_weight(get_teacher(r), r.V).to(r.s_dev) if need_t else None,
                args.batch_size, args.entropy_chunk, args.seed, r.s_dev)
        return selection.select_samples(scores, args.sample_frac)
    kept = cache.cached_selection(args.cache_dir or os.path.join(args.out_dir, ".."), cfg, select, r.master)
    r.train = r.train.subset(kept)
    r.train.fingerprint = f"{common.seed_from(r.train.fingerprint, kept.tolist()):016x}"  # names its cache
    s.timing["scoring_s"] = time.time() - t0
    r.log(f"sample selection: kept {len(kept)}/{r.n_train_all} sequences by {args.sample_metric}")


# -----------------------------------------------------------------------------
# the offline teacher cache (RS-KD classes): the teacher runs once, over the kept samples

def open_teacher_cache(r, s):
    args, t0 = r.args, time.time()
    if not args.cache_dir:
        return
    r.log(f"teacher cache {args.cache_dir}: RS-KD with U = {args.rs_u} sampled classes per position")
    # (b, T) -> (b, T, V) teacher logits on the teacher's device, where the cache samples; the teacher
    # loads only if a cache is missing
    logits = lambda x: teacher_states(r, x).to(r.t_dev) @ models.head_weight(get_teacher(r), r.V).T  # noqa: E731
    meta = dict(teacher=args.teacher, vocab_size=r.V, seq_len=args.seq_len, dtype=str(r.t_dtype),
                tokenizer_fingerprint=models.tokenizer_fingerprint(r.tok))
    caches = cache.open_run_caches(args.cache_dir, logits, {"train": r.train, args.eval_split: r.held}, meta,
                                   args.rs_u, args.temperature, args.seed, args.cache_shard_size, r.rank, r.world,
                                   dist.barrier if r.ddp else None, r.master, r.log)
    r.tcache, r.held_cache = caches["train"], caches[args.eval_split]
    ref = os.path.join(r.held_cache.dir, "teacher_heldout.json")  # the teacher's own held-out numbers
    if not os.path.exists(ref) and r.master:
        common.atomic_json(ref, heldout.heldout_metrics(get_teacher(r), r.held.batches(args.batch_size), None, r.V,
                                                        args.entropy_chunk))
    r.teacher_cached = common.read_json(ref) if os.path.exists(ref) else {}
    s.timing["cache_s"] = time.time() - t0


# -----------------------------------------------------------------------------
# the training step: one micro-batch, from token ids to the selective KD loss

def micro_step(r, s, idx, g):
    """Loss of the micro-batch `idx` (rows of r.train); returns (loss with grad, kd, n_selected, n_valid)."""
    args = r.args
    x, y, valid = (t[idx].to(r.s_dev) for t in (r.train.input_ids, r.train.targets, r.train.valid))
    if args.on_policy:  # the student writes the continuation; its tokens are what we supervise
        with amp(r):
            x, y, valid = models.on_policy_batch(r.student, x, args.gen_prompt_len, args.gen_tokens, r.V, g)
    with amp(r):
        hs = models.trunk(r.student, x)  # (B, T, d) with grad
    ht = teacher_states(r, x, r.shared.memo_train_rows) if r.Wt is not None else None  # (B, T, d_t)
    # score positions: rows of logits at a time, never a (B, T, V) tensor (paper Sec. 4)
    chunk = args.entropy_chunk if args.selective_head else x.numel()
    scores = torch.zeros(y.shape, device=y.device)
    policy = losses.policy_for(args.loss, args.policy)  # Weighted KD brings its own weights
    if selection.needs_scores(policy, args.k):
        with amp(r):
            scores = selection.chunked_scores(args.pos_metric, hs.detach(), r.Ws.detach(), y, ht, r.Wt, chunk, g)
    w = selection.POLICIES[policy](scores, valid, args.k, generator=g, state=s.gls, temperature=args.pos_rs_temp,
                                   progress=min(s.step / (args.curriculum_steps or r.max_steps), 1.0))  # (B, T)
    sel = w > 0 if args.selective_head else valid  # the rows that reach the LM head
    rows_w = losses.normalise_by_samples(w)[sel]  # Eq. 4: per-sequence weights, mean over kept sequences
    target = teacher_target(r, ht, sel, r.train.sample_ids[idx], chunk)
    head, kw = fused_head.HEADS[args.head], dict(loss=args.loss, temperature=args.temperature, chunk_size=chunk)
    # lam * KD + (1 - lam) * CE on the selected rows only (Eq. 1/3); lam = 1 is the paper's pure KD
    with amp(r):
        loss = head(hs[sel], r.Ws, y[sel], rows_w, target, lam=args.lam, **kw)
        kd = loss if args.lam in (0.0, 1.0) else head(hs[sel].detach(), r.Ws.detach(), y[sel], rows_w, target,
                                                       lam=1.0, **kw)
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
        # at least one chunk, empty when nothing is selected: torch.cat needs a tensor
        draws = [losses.sample_classes(hts[i0:i1] @ r.Wt.T, u[i0:i1], r.args.temperature)
                 for i0, i1 in common.row_chunks(max(hts.shape[0], 1), chunk)]
        ids, counts = (torch.cat([d[j] for d in draws]).to(r.s_dev) for j in (0, 1))
        return losses.SparseTeacher(ids, counts.float() / U)  # p~ = count / U, exactly
    return losses.DenseTeacher(ht[sel], r.Wt)


# -----------------------------------------------------------------------------
# the loop: gradient accumulation, data parallel averaging, clipping, checkpoints

def train(r, s):
    args, t0 = r.args, time.time()
    while s.step < r.max_steps:
        t_step, lr = time.time(), lr_at(args, s.step, r.max_steps)
        for group in r.opt.param_groups:
            group["lr"] = lr
        stats = torch.zeros(4, dtype=torch.float64)  # loss, kd, selected, valid (summed over micro-batches)
        for micro in range(args.grad_accum):
            g = common.generator(args.seed, s.step, micro, r.rank)  # draws depend on the step, not history
            loss, kd, n_sel, n_valid = micro_step(r, s, batch_indices(r, s.step, micro), g)
            (loss / args.grad_accum).backward()  # the step's loss is the mean over its micro-batches
            stats += torch.tensor([float(loss.detach()) / args.grad_accum, kd / args.grad_accum, n_sel, n_valid],
                                  dtype=torch.float64)
        if r.ddp:  # data parallel: average gradients and the logged loss over ranks (the global batch)
            for p in r.student.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= r.world
            dist.all_reduce(stats)
            stats[:2] /= r.world
        grad_norm = float(torch.nn.utils.clip_grad_norm_(r.student.parameters(), 1.0))  # the norm before clipping
        r.opt.step()
        r.opt.zero_grad(set_to_none=True)
        s.step += 1
        loss, kd, n_sel, n_valid = stats.tolist()
        s.sel_sum, s.valid_sum = s.sel_sum + n_sel, s.valid_sum + n_valid
        s.tokens_seen += r.global_batch * args.seq_len
        dt = time.time() - t_step
        row = dict(step=s.step, loss=loss, kd=kd, sel=n_sel / max(n_valid, 1), lr=lr, grad_norm=grad_norm, dt=dt,
                   tok_s=r.global_batch * args.seq_len / dt)
        if args.eval_every and s.step % args.eval_every == 0 and s.step < r.max_steps:  # the held-out curve
            ev = evaluate(r, s, probe=False)
            row.update(val_loss=ev["loss"], val_kl=ev.get("kl_to_teacher", ev.get("kl_rs_estimate")))
        s.hist.append(row)
        if s.step % args.log_every == 0 or s.step in (1, r.max_steps):
            r.log(f"step {s.step:5d}/{r.max_steps} | loss {loss:.4f} | kd {kd:.4f} | sel {row['sel']:.3f} | "
                  f"lr {lr:.2e} | dt {dt * 1000:.0f}ms | tok/s {row['tok_s']:.0f}", flush=True)
        if args.ckpt_every and s.step % args.ckpt_every == 0 and s.step < r.max_steps:
            s.timing["train_s"] += time.time() - t0
            t0 = time.time()
            save_checkpoint(r, s)
    s.timing["train_s"] += time.time() - t0


def lr_at(args, step, max_steps):
    """Linear warmup, then constant or cosine to 10% of --lr."""
    warm = int(args.warmup * max_steps)
    if step < warm:
        return args.lr * (step + 1) / warm
    if args.schedule == "constant":
        return args.lr
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(max_steps - warm, 1))))


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
    # fused: one pass over each tensor, no (V, d) temporaries for the update; torch has it for CPU and CUDA
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def prepare_training(r, s):
    """Optimizer, schedule, resume, the untrained student's held-out numbers, config.json."""
    args = r.args
    dense_teacher = r.tcache is None and (args.lam > 0 or selection.needs_teacher(args.pos_metric))
    r.Wt = models.head_weight(get_teacher(r), r.V).to(r.s_dev) if dense_teacher else None  # moved once
    r.opt = make_optimizer(r)
    r.global_batch = args.batch_size * args.grad_accum * r.world
    if len(r.train) < r.global_batch:
        raise common.UserError(f"--tokens: {len(r.train)} training sequences < one step's {r.global_batch} "
                               "(--batch-size x --grad-accum x processes)")
    r.steps_per_epoch = len(r.train) // r.global_batch
    r.max_steps = args.max_steps or max(1, int(args.epochs * r.steps_per_epoch))
    ckpt = os.path.join(r.run_dir, "ckpt.pt")
    if args.resume and os.path.exists(ckpt):
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        r.student.load_state_dict(ck["student"])
        r.opt.load_state_dict(ck["opt"])
        s.__dict__.update({k: ck[k] for k in vars(s)})
        r.log(f"resumed from {ckpt} at step {s.step}")
    if r.shared.memo_train_rows and args.teacher_memo_gb > 0 and dense_teacher and not args.on_policy:
        # every run reads these rows: fill the memo now, outside this run's wall time (like an offline
        # cache's build); held-out rows first, every evaluation reads them
        s.timing["teacher_memo_s"] = r.memo.fill([r.held, r.train], lambda x: teacher_states(r, x, True),
                                                 args.batch_size)
        r.t_start += s.timing["teacher_memo_s"]
    key = (r.config_key if args.student else (args.teacher, args.student_layers), r.held.fingerprint,
           args.eval_split, str(r.t_dtype), args.entropy_chunk, args.batch_size,
           (args.cache_dir, args.rs_u, args.temperature, args.seed) if r.held_cache is not None else None)
    if s.before is None:  # the untrained student on the held-out split: the same for every run of a matrix
        s.before = dict(study.share(r.shared.before, key, lambda: evaluate(r, s)))
        kl = s.before.get("kl_to_teacher", s.before.get("kl_rs_estimate"))
        r.log(f"before: student {args.eval_split} loss {s.before['loss']:.4f}" + (f" kl {kl:.4f}" if kl else ""))
    if r.master:
        common.atomic_json(os.path.join(r.run_dir, "config.json"), dict(
            vars(args), config_key=r.config_key, git_hash=common.git_hash(), student_layers_kept=r.keep,
            world_size=r.world, global_batch_seqs=r.global_batch, devices=dict(teacher=r.t_dev, student=r.s_dev),
            precision=("bf16 autocast, fp32 master weights" if r.bf16 else "fp32") + f" ({r.precision_why})"))
    r.log(f"run: {args.teacher or 'no teacher (plain CE)'} -> {args.student or f'its layers {args.student_layers}'} | "
          f"{len(r.train)} train / {len(r.held)} {args.eval_split} seqs of {args.seq_len} | k {args.k} "
          f"{args.policy} {args.pos_metric} | U {args.rs_u or '-'} | {args.loss} | "
          f"{'bf16 autocast (fp32 master)' if r.bf16 else 'fp32'} ({r.precision_why}) | teacher {r.t_dev}, student {r.s_dev} | "
          f"global batch {args.batch_size} x {args.grad_accum} x {r.world} processes = {r.global_batch} seqs | "
          f"{r.max_steps} steps")


def save_checkpoint(r, s):
    if not r.master:
        return
    s.timing["prior_wall_s"] = s.timing.get("prior_wall_s", 0.0) + time.time() - r.t_start
    r.t_start = time.time()
    common.atomic_torch_save(dict(student=r.student.state_dict(), opt=r.opt.state_dict(), config_key=r.config_key,
                                  **vars(s)), os.path.join(r.run_dir, "ckpt.pt"))


# -----------------------------------------------------------------------------
# held-out evaluation, save

def evaluate(r, s, probe=True):
    """The student's held-out loss, PPL, top-1 agreement, ECE and KL to the teacher (true KL with a teacher;
    with --cache-dir and no teacher, the RS-KD estimate, named kl_rs_estimate)."""
    t0, args = time.time(), r.args
    r.student.eval()
    with amp(r):
        if r.held_cache is not None:
            out = heldout.heldout_metrics_sparse(r.student, r.held.batches(args.batch_size), r.held_cache,
                                                 r.held.sample_ids, r.V, args.entropy_chunk)
        else:  # no teacher (plain CE, --lam 0): the student's own loss, PPL, ECE
            out = heldout.heldout_metrics(r.student, r.held.batches(args.batch_size), args.teacher and get_teacher(r),
                                          r.V, args.entropy_chunk, teacher_states=lambda x: teacher_states(r, x, True))
        if r.probe and probe:  # LAMBADA-style last-word accuracy (--probe)
            scored, _ = eval_.score_lambada(r.student, r.tok, r.probe, args.batch_size, progress=False)
            out.update(probe_acc=scored["acc"], probe_ppl=scored["ppl"], probe_n=scored["n"])
    r.student.train()
    s.timing["eval_s"] += time.time() - t0
    out["tokens"] = int(r.held.valid.sum())
    return out


def score_suite(r, s):
    """--suite on its validation and test parts: {split: suite acc}; writes what `eval.py RUN --suite S` would."""
    t0 = time.time()
    r.student.eval()
    with amp(r):
        results = eval_.score_parts(r.student, r.tok, eval_.SUITES[r.args.suite], r.run_dir)
    r.student.train()
    s.timing["eval_s"] += time.time() - t0
    return {split: suite.suite_acc(res) for split, res in results.items()}


def finish(r, s):
    args = r.args
    after = evaluate(r, s)
    suite_accs = score_suite(r, s) if args.suite != "none" and r.master else {}
    teacher = {k[len("teacher_"):]: v for k, v in after.items() if k.startswith("teacher_")} or r.teacher_cached
    if not r.master:
        return
    if args.save_model:
        models.save_model(r.student, r.tok, os.path.join(r.run_dir, "model"))
    common.atomic_write(os.path.join(r.run_dir, "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in s.hist))
    wall = time.time() - r.t_start + s.timing.get("prior_wall_s", 0.0)
    kl = "kl_to_teacher" if "kl_to_teacher" in after else "kl_rs_estimate"
    summary = dict(
        run_name=args.run_name, config_key=r.config_key, wall_time_s=wall, wall_time_split=s.timing,
        tokens_seen=s.tokens_seen, steps=s.step, global_batch_seqs=r.global_batch,
        sup_frac_positions=s.sel_sum / max(s.valid_sum, 1), sup_frac_samples=len(r.train) / r.n_train_all,
        teacher_loaded=r.teacher is not None, cache_bytes=r.tcache.bytes_on_disk if r.tcache is not None else 0,
        peak_mem_bytes={"student": system.peak_memory(r.s_dev), "teacher": system.peak_memory(r.t_dev),
                        "measure": "cuda max allocated" if "cuda" in r.s_dev else "process max RSS"},
        student_before=s.before, student_after=after, teacher=teacher, eval_split=args.eval_split,
        eval_tokens=after["tokens"], val_loss=after["loss"], val_ppl=after["ppl"],
        **({f"val_{kl}": after[kl]} if kl in after else {}), teacher_val_loss=teacher.get("loss"), suite_acc=suite_accs)
    common.atomic_json(os.path.join(r.run_dir, "summary.json"), summary)  # last: marks the run done
    if os.path.exists(os.path.join(r.run_dir, "ckpt.pt")):
        os.remove(os.path.join(r.run_dir, "ckpt.pt"))
    study.publish(args.out_dir)  # a replacing run's files take the place of the finished run's now
    vs_teacher = (f", {kl} {s.before.get(kl, float('nan')):.4f} -> {after.get(kl) or float('nan'):.4f} "
                  f"(teacher loss {teacher.get('loss', float('nan')):.4f})" if args.teacher else " (no teacher)")
    print(f"done in {wall:.0f}s: student {args.eval_split} loss {s.before['loss']:.4f} -> {after['loss']:.4f}"
          f"{vs_teacher}; supervised "
          f"{summary['sup_frac_positions']:.1%} of positions"
          + "".join(f"; suite acc ({k}) {v:.4f}" for k, v in suite_accs.items())
          + f"; summary in {args.out_dir}/summary.json")


# -----------------------------------------------------------------------------
# one run, start to end; main() also hands a --matrix to study.py

def run(args, shared=None):
    """One run: setup, models, data, (sample selection), (teacher cache), train, evaluate, save.
    `shared` (a study.Shared from study.run_matrix) holds what the runs of a matrix share."""
    r, s = setup(args, study.Shared() if shared is None else shared)
    if r.run_dir is not None:  # None: a finished run and --resume, nothing to do
        load_models(r, s)
        load_data(r)
        select_samples(r, s)  # no-op without --sample-metric
        open_teacher_cache(r, s)  # no-op without --cache-dir
        prepare_training(r, s)
        train(r, s)
        finish(r, s)
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
