"""The prepared GPU check: SE-KD and SE-KD_3X through train.py on the paper's code path, bf16,
at the paper's widths and reduced depth, on random-init models built on the machine; then
bench/selective_head.py's shape c (the real Qwen3-1.7B / 8B shapes).

    OUT=/some/dir bash bench/gpu_check.sh          # one GPU, about 6 minutes (entry point; see there)
    bash bench/gpu_check.sh --cpu-smoke            # the same script end to end at tiny widths on CPU

What it builds (deterministically, in a scratch dir, never under $OUT):
  - a byte-level BPE tokenizer trained with `tokenizers` on the Python standard library's source (the
    corpus data.py uses by default). The stdlib saturates BPE at about 65k merges, so the vocabulary is
    filled with unreachable reserved pieces up to Qwen3's tokenizer length 151,669: train.py's softmax
    width V = len(tokenizer) is then the paper's, although the data uses only the trained ~65k ids;
  - a random-init Qwen3-architecture teacher of Qwen3-8B's widths (hidden 4096, 32/8 heads, head_dim
    128, FFN 12288, untied head) and student of Qwen3-1.7B's (hidden 2048, 16/8 heads, head_dim 128,
    FFN 6144, tied head), 4 and 2 layers, config vocab_size 151,936 (padded past the tokenizer, as
    Qwen's), bf16, saved with save_pretrained.
What it runs and measures (train.py --preset paper, the local models, --data stdlib, 512-token
sequences, batch 2 x 8, lr 1e-5, --dtype bf16, teacher and student on cuda:0):
  - SE-KD  (--pos-metric student_entropy --k 0.2) and SE-KD_3X (--k 0.2 --sample-metric student_entropy
    --sample-frac 0.2 --rs-u 64 --cache-dir DIR), --max-steps N each;
  - from each run: median step time (metrics.jsonl dt, first step excluded), tokens/s, peak memory,
    the wall-time split, held-out loss and KL before/after (SE-KD_3X reports the cache's RS-KD estimate
    kl_rs_estimate, not the true KL), and the fraction of the student's weight entries that changed
    (saved model vs the initial student; "live" excludes embedding/head rows past the tokenizer, which
    no gradient reaches; also counted after rounding to bf16 and for the RMSNorm weights alone);
  - bench/selective_head.py --shapes c --quick (Table 16 at the real shapes) with what time is left.
Writes $OUT/gpu_check.json (every number), $OUT/gpu_check.txt (the compact summary, also printed) and
one log per stage; at most 7 files. Each stage has a timeout inside an overall --budget-s.
No package is installed and none is required beyond torch, transformers, tokenizers and safetensors:
tiktoken, datasets, gguf and bitsandbytes are optional (--optim adam8bit only when bitsandbytes runs).
"""
import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, tie_word_embeddings=False)
QWEN3_1_7B = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=6144, tie_word_embeddings=True)
# mode -> shapes, vocabulary and run sizes
MODES = {
    "gpu": dict(teacher=dict(QWEN3_8B, num_hidden_layers=4), student=dict(QWEN3_1_7B, num_hidden_layers=2),
                bpe_vocab=151_669, tok_len=151_669, padded_vocab=151_936, corpus_files=None, seq_len=512, batch_size=2,
                grad_accum=8, steps=30, eval_tokens=16_384, budget_s=450, device="cuda"),
    "cpu_smoke": dict(teacher=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   intermediate_size=192, tie_word_embeddings=False, num_hidden_layers=4),
                      student=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   intermediate_size=96, tie_word_embeddings=True, num_hidden_layers=2),
                      bpe_vocab=900, tok_len=1024, padded_vocab=1088, corpus_files=60, seq_len=64, batch_size=2,
                      grad_accum=2, steps=4, eval_tokens=512, budget_s=170, device="cpu"),
}
EOS = "<|endoftext|>"
OFFLINE_ENV = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="true")


def log(*a):
    print(*a, flush=True)


# -----------------------------------------------------------------------------
# building: tokenizer and random-init Qwen3-architecture teacher / student

def corpus_texts(max_files=None):
    """The stdlib source files (data.py's default corpus), in a fixed order."""
    import data
    _, files = data.stdlib_files()
    files = files[:max_files] if max_files else files
    return [data._read_text(p) for p in files]


def build_tokenizer(texts, tok_len, bpe_vocab=None):
    """A byte-level BPE (GPT-2 pre-tokenizer, EOS '<|endoftext|>' = id 0) trained on `texts` up to bpe_vocab
    (default tok_len) tokens; when the corpus saturates BPE earlier, the vocabulary is filled with reserved
    pieces (never produced by any merge, so never in the data) up to exactly tok_len, like Qwen's unused
    ids. Returns (tokenizer, trained vocabulary size)."""
    if sum(len(t) for t in texts) < 10_000:
        raise RuntimeError("build_tokenizer: under 10k characters of text (is the stdlib source missing?)")
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(bpe_vocab or tok_len, tok_len), special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    trained = tk.get_vocab_size()
    if trained < tok_len:
        spec = json.loads(tk.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(tok_len - trained):
            vocab[f"<|reserved_{i}|>"] = trained + i
        tk = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS)
    tok.model_max_length = 1 << 20  # no length warnings while packing long documents
    assert len(tok) == tok_len, (len(tok), tok_len)
    return tok, trained


def qwen3_config(shape, tok, padded_vocab):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=padded_vocab, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **shape)


def random_model(cfg, seed, device, dtype=torch.bfloat16):
    """A random-init Qwen3ForCausalLM built directly on `device` in `dtype` (seeded: same weights every run
    on the same device type)."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


def build_models(work, mode, device=None, seed=0, texts=None):
    """Tokenizer + teacher (seed) + student (seed + 1) saved with save_pretrained under `work`.
    Returns a dict: teacher, student (dirs), tok_len, trained_vocab, padded_vocab, params, build_s."""
    spec = MODES[mode] if isinstance(mode, str) else mode
    device = device or spec["device"]
    t0 = time.time()
    texts = corpus_texts(spec["corpus_files"]) if texts is None else texts
    tok, trained = build_tokenizer(texts, spec["tok_len"], spec.get("bpe_vocab"))
    t_tok = time.time() - t0
    out = dict(tok_len=len(tok), trained_vocab=trained, padded_vocab=spec["padded_vocab"], tokenizer_s=t_tok,
               params={})
    for i, name in enumerate(("teacher", "student")):
        cfg = qwen3_config(spec[name], tok, spec["padded_vocab"])
        try:
            model = random_model(cfg, seed + i, device)
        except Exception as e:  # noqa: BLE001 (building under a cuda device context failed: build on the CPU)
            if torch.device(device).type == "cpu":
                raise
            log(f"[build] {name} on {device} failed ({type(e).__name__}: {e}); building it on the CPU")
            out.setdefault("built_on_cpu", []).append(name)
            model = random_model(cfg, seed + i, "cpu")
        d = os.path.join(work, name)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
        out["params"][name] = sum(p.numel() for p in model.parameters())
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    out["build_s"] = time.time() - t0
    return out


# -----------------------------------------------------------------------------
# measuring: weights changed, run summaries

def _tensors(model_dir):
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors file")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)


def weights_changed(init_dir, trained_dir, vocab):
    """Fraction of the student's weight entries that differ between the initial and the trained model.
    live: all entries except embedding / LM-head rows >= vocab (past the tokenizer: no gradient reaches
    them). bf16: the trained weights rounded to bf16 (what a bf16 copy of the model would see)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the embedding alone has 311M entries at GPU size
    init = dict(_tensors(init_dir))
    c = dict(all=[0, 0], live=[0, 0], live_bf16=[0, 0], norm=[0, 0])
    missing = []
    for k, new in _tensors(trained_dir):
        old = init.get(k)
        if old is None or old.shape != new.shape:
            missing.append(k)
            continue
        new, old = new.to(dev), old.to(dev)
        diff = new.float() != old.float()
        diff16 = new.to(torch.bfloat16) != old.to(torch.bfloat16)
        del new, old
        c["all"][0] += int(diff.sum())
        c["all"][1] += diff.numel()
        if ("embed_tokens" in k or "lm_head" in k) and diff.dim() == 2:
            diff, diff16 = diff[:vocab], diff16[:vocab]
        c["live"][0] += int(diff.sum())
        c["live"][1] += diff.numel()
        c["live_bf16"][0] += int(diff16.sum())
        c["live_bf16"][1] += diff16.numel()
        if k.endswith("norm.weight"):
            c["norm"][0] += int(diff.sum())
            c["norm"][1] += diff.numel()
    out = {f"{name}_frac": n / max(d, 1) for name, (n, d) in c.items()}
    out.update(entries=c["all"][1], live_entries=c["live"][1], unmatched_tensors=missing)
    return out


def read_run(out_dir):
    """Numbers of one finished train.py run: summary.json + metrics.jsonl."""
    s = json.load(open(os.path.join(out_dir, "summary.json")))
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    timed = rows[1:] or rows  # the first step pays for allocator warm-up and kernel selection
    before, after = s.get("student_before") or {}, s.get("student_after") or {}
    kl = "kl_to_teacher" if "kl_to_teacher" in after else "kl_rs_estimate"
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    return dict(
        steps=s.get("steps"), global_batch_seqs=s.get("global_batch_seqs"), tokens_seen=s.get("tokens_seen"),
        step_s_median=statistics.median(r["dt"] for r in timed), step_s_first=rows[0]["dt"] if rows else None,
        tok_s_median=statistics.median(r["tok_s"] for r in timed), peak_mem_bytes=s.get("peak_mem_bytes"),
        wall_time_s=s.get("wall_time_s"), wall_time_split=s.get("wall_time_split"),
        sup_frac_positions=s.get("sup_frac_positions"), sup_frac_samples=s.get("sup_frac_samples"),
        teacher_loaded=s.get("teacher_loaded"), cache_bytes=s.get("cache_bytes"), kl_name=kl,
        kl_before=before.get(kl), kl_after=after.get(kl), loss_before=before.get("loss"),
        loss_after=after.get("loss"), teacher_loss=s.get("teacher_val_loss"), eval_tokens=s.get("eval_tokens"),
        loss_first=rows[0]["loss"] if rows else None, loss_last=rows[-1]["loss"] if rows else None,
        precision=cfg.get("precision"), devices=cfg.get("devices"), optim=cfg.get("optim"))


# -----------------------------------------------------------------------------
# stages

def run_stage(name, cmd, log_path, timeout, env_extra=None):
    """Run cmd (list) with stdout+stderr to log_path and a timeout; returns dict(rc, wall_s, timed_out)."""
    env = dict(os.environ, **OFFLINE_ENV, **(env_extra or {}))
    t0 = time.time()
    log(f"[{name}] {' '.join(cmd)}  (timeout {timeout:.0f}s, log {os.path.basename(log_path)})")
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=max(timeout, 1))
            rc, to = p.returncode, False
        except subprocess.TimeoutExpired:
            rc, to = None, True
    wall = time.time() - t0
    tail = open(log_path, errors="replace").read().strip().splitlines()[-3:]
    log(f"[{name}] rc {rc}{' (TIMED OUT)' if to else ''} in {wall:.0f}s" + ("" if rc == 0 else "; last lines:\n    "
                                                                              + "\n    ".join(tail)))
    return dict(rc=rc, wall_s=wall, timed_out=to)


def pick_optim(device):
    """adam8bit (the paper's) when bitsandbytes imports and runs one Adam8bit step on this GPU, else adamw."""
    if torch.device(device).type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        return "adamw", "bitsandbytes not installed" if torch.device(device).type == "cuda" else "cpu"
    try:
        import bitsandbytes as bnb
        p = torch.nn.Parameter(torch.randn(64, 128, device=device))
        opt = bnb.optim.Adam8bit([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        torch.cuda.synchronize()
        return "adam8bit", f"bitsandbytes {getattr(bnb, '__version__', '?')} ran an Adam8bit step"
    except Exception as e:  # noqa: BLE001 (a broken install: any error means use AdamW)
        return "adamw", f"bitsandbytes failed: {type(e).__name__}: {str(e)[:120]}"


def train_flags(spec, built, work, optim, device):
    tokens = spec["steps"] * spec["batch_size"] * spec["grad_accum"] * spec["seq_len"]
    common = ["--preset", "paper", "--teacher", built["teacher"], "--student", built["student"], "--data", "stdlib",
              "--seq-len", str(spec["seq_len"]), "--batch-size", str(spec["batch_size"]),
              "--grad-accum", str(spec["grad_accum"]), "--lr", "1e-5", "--dtype", "bf16", "--optim", optim,
              "--max-steps", str(spec["steps"]), "--eval-tokens", str(spec["eval_tokens"]),
              "--teacher-device", device, "--student-device", device, "--log-every", "5", "--seed", "0"]
    return {
        "se_kd": common + ["--pos-metric", "student_entropy", "--k", "0.2", "--tokens", str(tokens),
                           "--out-dir", os.path.join(work, "runs", "se_kd")],
        # TopSmp keeps 20% of the sequences: 5x the token budget gives one epoch of --max-steps steps
        "se_kd_3x": common + ["--pos-metric", "student_entropy", "--k", "0.2", "--sample-metric", "student_entropy",
                              "--sample-frac", "0.2", "--rs-u", "64", "--cache-dir", os.path.join(work, "cache"),
                              "--tokens", str(5 * tokens), "--out-dir", os.path.join(work, "runs", "se_kd_3x")],
    }


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2 ** 30:.2f} GiB"


def summary_text(res):
    m, b = res["machine"], res.get("build") or {}
    lines = [f"GPU check ({res['mode']}, {res['finished_at']}): {m.get('gpu') or 'CPU'}; torch {m['torch']}, "
             f"transformers {m['transformers']}, Python {m['python']}; total {res['total_s']:.0f}s",
             f"models: random-init Qwen3 arch, teacher {b.get('teacher_shape')} ({b.get('params', {}).get('teacher', 0) / 1e6:,.1f}M), "
             f"student {b.get('student_shape')} ({b.get('params', {}).get('student', 0) / 1e6:,.1f}M), bf16; "
             f"tokenizer {b.get('tok_len')} ids ({b.get('trained_vocab')} trained on the stdlib), config vocab "
             f"{b.get('padded_vocab')}; built in {b.get('build_s', 0):.0f}s",
             f"train.py --preset paper, {res['run_shape']}, lr 1e-5, --dtype bf16, --optim {res['optim']} "
             f"({res['optim_why']}), teacher+student on {res['device']}",
             "| run | status | step s (median) | tok/s | peak mem | weights changed (live / bf16 / norms) | "
             "held-out loss before -> after | KL before -> after | wall s (load/score/cache/train/eval) |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for name in ("se_kd", "se_kd_3x"):
        r = res["runs"].get(name, {})
        st = "ok" if r.get("rc") == 0 else ("TIMEOUT" if r.get("timed_out") else f"FAILED rc {r.get('rc')}")
        n, w = r.get("numbers"), r.get("weights_changed") or {}
        if not n:
            lines.append(f"| {name} | {st} | - | - | - | - | - | - | {r.get('wall_s', 0):.0f} |")
            continue
        pk = (n.get("peak_mem_bytes") or {}).get("student")
        ws = n.get("wall_time_split") or {}
        split = "/".join(f"{ws.get(k, 0):.0f}" for k in ("load_s", "scoring_s", "cache_s", "train_s", "eval_s"))
        kl = "KL" if n["kl_name"] == "kl_to_teacher" else "RS-KD est. KL"
        lines.append(
            f"| {name} | {st} | {n['step_s_median']:.3f} | {n['tok_s_median']:.0f} | {fmt_bytes(pk)} | "
            f"{w.get('live_frac', float('nan')):.1%} / {w.get('live_bf16_frac', float('nan')):.1%} / "
            f"{w.get('norm_frac', float('nan')):.1%} | {n['loss_before']:.5f} -> {n['loss_after']:.5f} | "
            f"{kl} {n['kl_before']:.5f} -> {n['kl_after']:.5f} ({n['kl_after'] - n['kl_before']:+.2e}) | "
            f"{n['wall_time_s']:.0f} ({split}) |")
    sh = res.get("selective_head") or {}
    if sh.get("ratios"):
        r = sh["ratios"]
        lines.append(f"selective_head.py shape c (B={sh.get('B')}, T={sh.get('T')}, k=0.2): student peak memory "
                     f"k20_selective/default {r.get('student_peak_mem', float('nan')):.3f} (paper 0.72), step time "
                     f"{r.get('step_time', float('nan')):.3f} (paper 0.735), head logit memory / ideal "
                     f"{r.get('logit_mem', float('nan')):.3f} (<= 1.1)")
    else:
        lines.append(f"selective_head.py shape c: {sh.get('status', 'not run')}")
    return "\n".join(lines)


def machine_info():
    import transformers
    try:
        import common
        git = common.git_hash()
    except Exception:  # noqa: BLE001 (the tree may travel without .git)
        git = None
    return dict(git=git, python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                cuda=torch.version.cuda, cpu_count=os.cpu_count(),
                optional={m: importlib.util.find_spec(m) is not None
                          for m in ("tiktoken", "datasets", "gguf", "bitsandbytes", "accelerate")})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny widths on CPU: the same stages end to end")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_check"),
                   help="where the files that come back go (default $OUT, else out/gpu_check)")
    p.add_argument("--work", help="scratch dir for models, runs, cache (default: a new temp dir, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch dir")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 30 on GPU, 4 in the smoke)")
    p.add_argument("--budget-s", type=float, help="overall time budget; stages get what is left (default 450 / 170)")
    p.add_argument("--skip-selective-head", action="store_true")
    a = p.parse_args(argv)
    mode = "cpu_smoke" if a.cpu_smoke else "gpu"
    spec = dict(MODES[mode])
    spec["steps"] = a.steps or spec["steps"]
    budget = a.budget_s or spec["budget_s"]
    t_start = time.time()
    left = lambda: budget - (time.time() - t_start)  # noqa: E731
    device = spec["device"]
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU; run with --cpu-smoke on a CPU machine")
    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="sekd_gpu_check_")
    os.makedirs(work, exist_ok=True)
    res = dict(mode=mode, machine=machine_info(), device=f"{device}:0" if device == "cuda" else device, work=work,
               run_shape=f"{spec['seq_len']}-token sequences, batch {spec['batch_size']} x {spec['grad_accum']}, "
                         f"{spec['steps']} steps", runs={}, status="running")
    dev = res["device"]
    out_json = os.path.join(a.out, "gpu_check.json")

    def save():
        res["total_s"] = time.time() - t_start
        res["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(out_json + ".tmp", "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(out_json + ".tmp", out_json)

    log(f"gpu_check {mode}: {json.dumps(res['machine'])}\nscratch {work}, out {a.out}, budget {budget:.0f}s")
    try:
        # 1. build
        built = build_models(work, spec, device)
        built["teacher_shape"] = "{num_hidden_layers}L d{hidden_size} h{num_attention_heads}/{num_key_value_heads} " \
                                 "hd{head_dim} ffn{intermediate_size}".format(**spec["teacher"])
        built["student_shape"] = "{num_hidden_layers}L d{hidden_size} h{num_attention_heads}/{num_key_value_heads} " \
                                 "hd{head_dim} ffn{intermediate_size}".format(**spec["student"])
        res["build"] = built
        log(f"[build] tokenizer {built['tok_len']} ids ({built['trained_vocab']} trained) in {built['tokenizer_s']:.0f}s; "
            f"teacher {built['params']['teacher'] / 1e6:.1f}M, student {built['params']['student'] / 1e6:.1f}M params; "
            f"{built['build_s']:.0f}s")
        save()
        res["optim"], res["optim_why"] = pick_optim(dev)
        log(f"[optim] {res['optim']}: {res['optim_why']}")
        if device == "cuda":
            torch.cuda.empty_cache()
        # 2. the two train.py runs
        flags = train_flags(spec, built, work, res["optim"], dev)
        reserve = 0 if a.skip_selective_head else (150 if mode == "gpu" else 30)  # kept for selective_head.py
        for name in ("se_kd", "se_kd_3x"):  # SE-KD may take 45% of what is left, SE-KD_3X (+ cache) the rest
            timeout = max(left() - reserve, 30) * (0.45 if name == "se_kd" else 1.0)
            timeout = min(timeout, left() - 5)
            r = run_stage(name, [sys.executable, "train.py", *flags[name]], os.path.join(a.out, f"{name}.log"), timeout)
            if r["rc"] not in (0, None) and res["optim"] == "adam8bit" and left() - reserve > 60:
                log(f"[{name}] failed with --optim adam8bit: retrying with adamw (log {name}.log is overwritten; "
                    f"the first attempt's rc is kept in gpu_check.json)")
                res["optim"], res["optim_why"] = "adamw", f"adam8bit run failed (rc {r['rc']})"
                flags = train_flags(spec, built, work, "adamw", dev)
                shutil.rmtree(flags[name][flags[name].index("--out-dir") + 1], ignore_errors=True)
                first = r
                r = run_stage(name, [sys.executable, "train.py", *flags[name]], os.path.join(a.out, f"{name}.log"),
                              max(left() - reserve, 30))
                r["adam8bit_attempt"] = first
            run_dir = flags[name][flags[name].index("--out-dir") + 1]
            r["command"] = "python train.py " + " ".join(flags[name])
            if r["rc"] == 0:
                try:
                    r["numbers"] = read_run(run_dir)
                    r["weights_changed"] = weights_changed(built["student"], os.path.join(run_dir, "model"),
                                                           built["tok_len"])
                except Exception as e:  # noqa: BLE001 (record it, keep going: the other stages still count)
                    r["read_error"] = f"{type(e).__name__}: {e}"
            res["runs"][name] = r
            save()
        # 3. selective_head.py shape c (skipped cleanly on CPU by the script itself)
        if a.skip_selective_head:
            res["selective_head"] = dict(status="skipped (--skip-selective-head)")
        elif left() < 45:
            res["selective_head"] = dict(status=f"not run: {left():.0f}s left of the budget")
        else:
            sh_json = os.path.join(a.out, "selective_head.json")
            cmd = [sys.executable, "bench/selective_head.py", "--shapes", "c", "--quick", "--device", device,
                   "--out", sh_json]
            r = run_stage("selective_head", cmd, os.path.join(a.out, "selective_head.log"), left() - 5)
            r["command"] = "python " + " ".join(cmd[1:])
            try:
                c = json.load(open(sh_json))["results"][0]
                r.update({k: c.get(k) for k in ("B", "T", "reps", "chunk", "model", "skipped", "ratios")})
                r["status"] = f"skipped: {c['skipped']}" if c.get("skipped") else ("ok" if r["rc"] == 0 else "failed")
            except (OSError, ValueError, KeyError, IndexError):
                r["status"] = "TIMEOUT" if r["timed_out"] else f"failed (rc {r['rc']}), see selective_head.log"
            res["selective_head"] = r
        ok = all(res["runs"].get(n, {}).get("numbers") for n in ("se_kd", "se_kd_3x"))
        res["status"] = "ok" if ok else "failed"
    except Exception as e:  # noqa: BLE001 (the json must still come back)
        import traceback
        traceback.print_exc()
        res["status"] = f"error: {type(e).__name__}: {e}"
    finally:
        save()
        if not a.keep_work and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    text = summary_text(res) + f"\nstatus: {res['status']}"
    with open(os.path.join(a.out, "gpu_check.txt"), "w") as f:
        f.write(text + "\n")
    log("\n" + text)
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
