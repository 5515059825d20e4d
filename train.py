"""Selective knowledge distillation, one file top to bottom.

    python train.py --pos-metric student_entropy --k 0.2      # SE-KD (the paper's Eq. 6), offline
    python train.py --k 1.0                                   # Full KD (Eq. 1-2)
    python train.py --preset paper ...                        # Qwen3-8B -> Qwen3-1.7B on FineWeb-Edu

A step: pack -> student trunk -> score positions (chunked, no (B,T,V) logits) -> pick positions
(selection.POLICIES) -> selective LM head on the picked rows -> KL(p_t || q_t) there (losses.head_loss)
-> normalise per sequence (Eq. 4) -> optimizer step. See README "How it works".
"""
import argparse
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import cache
import data
import losses
import models
import selection

# -----------------------------------------------------------------------------
# flags

PRESETS = {  # explicit flags override these
    "tiny": dict(teacher="smollm2", student=None, student_layers="0,4,8,12,16,20,24,29", data=None,
                 seq_len=256, tokens=49_152, eval_tokens=8_192, batch_size=4, grad_accum=1, lr=3e-4),
    "paper": dict(teacher="Qwen/Qwen3-8B", student="Qwen/Qwen3-1.7B", data="HuggingFaceFW/fineweb-edu",
                  seq_len=512, tokens=80_000_000, eval_tokens=1_048_576, batch_size=2, grad_accum=8,
                  lr=1e-5, temperature=1.0, lam=1.0),
}
SAMPLE_METRICS = ["none", "student_entropy", "ce_ratio", "kl", "random"]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="tiny", help="defaults for a setting; explicit flags win")
    g = p.add_argument_group("models and data")
    g.add_argument("--teacher", help="hub id, local HF dir, .gguf file, or 'smollm2' (offline default)")
    g.add_argument("--student", help="hub id / dir / .gguf; default: the teacher with --student-layers kept")
    g.add_argument("--student-layers", help="teacher layers the default student keeps: '0,4,8' or 'every:3'")
    g.add_argument("--data", help="hub dataset id, local .txt/.jsonl/.parquet file, dir or glob; default: stdlib corpus")
    g.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/hub rows")
    g.add_argument("--task", choices=["lm", "gsm8k"], default="lm", help="gsm8k: task-specific KD, prompt masked")
    g.add_argument("--task-data", default="openai/gsm8k", help="GSM8K source: hub id or local JSONL (question/answer)")
    g.add_argument("--seq-len", type=int, help="tokens per packed sequence (T)")
    g.add_argument("--tokens", type=float, help="training token budget (packed sequences = tokens // T)")
    g.add_argument("--eval-tokens", type=float, help="tokens in each held-out split (val, test)")
    g.add_argument("--eval-split", choices=["val", "test"], default="val", help="held-out split for summary metrics")
    g.add_argument("--tokenizer-backend", choices=["auto", "hf", "tiktoken"], default="auto",
                   help="auto: tiktoken when proven id-for-id equal to the HF tokenizer")
    g = p.add_argument_group("position axis")
    g.add_argument("--pos-metric", choices=selection.METRICS, default="student_entropy", help="position score (Table 1)")
    g.add_argument("--policy", choices=selection.POLICIES, default="top_k", help="how positions are picked (Table 3)")
    g.add_argument("--k", type=float, default=1.0, help="fraction of positions supervised; 1.0 = Full KD")
    g.add_argument("--gls-queue", type=int, default=30_000, help="GLS: length of the global score queue")
    g.add_argument("--curriculum-steps", type=int, help="curriculum: steps from easiest to hardest (default: all)")
    g.add_argument("--pos-rs-temp", type=float, default=1.0, help="Pos RS-KD: temperature flattening q(t)")
    g = p.add_argument_group("alignment, classes, samples")
    g.add_argument("--loss", choices=losses.LOSSES, help="kl (default; reverse_kl with --on-policy), weighted = Weighted KD")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    g.add_argument("--lam", type=float, default=1.0, help="weight of KD vs CE (1.0 = pure KD)")
    g.add_argument("--rs-u", type=int, default=0, help="RS-KD: sampled teacher classes per position (0 = off; paper 64)")
    g.add_argument("--sample-metric", choices=SAMPLE_METRICS, default="none", help="sample selection score")
    g.add_argument("--l", type=float, default=1.0, help="fraction of samples kept")
    g.add_argument("--cache-dir", help="offline teacher cache root: built if missing, reused if present")
    g.add_argument("--cache-shard-size", type=int, default=256, help="sequences per cache shard (the unit of resume)")
    g = p.add_argument_group("memory, regimes")
    g.add_argument("--selective-head", action=argparse.BooleanOptionalAction, default=None,
                   help="logits only at selected rows (default: on when k < 1)")
    g.add_argument("--entropy-chunk", type=int,
                   help="rows of logits alive at once (default: 1024 on GPU; 128 on CPU, measured 2x faster there)")
    g.add_argument("--on-policy", action="store_true", help="student generates, teacher scores (Table 5)")
    g.add_argument("--gen-prompt-len", type=int, default=32, help="on-policy: prompt tokens per sequence")
    g.add_argument("--gen-tokens", type=int, default=64, help="on-policy: tokens the student generates")
    g = p.add_argument_group("optimisation and runs")
    g.add_argument("--optim", choices=["adamw", "adam8bit"], default="adamw", help="adam8bit needs bitsandbytes")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, default=0.05, help="warmup, fraction of steps")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch (per process)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the (selected) training data")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--seed", type=int, default=0, help="data order, selection draws, cache sampling")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--teacher-device", help="default: cuda:0 / cpu")
    g.add_argument("--student-device", help="default: cuda:1 with two GPUs, else the teacher's")
    g.add_argument("--out-dir", default="out/run", help="config.json, metrics.jsonl, summary.json, model/")
    g.add_argument("--run-name", help="label of this configuration (grouping seeds in tables)")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    g.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    g.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True, help="save out-dir/model/")
    g.add_argument("--matrix", choices=["table2", "table3", "table4", "table5", "budget"], help="run a named list of configs")
    g.add_argument("--seeds", default="0", help="matrix: comma-separated seeds")
    g.add_argument("--teacher-memo-gb", type=float, default=4.0,
                   help="RAM for the teacher's final hidden states (d floats per position) kept across the runs of a "
                        "--matrix, so its trunk runs once per sequence; beyond it rows are recomputed")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    for key, val in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    try:
        selection.check_fraction(args.k, "k")
        selection.check_fraction(args.l, "l")
    except ValueError as e:
        p.error(str(e))
    args.tokens, args.eval_tokens = int(args.tokens), int(args.eval_tokens)
    if args.entropy_chunk is None:
        args.entropy_chunk = 1024 if torch.cuda.is_available() else 128
    args.loss = args.loss or ("reverse_kl" if args.on_policy else "kl")
    if args.selective_head is None:
        args.selective_head = args.k < 1.0
    checks = [(args.seq_len >= 2, f"--seq-len must be >= 2, got {args.seq_len}"),
              (args.tokens >= args.seq_len, f"--tokens {args.tokens} is smaller than one sequence (--seq-len {args.seq_len})"),
              (args.batch_size >= 1 and args.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
              (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
              (0.0 <= args.lam <= 1.0, f"--lam must be in [0, 1], got {args.lam}"),
              (args.rs_u >= 0, f"--rs-u must be >= 0, got {args.rs_u}"),
              (args.entropy_chunk >= 1, "--entropy-chunk must be >= 1"),
              (args.teacher_memo_gb >= 0, f"--teacher-memo-gb must be >= 0, got {args.teacher_memo_gb}"),
              ((args.sample_metric == "none") == (args.l == 1.0) or args.sample_metric != "none",
               "--l < 1 needs --sample-metric (which samples to keep?)"),
              (not (args.on_policy and (args.rs_u or args.cache_dir)),
               "--on-policy cannot use --rs-u/--cache-dir: a cache cannot cover student-generated text"),
              (not (args.on_policy and args.sample_metric != "none"), "--on-policy with --sample-metric is not supported"),
              (not (args.cache_dir and selection.needs_teacher(args.pos_metric)),
               f"--pos-metric {args.pos_metric} needs teacher logits, which --cache-dir replaces; use a student metric"),
              (not (args.rs_u and losses.LOSSES[args.loss]["head"] != "kl"), f"--rs-u trains on sampled classes with --loss kl, not {args.loss}")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    if args.cache_dir and not args.rs_u:
        args.rs_u = 64  # the cache stores U sampled classes: training from it is RS-KD
    return args


# -----------------------------------------------------------------------------
# small utilities

def atomic_json(path, obj):
    cache.atomic_write(path, json.dumps(obj, indent=2, default=str))


def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"  # torch.save needs a path; os.replace makes it atomic
    torch.save(obj, tmp)
    os.replace(tmp, path)


def git_hash():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


RUN_ONLY = ("out_dir", "run_name", "resume", "log_every", "ckpt_every", "save_model", "teacher_memo_gb")


def config_key(args):
    """A hash of everything that changes a run's numbers (not where it writes, nor what it is called)."""
    cfg = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_ONLY}
    return hashlib.sha256(json.dumps(cfg, default=str).encode()).hexdigest()[:16]


def step_generator(seed, *keys):
    """A generator seeded by (seed, step, micro, rank): draws depend on the step, never on history,
    so a resumed run repeats them exactly."""
    h = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


# -----------------------------------------------------------------------------
# matrix: every table of the paper as a named list of (run name, flags)

M = "student_entropy"
MATRICES = {
    "table2": [("full_kd", ["--k", "1.0"]), ("random_pos_20", ["--policy", "random", "--k", "0.2"]),
               ("atkd", ["--loss", "atkd", "--k", "1.0"])] +
              [(f"top20_{m}", ["--pos-metric", m, "--k", "0.2"]) for m in selection.METRICS if m != "random"],
    "table3": [(f"{pol}_20", ["--policy", pol, "--k", "0.2"]) for pol in ["top_k", "gls", "curriculum", "pos_rs", "pos_rs_star"]],
    "table4": [("rs_kd", ["--rs-u", "64"]), ("top_smp_20", ["--sample-metric", M, "--l", "0.2"]),
               ("random_smp_20", ["--sample-metric", "random", "--l", "0.2"]),
               ("se_kd_top_smp", ["--k", "0.2", "--sample-metric", M, "--l", "0.2"]),
               ("se_kd_3x", ["--k", "0.2", "--sample-metric", M, "--l", "0.2", "--rs-u", "64"])],
    "table5": [("gsm8k_full_kd", ["--task", "gsm8k"]), ("gsm8k_se_kd", ["--task", "gsm8k", "--k", "0.2"]),
               ("gsm8k_on_policy", ["--task", "gsm8k", "--on-policy"]),
               ("gsm8k_on_policy_se_kd", ["--task", "gsm8k", "--on-policy", "--k", "0.2"])],
    "budget": [(f"k{k}", ["--k", str(k)]) for k in [0.05, 0.1, 0.2, 0.5, 1.0]] +
              [(f"l{l}", ["--sample-metric", M, "--l", str(l)]) for l in [0.1, 0.2, 0.5]],
}


def copy_same_run(root, out, name, key):
    """Matrices that share an --out-dir share runs: a finished run with the same config_key (table 3's
    top_k_20 is table 2's top20_student_entropy) is copied under the new name instead of rerun."""
    for cfg_path in sorted(glob.glob(os.path.join(root, "*", "seed*", "config.json"))):
        src = os.path.dirname(cfg_path)
        if src == out or not os.path.exists(os.path.join(src, "summary.json")):
            continue
        cfg = json.load(open(cfg_path))
        if cfg.get("config_key") != key:
            continue
        print(f"[matrix] {name}: same config as {src}, copying its results")
        os.makedirs(out, exist_ok=True)
        summary = dict(json.load(open(os.path.join(src, "summary.json"))), run_name=name, same_as=src)
        if os.path.exists(os.path.join(src, "metrics.jsonl")):
            cache.atomic_write(os.path.join(out, "metrics.jsonl"), open(os.path.join(src, "metrics.jsonl")).read())
        atomic_json(os.path.join(out, "config.json"), dict(cfg, run_name=name, out_dir=out, same_as=src))
        atomic_json(os.path.join(out, "summary.json"), summary)  # last: its presence marks the run done
        return True
    return False


def run_matrix(args, argv):
    drop = {"--matrix": 1, "--seeds": 1, "--out-dir": 1, "--resume": 0}
    base, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=")[0]
        if flag in drop:
            i += 1 + (drop[flag] if "=" not in argv[i] else 0)
            continue
        base.append(argv[i])
        i += 1
    dirs, shared = [], {"matrix": True}  # shared: teacher, its hidden states, untrained-student numbers
    for name, flags in MATRICES[args.matrix]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = os.path.join(args.out_dir, name, f"seed{seed}")
            dirs.append(out)
            if os.path.exists(os.path.join(out, "summary.json")):
                print(f"[matrix] {name} seed {seed}: done, skipping")
                continue
            run_argv = base + flags + ["--seed", str(seed), "--out-dir", out, "--run-name", name, "--resume"]
            if copy_same_run(args.out_dir, out, name, config_key(parse_args(run_argv))):
                continue
            print(f"[matrix] {name} seed {seed}: python train.py {' '.join(run_argv)}", flush=True)
            main(run_argv, shared)  # in-process: no second torch import; a killed matrix resumes where it was
    eval_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval.py")
    subprocess.run([sys.executable, eval_py, "--compare", *dirs, "--compare-out",
                    os.path.join(args.out_dir, f"{args.matrix}.md")], check=True)


# -----------------------------------------------------------------------------
# one run

def main(argv=None, shared=None):
    """One run. `shared` (a dict, from run_matrix) keeps what runs of a matrix have in common: the
    loaded teacher and tokenizer, the teacher's final hidden states per sequence, and the untrained
    student's held-out numbers, so the teacher's trunk runs once per sequence for the whole matrix."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.matrix:
        return run_matrix(args, argv)
    t_start = time.time()
    shared = {} if shared is None else shared
    timing = {"scoring_s": 0.0, "cache_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "load_s": 0.0}

    # ---- distributed (torchrun) and devices
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    t_dev, s_dev = models.pick_devices(args.teacher_device, args.student_device)
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            t_dev = s_dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    master = rank == 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if torch.device(s_dev).type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    models.reset_peak_memory(s_dev)  # each run of a matrix reports its own peak
    if t_dev != s_dev:
        models.reset_peak_memory(t_dev)
    log = print if master else (lambda *a, **k: None)

    # ---- models (the teacher is loaded lazily: a reused cache never needs it)
    t0 = time.time()
    state = {"teacher": None}
    tkey = (args.teacher, t_dev, str(dtype))

    def share(key, make):  # what the runs of a matrix share: made by the first run that needs it
        if key not in shared:
            shared[key] = make()
        return shared[key]

    def load_teacher():
        log(f"loading teacher {args.teacher} on {t_dev}")
        return models.load_model(args.teacher, t_dev, dtype)[0].requires_grad_(False)

    def get_teacher():
        if state["teacher"] is None:
            state["teacher"] = share(("teacher",) + tkey, load_teacher)
        return state["teacher"]

    tok = share(("tokenizer", args.teacher), lambda: models.load_tokenizer(args.teacher))
    states = share(("states",) + tkey, lambda: {"rows": {}, "bytes": 0, "full": False})  # rows: token bytes -> (T, d_t)

    def teacher_hidden(x, remember=shared.get("matrix", False)):
        """(b, T) -> the teacher's final hidden states (b, T, d_t) on the student's device. remember: look
        rows up in / add them to `states` (held-out rows always; training rows within a --matrix, up to
        --teacher-memo-gb). Remembered rows run one at a time, so their states never depend on which
        rows shared the batch: a resumed matrix gives the same numbers as an uninterrupted one."""
        if not remember:
            return models.trunk(get_teacher(), x.to(t_dev)).to(s_dev)
        rows = []
        for r in x:
            key = r.cpu().numpy().tobytes()
            h = states["rows"].get(key)
            if h is None:
                h = models.trunk(get_teacher(), r[None].to(t_dev))[0].to("cpu")
                nbytes = h.numel() * h.element_size()
                states["full"] = states["bytes"] + nbytes > args.teacher_memo_gb * 2 ** 30
                if not states["full"]:
                    states["rows"][key] = h
                    states["bytes"] += nbytes
            rows.append(h)
        return torch.stack(rows).to(s_dev)

    # ---- data
    if args.task == "gsm8k":
        splits = data.pack_gsm8k(data.load_gsm8k_rows(args.task_data), tok, args.seq_len, args.tokens, args.seed)
    else:
        splits = data.load_splits(tok, args.data, args.seq_len, args.tokens, args.eval_tokens, args.seed,
                                  args.text_field, args.tokenizer_backend, models.tokenizer_fingerprint(tok))
    train, held = splits["train"], splits[args.eval_split]
    log(f"data: {len(train)} train / {len(held)} {args.eval_split} sequences of {args.seq_len} tokens")
    tok_fp = models.tokenizer_fingerprint(tok)

    keep = None
    init_dir = None
    if args.student:
        student, s_tok = models.load_model(args.student, s_dev, dtype)
        V = models.check_vocab(tok, s_tok)
    else:
        keep = models.parse_layers(args.student_layers, 10 ** 6)
        tag = hashlib.sha256(f"{args.teacher}|{keep}".encode()).hexdigest()[:12]
        init_dir = os.path.join(args.cache_dir, f"student_init_{tag}") if args.cache_dir else None
        if init_dir and os.path.exists(os.path.join(init_dir, "config.json")):
            student, _ = models.load_model(init_dir, s_dev, dtype)  # the teacher stays on disk
        else:
            teacher = get_teacher()
            keep = models.parse_layers(args.student_layers, teacher.config.num_hidden_layers)
            student = models.student_from_teacher(teacher, keep).to(s_dev)
            if init_dir and master and not os.path.exists(init_dir):  # later runs start from it, teacher-free
                student.save_pretrained(init_dir + ".tmp")
                tok.save_pretrained(init_dir + ".tmp")
                os.replace(init_dir + ".tmp", init_dir)
        V = len(tok)
    student.requires_grad_(True).train()
    if state["teacher"] is not None:
        models.check_vocab(tok, tok, state["teacher"], student)
    timing["load_s"] = time.time() - t0

    # ---- a --matrix runs the teacher once per sequence: fill its states now, outside the run's wall time
    # (like an offline cache, whose build is a one-time cost); later runs of this seed find them all.
    # Held-out rows first (every evaluation reads them); no further once --teacher-memo-gb is full.
    if shared.get("matrix") and args.teacher_memo_gb > 0 and not (args.cache_dir or args.on_policy):
        t0 = time.time()
        with torch.no_grad():
            for pk in (held, train):
                for i in range(0, len(pk), args.batch_size):
                    if states["full"]:
                        break
                    teacher_hidden(pk.input_ids[i:i + args.batch_size], True)
        timing["teacher_memo_s"] = time.time() - t0
        t_start += timing["teacher_memo_s"]  # wall_time_s excludes it; the summary keeps it apart

    def teacher_logits_fn(x):  # (b, T) -> (b, T, V): only the cache builder sees full teacher logits
        with torch.no_grad():
            return (teacher_hidden(x).to(t_dev) @ models.head_weight(get_teacher(), V).T).float().cpu()

    # ---- sample selection (Table 4 TopSmp): score once with the frozen student, cache the kept ids
    sup_frac_samples = 1.0
    if args.sample_metric != "none":
        t0 = time.time()
        cfg = dict(metric=args.sample_metric, l=args.l, data_fingerprint=train.fingerprint, seed=args.seed,
                   student=args.student or f"{args.teacher}:{keep}", teacher=args.teacher)
        sel_path = os.path.join(args.cache_dir or os.path.join(args.out_dir, ".."), "selections",
                                hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16] + ".json")
        kept = cache.load_selection(sel_path, cfg)
        if kept is None:
            need_t = selection.needs_teacher(args.sample_metric)
            scores = []
            with torch.no_grad():
                bar = tqdm(train.batches(args.batch_size), total=math.ceil(len(train) / args.batch_size),
                           desc=f"scoring samples ({args.sample_metric})", disable=not master)
                for i, (x, y, v) in enumerate(bar):
                    hs = models.trunk(student, x.to(s_dev))
                    ht = teacher_hidden(x) if need_t else None
                    scores.append(selection.sample_scores(
                        args.sample_metric, hs, models.head_weight(student, V), y.to(s_dev), v.to(s_dev), ht,
                        models.head_weight(get_teacher(), V).to(s_dev) if need_t else None,
                        args.entropy_chunk, step_generator(args.seed, "smp", i)).cpu())
            kept = selection.select_samples(torch.cat(scores), args.l)
            if master:
                os.makedirs(os.path.dirname(sel_path), exist_ok=True)
                cache.save_selection(sel_path, kept, cfg)
        sup_frac_samples = len(kept) / len(train)
        train = train.subset(kept)
        train.fingerprint = hashlib.sha256(f"{train.fingerprint}|{kept.tolist()}".encode()).hexdigest()[:16]
        timing["scoring_s"] = time.time() - t0
        log(f"sample selection: kept {len(kept)}/{len(kept) / sup_frac_samples:.0f} sequences by {args.sample_metric}")

    # ---- offline teacher cache (RS-KD classes): the teacher runs once, over the kept samples
    tcache, held_cache, teacher_cached = None, None, {}
    if args.cache_dir:
        t0 = time.time()
        for split, pk in (("train", train), (args.eval_split, held)):
            d = os.path.join(args.cache_dir, f"{split}-{pk.fingerprint}")
            meta = dict(teacher=args.teacher, vocab_size=V, seq_len=args.seq_len, tokenizer_fingerprint=tok_fp,
                        data_fingerprint=pk.fingerprint)
            if not os.path.exists(os.path.join(d, cache.HEADER)):
                log(f"building teacher cache {d}")
                cache.build(d, teacher_logits_fn, pk.input_ids, pk.sample_ids, meta, U=args.rs_u,
                            temperature=args.temperature, seed=args.seed, rank=rank, world_size=world,
                            shard_size=args.cache_shard_size,
                            progress=master)
                if ddp:
                    dist.barrier()
                    if master:
                        cache.finalize(d)
                    dist.barrier()
            c = cache.open_cache(d, dict(meta, U=args.rs_u, temperature=args.temperature))
            tcache, held_cache = (c, held_cache) if split == "train" else (tcache, c)
        ref_path = os.path.join(d, "teacher_heldout.json")  # d: the held-out split's cache
        if not os.path.exists(ref_path) and master:  # the teacher's own held-out numbers, kept with the cache
            atomic_json(ref_path, models.heldout_metrics(get_teacher(), held.batches(args.batch_size), None, V,
                                                         args.entropy_chunk))
        teacher_cached = json.load(open(ref_path)) if os.path.exists(ref_path) else {}
        timing["cache_s"] = time.time() - t0

    # ---- held-out evaluation (student before / after; the teacher's trunk once per sequence)
    def heldout():
        t0 = time.time()
        student.eval()
        if held_cache is not None:
            out = models.heldout_metrics_sparse(student, held.batches(args.batch_size), held_cache,
                                                held.sample_ids, V, args.entropy_chunk)
        else:
            out = models.heldout_metrics(student, held.batches(args.batch_size), get_teacher(), V, args.entropy_chunk,
                                         teacher_states=lambda x: teacher_hidden(x, True).to(t_dev))
        student.train()
        timing["eval_s"] += time.time() - t0
        return out

    # ---- optimizer, schedule, resume
    if args.optim == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            sys.exit("--optim adam8bit needs bitsandbytes: pip install bitsandbytes")
        opt = bnb.optim.Adam8bit(student.parameters(), lr=args.lr)
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_step = args.batch_size * args.grad_accum * world
    if len(train) < per_step:
        sys.exit(f"--tokens: {len(train)} training sequences < one step's {per_step} (batch x accum x ranks)")
    steps_per_epoch = len(train) // per_step
    max_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    warm = int(args.warmup * max_steps)
    lr_at = lambda s: args.lr * (s + 1) / max(warm, 1) if s < warm else \
        args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(max_steps - warm, 1))))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    gls = selection.GLSQueue(args.gls_queue)
    step, hist, before = 0, [], None
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["opt"])
        step, hist, before, gls = ck["step"], ck["hist"], ck["before"], ck["gls"]
        timing.update(ck["timing"])
        log(f"resumed from {ckpt_path} at step {step}")
    before_key = ("before", args.teacher, args.student, str(keep), held.fingerprint, args.eval_split, str(dtype),
                  args.entropy_chunk, args.batch_size,  # and, against a cache, which sampled target it holds:
                  (args.cache_dir, args.rs_u, args.temperature, args.seed) if held_cache is not None else None)
    if before is None and before_key in shared:
        before = dict(shared[before_key])  # the same untrained student on the same held-out split
    if before is None:
        before = heldout()
        shared[before_key] = dict(before)
        log(f"before: student val loss {before['loss']:.4f} kl {before.get('kl_to_teacher', float('nan')):.4f}")
    if master:
        atomic_json(os.path.join(args.out_dir, "config.json"), dict(vars(args), git_hash=git_hash(), argv=argv,
                                                                   config_key=config_key(args),
                                                                   student_layers_kept=keep, world_size=world))
    curriculum_steps = args.curriculum_steps or max_steps
    policy = losses.LOSSES[args.loss].get("policy", args.policy)  # Weighted KD brings its own weights
    head_name = losses.LOSSES[args.loss]["head"]
    Ws = models.head_weight(student, V)
    # the teacher's LM head on the student's device, moved once (not every step: 1.2 GB for Qwen3-8B)
    Wt = models.head_weight(get_teacher(), V).to(s_dev) if tcache is None else None

    def batch_indices(step, micro):
        epoch, j = divmod(step * args.grad_accum + micro, steps_per_epoch * args.grad_accum)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        start = (j * world + rank) * args.batch_size
        return perm[start:start + args.batch_size]

    # ---- training loop
    t_train = time.time()
    tokens_seen = 0
    sel_sum = valid_sum = 0
    while step < max_steps:
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        tot_loss = tot_kd = 0.0
        n_sel = n_valid = 0
        for micro in range(args.grad_accum):
            idx = batch_indices(step, micro)
            x, y, valid = train.input_ids[idx].to(s_dev), train.targets[idx].to(s_dev), train.valid[idx].to(s_dev)
            g = step_generator(args.seed, step, micro, rank)
            if args.on_policy:  # the student writes the continuation; its tokens are what we supervise
                student.eval()
                with torch.no_grad():
                    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
                    P = args.gen_prompt_len
                    seq = student.generate(x[:, :P], max_new_tokens=args.gen_tokens, do_sample=True, top_k=0,
                                           pad_token_id=tok.eos_token_id, attention_mask=torch.ones_like(x[:, :P]))
                student.train()
                x, y = seq[:, :-1], seq[:, 1:]
                valid = torch.zeros_like(y, dtype=torch.bool)
                valid[:, P - 1:] = True
            hs = models.trunk(student, x)  # (B, T, d) with grad
            ht = teacher_hidden(x) if tcache is None else None  # (B, T, d_t)
            # score positions: rows of logits at a time, no (B, T, V) tensor (paper Sec. 4)
            chunk = args.entropy_chunk if args.selective_head else x.numel()
            scores = selection.chunked_scores(args.pos_metric, hs.detach(), Ws.detach(), y, ht, Wt, chunk, g) \
                if selection.needs_scores(policy, args.k) else torch.zeros(y.shape, device=y.device)
            w = selection.POLICIES[policy](scores, valid, args.k, generator=g, state=gls, temperature=args.pos_rs_temp,
                                           progress=min(step / max(curriculum_steps - 1, 1), 1.0))  # (B, T)
            sel = w > 0 if args.selective_head else valid  # rows that reach the LM head
            n_seq = max(int((w > 0).any(1).sum()), 1)
            rows_w = w[sel] / n_seq  # Eq. 4: per-sequence weights, mean over sequences with any weight
            if tcache is not None:  # RS-KD target straight from the cache (no teacher in memory)
                ids, probs = tcache.get(train.sample_ids[idx])
                teacher = losses.SparseTeacher(ids.to(s_dev)[sel], probs.to(s_dev)[sel])
            elif args.rs_u:  # RS-KD online: sample U teacher classes at the selected rows, chunk by chunk
                hts = ht[sel]  # (N, d_t); max(N, 1) so an empty selection still yields (0, U) tensors
                draws = [losses.sample_classes(hts[i:i + chunk] @ Wt.T, args.rs_u, g, args.temperature)
                         for i in range(0, max(hts.shape[0], 1), chunk)]
                teacher = losses.SparseTeacher(torch.cat([d[0] for d in draws]).to(s_dev),
                                               torch.cat([d[1] for d in draws]).to(s_dev))
            else:
                teacher = losses.DenseTeacher(ht[sel], Wt)
            # lam * KD + (1 - lam) * CE on the selected rows (Eq. 1/3); lam = 1 is the paper's pure KD
            loss = losses.head_loss(hs[sel], Ws, y[sel], rows_w, teacher, loss=head_name,
                                    temperature=args.temperature, lam=args.lam, chunk_size=chunk)
            kd = loss if args.lam == 1.0 else losses.head_loss(
                hs[sel].detach(), Ws.detach(), y[sel], rows_w, teacher, loss=head_name,
                temperature=args.temperature, lam=1.0, chunk_size=chunk)
            (loss / args.grad_accum).backward()
            tot_loss += float(loss.detach()) / args.grad_accum
            tot_kd += float(kd.detach()) / args.grad_accum
            n_sel += int((w > 0).sum())
            n_valid += int(valid.sum())
            tokens_seen += x.numel() * world
        if ddp:  # data parallel: average gradients across ranks
            for prm in student.parameters():
                if prm.grad is not None:
                    dist.all_reduce(prm.grad)
                    prm.grad /= world
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        sel_sum, valid_sum = sel_sum + n_sel, valid_sum + n_valid
        dt = time.time() - t0
        row = dict(step=step, loss=tot_loss, kd=tot_kd, sel=n_sel / max(n_valid, 1), lr=lr_at(step - 1), dt=dt,
                   tok_s=per_step * x.shape[1] / dt)
        hist.append(row)
        if step % args.log_every == 0 or step == max_steps or step == 1:
            log(f"step {step:5d}/{max_steps} | loss {tot_loss:.4f} | kd {tot_kd:.4f} | sel {row['sel']:.3f} | "
                f"lr {row['lr']:.2e} | dt {dt * 1000:.0f}ms | tok/s {row['tok_s']:.0f}", flush=True)
        if os.environ.get("NANO_SEKD_CRASH_AT") == str(step):  # test hook: simulate a kill
            os._exit(17)
        if master and (args.ckpt_every and step % args.ckpt_every == 0 and step < max_steps):
            timing["train_s"] += time.time() - t_train
            t_train = time.time()
            timing["prior_wall_s"] = timing.get("prior_wall_s", 0.0) + time.time() - t_start
            t_start = time.time()
            atomic_save(dict(student=student.state_dict(), opt=opt.state_dict(), step=step, hist=hist,
                             before=before, gls=gls, timing=timing), ckpt_path)
    timing["train_s"] += time.time() - t_train

    # ---- final evaluation and summary
    after = heldout()
    teacher_ref = {k[len("teacher_"):]: v for k, v in after.items() if k.startswith("teacher_")}
    teacher_ref = teacher_ref or {k: teacher_cached[k] for k in ("loss", "ppl", "ece") if k in teacher_cached}
    if "loss" in teacher_ref:
        teacher_ref["ppl"] = math.exp(min(teacher_ref["loss"], 50.0))
    if master:
        if args.save_model:
            mdir = os.path.join(args.out_dir, "model")
            student.save_pretrained(mdir + ".tmp")
            tok.save_pretrained(mdir + ".tmp")
            if os.path.exists(mdir):
                import shutil
                shutil.rmtree(mdir)
            os.replace(mdir + ".tmp", mdir)
        cache.atomic_write(os.path.join(args.out_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in hist))
        wall = time.time() - t_start + timing.get("prior_wall_s", 0.0)
        summary = dict(
            run_name=args.run_name, wall_time_s=wall, wall_time_split=timing, tokens_seen=tokens_seen,
            steps=step, sup_frac_positions=sel_sum / max(valid_sum, 1) if valid_sum else None,
            sup_frac_samples=sup_frac_samples, teacher_loaded=state["teacher"] is not None,
            peak_mem_bytes={"student": models.peak_memory(s_dev), "teacher": models.peak_memory(t_dev),
                            "measure": "cuda max allocated" if torch.device(s_dev).type == "cuda" else "process max RSS"},
            cache_bytes=tcache.bytes_on_disk if tcache is not None else 0,
            student_before=before, student_after=after, teacher=teacher_ref, eval_split=args.eval_split,
            val_loss=after["loss"], val_ppl=after["ppl"], val_kl_to_teacher=after.get("kl_to_teacher"),
            teacher_val_loss=teacher_ref.get("loss"))
        atomic_json(os.path.join(args.out_dir, "summary.json"), summary)
        if os.path.exists(ckpt_path):
            os.remove(ckpt_path)
        print(f"done in {wall:.0f}s: student {args.eval_split} loss {before['loss']:.4f} -> {after['loss']:.4f}, "
              f"KL to teacher {before.get('kl_to_teacher', 0):.4f} -> {after.get('kl_to_teacher', 0):.4f} "
              f"(teacher loss {teacher_ref.get('loss', float('nan')):.4f}); supervised "
              f"{summary['sup_frac_positions']:.1%} of positions; summary in {args.out_dir}/summary.json")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
