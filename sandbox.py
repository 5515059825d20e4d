"""The sandbox: a near teacher-student pair, built offline on a CPU, where selection can be studied.

The tiny preset's student is SmolLM2 with 22 of its 30 layers cut: it starts near random (KL ~10 nats)
and every position teaches it something, so it cannot ask the paper's question (which positions still
teach a student that already knows most of them?). The sandbox builds a pair in the paper's regime,
from the Python standard library (present on every machine), with this project's own code:

    python sandbox.py                # build (or reuse) the pair under ~/.cache/nano-sekd/sandbox-v1 (~10 min)
    python train.py --preset sandbox --k 0.2                 # one SE-KD run on the pair (~50 s, suite acc included)
    python sandbox.py --study        # build, then study.py: Tables 2-4 and the budget sweeps, 5 seeds (~45 s a run)

What `build` does (each step skips if its output exists; outputs are written atomically):
  1. corpus: every stdlib .py file goes, by a hash of its path, to `pretrain` (60%), `kd` (35%) or
     `probe` (5%): the pair never pretrains on the text it is distilled and evaluated on;
  2. tokenizer: a byte-level BPE of --vocab tokens trained on `pretrain` with `tokenizers` (data.py
     serves it through an exact tiktoken twin);
  3. teacher and student: Qwen3-architecture models initialised from a seed, then CE-pretrained on
     `pretrain` by `train.py --lam 0` (plain CE, no teacher), the teacher for longer and bigger;
  4. probe.jsonl: LAMBADA-style last-word examples from the `probe` files (eval.score_lambada scores
     them; train.py --probe reports the accuracy).
Sizes and budgets are in SCALES; `--scale toy` builds a pair in seconds (the tests use it).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import common
import data

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "sandbox-v1"  # bump when SCALES or the recipe changes: a new directory, never a stale pair


def default_root():
    return os.path.join(os.path.expanduser(os.environ.get("NANO_SEKD_HOME", "~/.cache/nano-sekd")), VERSION)


# d: width, layers, heads (head_dim 32), ff: MLP width. Pretraining: tokens, lr; seq_len 128, batch 16.
SCALES = {
    "full": dict(vocab=4096, seq_len=128, batch_size=16,
                 teacher=dict(d=256, layers=6, heads=8, ff=768, tokens=900_000, lr=2e-3),
                 student=dict(d=128, layers=2, heads=4, ff=384, tokens=900_000, lr=3e-3),
                 probe_examples=300),
    "toy": dict(vocab=300, seq_len=32, batch_size=4,
                teacher=dict(d=32, layers=2, heads=2, ff=64, tokens=4_096, lr=3e-3),
                student=dict(d=16, layers=1, heads=1, ff=32, tokens=2_048, lr=3e-3),
                probe_examples=20, max_files=40),
}
PARTS = (("pretrain", 60), ("kd", 35), ("probe", 5))  # percent of stdlib files, by path hash


# -----------------------------------------------------------------------------
# 1. corpus: stdlib files -> pretrain / kd / probe .jsonl

def part_of(relpath):
    b = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100
    for name, pct in PARTS:
        if b < pct:
            return name
        b -= pct


def write_corpus(root, max_files=None):
    """{part: path of its .jsonl}, in sorted path order (deterministic). The parts are disjoint by file.
    pretrain and probe: one row per file. kd: one row per ~4,000-character chunk (data._chunks), so that
    data.py's row-level split and shuffle mix many files in the KD training stream and in its held-out
    split; with a row per file, the training tokens would come from a few dozen files, and held-out KL
    would rise under Full KD as the student drifted to them."""
    base, files = data.stdlib_files()
    rows = {name: [] for name, _ in PARTS}
    for p in files:
        rel = os.path.relpath(p, base)
        text, part = data._read_text(p), part_of(rel)
        docs = data._chunks(rel, text) if part == "kd" else [(rel, text)] if text.strip() else []
        rows[part] += [json.dumps({"id": key, "text": t}) for key, t in docs]
    paths = {}
    for name, lines in rows.items():
        lines = lines[:max_files] if max_files else lines  # toy scale: the first rows
        paths[name] = os.path.join(root, "corpus", f"{name}.jsonl")
        if not os.path.exists(paths[name]):
            os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
            common.atomic_write(paths[name], "".join(line + "\n" for line in lines))
    return paths


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# -----------------------------------------------------------------------------
# 2. tokenizer: byte-level BPE trained on the pretraining part

def train_tokenizer(texts, vocab_size):
    """A GPT-2-style byte-level BPE (no prefix space, GPT-2 regex: data.py's tiktoken twin is exact)."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(tmodels.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


# -----------------------------------------------------------------------------
# 3. models: a seeded Qwen3 init, then plain-CE pretraining by train.py --lam 0

def init_model(tok, d, layers, heads, ff, seed=0, max_len=1024, **_):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, head_dim=d // heads, intermediate_size=ff,
                      max_position_embeddings=max_len, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


def pretrain(init_dir, out_dir, corpus, spec, scale, log=print):
    """CE-pretrain init_dir on `corpus` with train.py --lam 0 (no teacher); returns out_dir/model."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--lam", "0", "--student", init_dir, "--data", corpus,
           "--seq-len", str(scale["seq_len"]), "--batch-size", str(scale["batch_size"]), "--grad-accum", "1",
           "--tokens", str(spec["tokens"]), "--eval-tokens", str(8 * scale["seq_len"] * scale["batch_size"]),
           "--lr", str(spec["lr"]), "--schedule", "cosine", "--warmup", "0.05", "--optim", "adamw",
           "--dtype", "fp32", "--k", "1.0", "--out-dir", out_dir, "--fresh", "--log-every", "50"]
    log("$ " + " ".join(cmd[1:]))
    t0 = time.time()
    res = subprocess.run(cmd, cwd=HERE)
    if res.returncode != 0:
        raise common.UserError(f"sandbox: pretraining {init_dir} failed (exit {res.returncode}); see above")
    log(f"pretrained {os.path.basename(out_dir)} in {time.time() - t0:.0f}s")
    return os.path.join(out_dir, "model")


# -----------------------------------------------------------------------------
# 4. probe: LAMBADA-style last words from held-out files

WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]{3,}")


def probe_examples(texts, n, context_chars=400):
    """Lines that end in ' word', the word (>= 4 chars, an identifier) seen in the preceding context: the
    model must carry it over a distance, as in LAMBADA. {"text": context + " " + word}, deterministic."""
    out = []
    for text in texts:
        pos = 0
        for line in text.splitlines(keepends=True):
            start, pos = pos, pos + len(line)
            body = line.rstrip()
            if " " not in body.strip():
                continue
            head, word = body.rsplit(" ", 1)
            ctx = text[max(0, start - context_chars):start] + head
            if WORD.fullmatch(word) and start >= 200 and re.search(rf"\b{re.escape(word)}\b", ctx):
                out.append({"text": ctx[ctx.find("\n") + 1:] + " " + word})
        if len(out) >= 4 * n:
            break
    step = max(1, len(out) // n)  # spread over the files, not the first few only
    return out[::step][:n]


# -----------------------------------------------------------------------------
# build: every step skips if done

def paths(root=None):
    root = root or default_root()
    return dict(root=root, teacher=os.path.join(root, "teacher"), student=os.path.join(root, "student"),
                kd=os.path.join(root, "corpus", "kd.jsonl"), probe=os.path.join(root, "probe.jsonl"))


def is_built(root=None):
    p = paths(root)
    return all(os.path.exists(os.path.join(p[m], "config.json")) for m in ("teacher", "student")) \
        and os.path.exists(p["probe"])


def build(root=None, scale="full", log=print):
    """Build the pair under `root` (default ~/.cache/nano-sekd/sandbox-v1); returns paths(root)."""
    p, sc, t0 = paths(root), SCALES[scale], time.time()
    os.makedirs(p["root"], exist_ok=True)
    corpus = write_corpus(p["root"], sc.get("max_files"))
    tok_dir = os.path.join(p["root"], "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tok = train_tokenizer(read_texts(corpus["pretrain"]), sc["vocab"])
        tok.save_pretrained(tok_dir + ".tmp")
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.replace(tok_dir + ".tmp", tok_dir)
        log(f"tokenizer: byte-level BPE of {len(tok)} tokens ({time.time() - t0:.0f}s)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    import models
    for role, seed in (("teacher", 1), ("student", 2)):
        if os.path.exists(os.path.join(p[role], "config.json")):
            continue
        init_dir = os.path.join(p["root"], f"init-{role}")
        if not os.path.exists(os.path.join(init_dir, "config.json")):
            models.save_model(init_model(tok, seed=seed, **sc[role]), tok, init_dir)
        model_dir = pretrain(init_dir, os.path.join(p["root"], f"pretrain-{role}"), corpus["pretrain"], sc[role],
                             sc, log)
        os.replace(model_dir, p[role])
        shutil.rmtree(init_dir)  # the seeded init is rebuilt exactly if ever needed
    if not os.path.exists(p["probe"]):
        rows = probe_examples(read_texts(corpus["probe"]), sc["probe_examples"])
        common.atomic_write(p["probe"], "".join(json.dumps(r) + "\n" for r in rows))
        log(f"probe: {len(rows)} last-word examples")
    log(f"sandbox ready in {p['root']} ({time.time() - t0:.0f}s)")
    return p


def main(argv=None):
    ap = common.ArgumentParser(prog="sandbox.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="where the pair is built (default ~/.cache/nano-sekd/sandbox-v1, "
                                   "or $NANO_SEKD_HOME/sandbox-v1)")
    ap.add_argument("--scale", choices=SCALES, default="full", help="toy: a pair in seconds, for tests")
    ap.add_argument("--study", action="store_true", help="then run Tables 2-4 and the budget sweeps (study.py)")
    ap.add_argument("--study-dir", default="out/sandbox", help="--study: where the runs and tables go")
    ap.add_argument("--matrices", help="--study: which matrices, comma-separated (default: study.py's)")
    ap.add_argument("--seeds", help="--study: seeds (default: the sandbox preset's 0-4)")
    args = ap.parse_args(argv)
    common.run_cli(lambda: build_then_study(args), "sandbox.py")


def build_then_study(args):
    root = args.root or default_root()
    if args.study and args.root:
        raise common.UserError("--study runs the preset's pair (the default --root); build it there")
    if os.path.exists(root) and not os.path.isdir(root):
        raise common.UserError(f"--root {root} is a file; give a directory")
    try:
        build(root, args.scale)
    except OSError as e:  # a read-only or full disk: the pair cannot be built there
        if not os.path.abspath(str(e.filename or root)).startswith(os.path.abspath(root)):
            raise
        raise common.UserError(f"--root {root}: cannot build the pair there ({e.strerror or e}: "
                               f"{e.filename or root})") from None
    if args.study:  # study.py's CLI: this module stays below config.py, which reads paths() and is_built()
        cmd = [sys.executable, os.path.join(HERE, "study.py"), "--out-dir", args.study_dir]
        cmd += (["--matrices", args.matrices] if args.matrices else []) + (["--seeds", args.seeds] if args.seeds else [])
        res = subprocess.run(cmd, cwd=HERE)
        if res.returncode != 0:
            raise common.UserError(f"--study: study.py failed (exit {res.returncode}); see above")


if __name__ == "__main__":
    main()
