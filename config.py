"""train.py's flags: presets, parsing and the checks that need no model (like nanoGPT's configurator.py,
config stays out of the trainer).

    args = config.parse_args(argv)     # flags -> presets filled in -> derived defaults -> checks

A preset fills every flag the user did not pass; explicit flags win. `finalize` is separate so a study
(study.py) can take the parsed flags, override a few fields per run, and finalize each run the same way.
Bad flags exit with one argparse line naming the flag (exit 2) before any model is loaded.
"""
import argparse
import copy
import math
import os
import sys

import cache
import common
import data
import losses
import sandbox
import selection

SANDBOX = sandbox.paths()  # where sandbox.py builds the near pair (--preset sandbox)
PRESETS = {  # explicit flags override these
    # the paper's 512-token sequences, 2 a step: 48 steps of 1,024 tokens over the 49k-token budget
    "tiny": dict(teacher="smollm2", student=None, student_layers="0,4,8,12,16,20,24,29", data=None,
                 seq_len=512, tokens=49_152, eval_tokens=8_192, batch_size=2, grad_accum=1, lr=3e-4,
                 optim="adamw", schedule="cosine", warmup=0.05, seeds="0"),
    # Table 8-9 and Appendix B/F of the paper: Adam8bit at a constant lr 1e-5, batch 16 (2 x 8), 512-token
    # sequences, 4,000 curriculum steps, seeds 1337-1339 (the authors' released configuration)
    "paper": dict(teacher="Qwen/Qwen3-8B", student="Qwen/Qwen3-1.7B", data="HuggingFaceFW/fineweb-edu",
                  seq_len=512, tokens=80_000_000, eval_tokens=1_048_576, batch_size=2, grad_accum=8,
                  lr=1e-5, temperature=1.0, lam=1.0, optim="adam8bit", schedule="constant", warmup=0.0,
                  curriculum_steps=4000, seeds="1337,1338,1339"),
    # a near pair built by sandbox.py (a pretrained student close to its teacher); 192 steps of 8 x 128
    # tokens: where Full KD's held-out KL curve flattens (docs/results.md shows it); lr 3e-3: the lr Full KD
    # and RandomPos choose on the suite's validation part over 3e-5..3e-3, and the only one of those where
    # Full KD moves the suite (at <= 3e-4 it stays within 1.2 points of the undistilled student; docs/results.md,
    # "The step size"); fp32, as the published study ran (--dtype auto would pick bf16 on a CPU with bf16 units)
    "sandbox": dict(teacher=SANDBOX["teacher"], student=SANDBOX["student"], dtype="fp32",
                    data=SANDBOX["kd"], probe=SANDBOX["probe"], seq_len=128, tokens=196_608,
                    eval_tokens=8_192, batch_size=8, grad_accum=1, lr=3e-3, optim="adamw", schedule="cosine",
                    warmup=0.05, seeds="0,1,2,3,4", suite="sandbox"),
}
SAMPLE_METRICS = ["none", "student_entropy", "ce_ratio", "kl", "random"]
MATRICES = ["table2", "table3", "table4", "table5", "core", "budget", "lr"]  # defined in study.py
DEFAULT_TASK_DATA = "openai/gsm8k"
# flags that change where a run writes or what it is called, not its numbers (kept out of config_key)
RUN_ONLY = ("out_dir", "run_name", "resume", "log_every", "eval_every", "ckpt_every", "save_model", "teacher_memo_gb",
            "keep_freed_memory", "head",
            "matrix", "seeds", "debug", "fresh")


def get_parser():
    p = common.ArgumentParser(prog="train.py", description="Selective knowledge distillation, one run.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="tiny", help="defaults for a setting; explicit flags win")
    g = p.add_argument_group("models and data").add_argument
    g("--teacher", help="hub id, local HF dir, .gguf file, or 'smollm2' (offline default)")
    g("--student", help="hub id / dir / .gguf; default: the teacher with --student-layers kept")
    g("--student-layers", help="teacher layers the default student keeps: '0,4,8' or 'every:3'")
    g("--data", help="hub dataset id, local .txt/.jsonl/.parquet file, dir or glob; default: stdlib corpus")
    g("--text-field", default="text", help="text field of .jsonl/.parquet/hub rows")
    g("--task", choices=["lm", "gsm8k"], default="lm", help="gsm8k: task-specific KD, prompt masked")
    g("--task-data", default=DEFAULT_TASK_DATA, help="GSM8K source: hub id or local JSONL (question/answer)")
    g("--seq-len", type=int, help="tokens per packed sequence (T)")
    g("--tokens", type=float, help="training token budget (packed sequences = tokens // T)")
    g("--eval-tokens", type=float, help="tokens in each held-out split (val, test)")
    g("--eval-split", choices=["val", "test"], default="val", help="held-out split for summary metrics")
    g("--probe", help="LAMBADA-style .jsonl (rows {'text'}; the last word is the target): the student's "
      "greedy last-word accuracy before and after (sandbox.py builds one)")
    g("--suite", choices=["none", "sandbox"], help="downstream suite scored at the end into eval.json and "
      "eval_validation.json, as `eval.py RUN --suite S` would (default: sandbox under --preset sandbox, else none)")
    g("--tokenizer-backend", choices=["auto", "hf", "tiktoken"], default="auto",
      help="auto: tiktoken when proven id-for-id equal to the HF tokenizer")
    g = p.add_argument_group("position axis").add_argument
    g("--pos-metric", choices=selection.METRICS, default="student_entropy", help="position score (Table 1)")
    g("--policy", choices=selection.POLICIES, default="top_k", help="how positions are picked (Table 3)")
    g("--k", type=float, default=1.0, help="fraction of positions supervised; 1.0 = Full KD")
    g("--gls-queue", type=int, default=30_000, help="GLS: length of the global score queue")
    g("--curriculum-steps", type=int, help="curriculum: steps from easiest to hardest (default: all)")
    g("--pos-rs-temp", type=float, default=1.0, help="Pos RS-KD: temperature flattening q(t)")
    g = p.add_argument_group("alignment, classes, samples").add_argument
    g("--loss", choices=losses.LOSSES, help="kl (default; reverse_kl with --on-policy), weighted = Weighted KD")
    g("--temperature", type=float, default=1.0, help="distillation temperature T")
    g("--lam", type=float, default=1.0,
      help="weight of KD vs CE (1.0 = pure KD; 0.0 = plain CE: no teacher is loaded unless --teacher is given)")
    g("--rs-u", type=int, help="RS-KD: sampled teacher classes per position (0 = off; 64 with --cache-dir)")
    g("--sample-metric", choices=SAMPLE_METRICS, default="none", help="sample selection score")
    g("--sample-frac", type=float, default=1.0, help="the paper's l: fraction of samples kept")
    g("--cache-dir", help="offline teacher cache root (RS-KD targets): built if missing, reused if present")
    g("--cache-shard-size", type=int, default=256, help="sequences per cache shard (the unit of resume)")
    g = p.add_argument_group("memory, regimes").add_argument
    g("--selective-head", action=argparse.BooleanOptionalAction, default=None,
      help="logits only at selected rows (default: on when k < 1)")
    g("--head", choices=["fused", "reference"], default="fused",
      help="LM-head path: fused (fast: gradients in the forward pass, closed forms) or reference (losses.py's "
           "plain chunked head); equal values and gradients (tests/test_head_parity.py)")
    g("--entropy-chunk", type=int, help="rows of logits alive at once (default: 1024 on GPU, 256 on CPU)")
    g("--on-policy", action="store_true", help="student generates, teacher scores (Table 5)")
    g("--gen-prompt-len", type=int, default=32, help="on-policy: prompt tokens per sequence")
    g("--gen-tokens", type=int, default=64, help="on-policy: tokens the student generates")
    g = p.add_argument_group("optimisation").add_argument
    g("--optim", choices=["adamw", "adam8bit"], help="adam8bit (the paper's) needs bitsandbytes and a GPU")
    g("--lr", type=float, help="peak learning rate")
    g("--schedule", choices=["cosine", "constant"], help="lr after warmup: cosine to 10%%, or constant")
    g("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g("--warmup", type=float, help="warmup, fraction of steps")
    g("--batch-size", type=int, help="sequences per micro-batch, per process")
    g("--grad-accum", type=int, help="micro-batches per optimizer step")
    g("--epochs", type=float, default=1.0, help="passes over the (selected) training data")
    g("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g("--seed", type=int, default=0, help="data order, selection draws, cache sampling")
    g("--dtype", choices=["auto", "fp32", "bf16"], default=None,
      help="bf16: teacher in bf16, student fp32 master weights under bf16 autocast; auto (default; --preset "
           "sandbox: fp32): bf16 on a GPU, and on a CPU whose bf16 GEMM is >= 1.5x fp32's (measured at start; "
           "$NANO_SEKD_CPU_DTYPE fixes it)")
    g = p.add_argument_group("devices and runs").add_argument
    g("--teacher-device", help="one process: default cuda:0 (cpu without GPUs); not with torchrun")
    g("--student-device", help="one process: default cuda:1 with two GPUs, else the teacher's; not with torchrun")
    g("--keep-freed-memory", action="store_true",
      help="CPU: keep freed heap pages for reuse (glibc): a step at V = 151,936 ran 2.5x faster, but the "
           "default run's peak RSS doubled (README Performance)")
    g("--out-dir", default="out/run", help="config.json, metrics.jsonl, summary.json, model/")
    g("--run-name", help="label of this configuration (grouping seeds in tables)")
    g("--resume", action="store_true", help="continue from out-dir/ckpt.pt of the same config (none: start fresh; a finished run: nothing to do)")
    g("--fresh", action="store_true", help="rerun in an out-dir that holds a run: its files are replaced once the new run has finished")
    g("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g("--log-every", type=int, default=10, help="progress line every N steps")
    g("--eval-every", type=int, default=0, help="held-out loss and KL every N steps into metrics.jsonl (0: off)")
    g("--save-model", action=argparse.BooleanOptionalAction, default=True, help="save out-dir/model/")
    g("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    g = p.add_argument_group("studies (study.py)").add_argument
    g("--matrix", choices=MATRICES, help="run a named table of configs x --seeds (study.py)")
    g("--seeds", help="matrix: comma-separated seeds (default: the preset's)")
    g("--teacher-memo-gb", type=float, default=4.0,
      help="matrix: RAM for the teacher's final hidden states kept across runs (its trunk runs once)")
    return p


def parse_args(argv=None, raw=False):
    """argv -> finalized args (raw=True: as parsed, before presets, yet checked); bad flags exit 2 with
    one line, `train.py: error: ...`."""
    p = get_parser()
    args = p.parse_args(argv)
    try:
        done = finalize(args)
    except ValueError as e:
        p.error(str(e))
    return args if raw else done


def default_entropy_chunk(device_type):
    """--entropy-chunk's default, rows of (rows, V) logits alive at once: 1024 on a GPU, 256 on a CPU.
    Fewer rows save memory but cost time: every chunk reads the (V, d) head once per GEMM, and small
    GEMMs run below the machine's peak (bench/RESULTS.md). The bench scripts use it too."""
    return 1024 if device_type == "cuda" else 256


def finalize(raw):
    """Fill preset defaults and derived defaults into a copy of `raw`, then check it (ValueError)."""
    args = copy.copy(raw)
    for key, val in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    if args.dtype is None:  # after the presets: sandbox pins fp32
        args.dtype = "auto"
    args.suite = args.suite or "none"
    if args.entropy_chunk is None:
        import torch
        args.entropy_chunk = default_entropy_chunk("cuda" if torch.cuda.is_available() else "cpu")
    if raw.lam == 0 and raw.teacher is None and args.student:  # plain CE (pretraining): no teacher at all
        args.teacher = None
    args.loss = args.loss or ("reverse_kl" if args.on_policy else "kl")
    if args.selective_head is None:
        args.selective_head = args.k < 1.0
    if args.rs_u is None:  # the cache stores U sampled classes: training from it is RS-KD, U = 64 by default
        args.rs_u = 64 if args.cache_dir else 0
    check(args)
    args.tokens, args.eval_tokens = int(args.tokens), int(args.eval_tokens)
    return args


def check(args):
    """Every check that needs no model, so a typo fails in a second, not after loading an 8B teacher."""
    for name in ("k", "sample_frac"):
        v = getattr(args, name)
        if not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    finite = ("lr", "temperature", "lam", "tokens", "eval_tokens", "warmup", "epochs", "pos_rs_temp",
              "weight_decay", "teacher_memo_gb")
    for name in finite:
        if not math.isfinite(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    uses_pair = any((m or "").startswith(SANDBOX["root"]) for m in (args.teacher, args.student))
    if args.preset == "sandbox" and uses_pair and not sandbox.is_built():
        raise ValueError(f"--preset sandbox: the pair is not built in {SANDBOX['root']}: run `python sandbox.py` "
                         "once (about 10 minutes on 2 cores; reused afterwards)")
    if args.suite == "sandbox" and not sandbox.is_built():
        raise ValueError(f"--suite sandbox: the pair is not built in {SANDBOX['root']}: run `python sandbox.py`")
    seeds = [] if args.seeds is None else args.seeds.split(",")
    no_teacher = args.teacher is None
    teacher_needs = [f"--pos-metric {args.pos_metric}" if selection.needs_teacher(args.pos_metric) else "",
                     f"--sample-metric {args.sample_metric}"
                     if args.sample_metric != "none" and selection.needs_teacher(args.sample_metric) else "",
                     "--cache-dir" if args.cache_dir else "", "--on-policy" if args.on_policy else ""]
    out_problem = common.writable_dir_problem(args.out_dir)
    checks = [
        (out_problem is None, f"--out-dir {args.out_dir!r} {out_problem}"),
        (args.seq_len >= 2, f"--seq-len must be >= 2, got {args.seq_len}"),
        (args.tokens >= args.seq_len,
         f"--tokens {args.tokens:g} is smaller than one sequence (--seq-len {args.seq_len})"),
        (args.eval_tokens >= args.seq_len, f"--eval-tokens {args.eval_tokens:g} is smaller than one sequence"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.grad_accum >= 1, f"--grad-accum must be >= 1, got {args.grad_accum}"),
        (args.max_steps is None or args.max_steps >= 1, f"--max-steps must be >= 1, got {args.max_steps}"),
        (args.epochs > 0, f"--epochs must be > 0, got {args.epochs}"),
        (args.lr >= 0, f"--lr must be >= 0, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0 <= args.warmup < 1, f"--warmup is a fraction of steps in [0, 1), got {args.warmup}"),
        (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (0.0 <= args.lam <= 1.0, f"--lam must be in [0, 1], got {args.lam}"),
        (args.rs_u >= 0, f"--rs-u must be >= 0, got {args.rs_u}"),
        (not args.cache_dir or 1 <= args.rs_u <= cache.MAX_U,
         f"--rs-u must be in [1, {cache.MAX_U}] with --cache-dir (the classes the cache keeps per position), "
         f"got {args.rs_u}"),
        (args.entropy_chunk >= 1, f"--entropy-chunk must be >= 1, got {args.entropy_chunk}"),
        (args.gls_queue >= 1, f"--gls-queue must be >= 1, got {args.gls_queue}"),
        (args.pos_rs_temp > 0, f"--pos-rs-temp must be > 0, got {args.pos_rs_temp}"),
        (args.curriculum_steps is None or args.curriculum_steps >= 1,
         f"--curriculum-steps must be >= 1, got {args.curriculum_steps}"),
        (args.cache_shard_size >= 1, f"--cache-shard-size must be >= 1, got {args.cache_shard_size}"),
        (args.ckpt_every >= 0 and args.log_every >= 1 and args.eval_every >= 0,
         "--ckpt-every and --eval-every must be >= 0, --log-every >= 1"),
        (args.teacher_memo_gb >= 0, f"--teacher-memo-gb must be >= 0, got {args.teacher_memo_gb}"),
        (all(s.strip().lstrip("-").isdigit() for s in seeds) and (args.seeds is None or seeds),
         f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}"),
        (args.sample_frac == 1.0 or args.sample_metric != "none",
         "--sample-frac < 1 needs --sample-metric (which samples to keep?)"),
        (not (args.on_policy and (args.rs_u or args.cache_dir)),
         "--on-policy cannot use --rs-u/--cache-dir: a cache cannot cover student-generated text"),
        (not (args.on_policy and args.sample_metric != "none"),
         "--on-policy with --sample-metric is not supported"),
        (not args.on_policy or 1 <= args.gen_prompt_len < args.seq_len,
         f"--gen-prompt-len must be in [1, --seq-len {args.seq_len}), got {args.gen_prompt_len}"),
        (not args.on_policy or args.gen_tokens >= 1, f"--gen-tokens must be >= 1, got {args.gen_tokens}"),
        (not (args.cache_dir and selection.needs_teacher(args.pos_metric)),
         f"--pos-metric {args.pos_metric} needs teacher logits, which --cache-dir replaces; use a student metric"),
        (not (args.rs_u and not losses.supports_rs_kd(args.loss)),
         f"--rs-u trains on sampled classes with --loss kl, not {args.loss}"),
        (not (args.resume and args.fresh), "--resume and --fresh exclude each other"),
        (args.probe is None or os.path.isfile(args.probe), f"--probe {args.probe}: no such file"),
        (not (no_teacher and any(teacher_needs)),
         f"{' '.join(n for n in teacher_needs if n)} needs a teacher; with --lam 0 pass --teacher explicitly"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def check_environment(args):
    """What a run needs beyond its flags, checked once before any model loads (common.UserError): packages,
    the --data source (files, or a hub dataset that is cached or reachable) and --task-data. Prints one
    warning line for each suspicious input. args: as parsed (parse_args(raw=True))."""
    a = finalize(args)
    if a.optim == "adam8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise common.UserError("--optim adam8bit (the paper's, set by --preset paper) needs bitsandbytes and "
                                   "a GPU: pip install bitsandbytes, or pass --optim adamw") from None
    notes = []
    if a.task != "gsm8k" or a.matrix:  # a --matrix may mix both tasks
        notes += data.check_source(a.data, a.text_field)
    if a.task == "gsm8k" or (a.matrix and a.task_data != DEFAULT_TASK_DATA):
        data.check_task_data(a.task_data)
    elif a.task_data != DEFAULT_TASK_DATA:
        notes.append(f"--task-data {a.task_data} is read by --task gsm8k only: ignored (--task {a.task} "
                     f"trains on --data)")
    if args.seeds is not None and not args.matrix:
        notes.append(f"--seeds {args.seeds} is read by --matrix only: this one run uses --seed {args.seed}")
    for note in notes:
        print(f"train.py: warning: {note}", file=sys.stderr)
    return notes
