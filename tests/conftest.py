"""Shared fixtures: tiny random HF models and a tiny byte-level BPE tokenizer, built offline."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# --dtype auto picks bf16 on a CPU with bf16 matrix units (system.auto_bf16): the tests' expected numbers
# are fp32 ones on every machine, so they pin it (subprocesses inherit it); tests of auto unset it
os.environ["NANO_SEKD_CPU_DTYPE"] = "fp32"

TEXT = ("The quick brown fox jumps over the lazy dog. Knowledge distillation trains a small student "
        "to match a large teacher. Selective distillation supervises only the most useful positions, "
        "chosen by the student's entropy. def add(a, b):\n    return a + b\n") * 3


def make_tokenizer(vocab_size=300):
    """A byte-level BPE tokenizer trained in memory on TEXT (no download), with EOS/BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<s>",
                                   pad_token="<|endoftext|>")


def make_model(tok, layers=4, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny teacher (4 layers) + tokenizer + a local .txt corpus: what train.py needs offline."""
    d = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    model = make_model(tok)
    with torch.no_grad():  # a peaked teacher (random init is near-uniform): KL to it is worth learning
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(d / "teacher")
    tok.save_pretrained(d / "teacher")
    corpus = d / "corpus"
    corpus.mkdir()
    words = TEXT.split()
    g = torch.Generator().manual_seed(0)
    for i in range(100):  # 100 small documents of shuffled words
        idx = torch.randint(0, len(words), (120,), generator=g).tolist()
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    return d


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir / "teacher")


def train_args(tiny_dir, out, *extra):
    """The flags of a tiny, fast train.py run on the fixture models and corpus."""
    return ["--teacher", str(tiny_dir / "teacher"), "--student-layers", "0,3", "--data", str(tiny_dir / "corpus"),
            "--seq-len", "32", "--tokens", "1024", "--eval-tokens", "256", "--batch-size", "4", "--lr", "3e-3",
            "--out-dir", str(out), "--log-every", "1", "--entropy-chunk", "16", "--no-save-model", *extra]


def killed_run(argv, fn, n, env=None):
    """`train.main(argv)` in a subprocess that dies like kill -9 (os._exit(17), no cleanup) when train.<fn>
    is called the n-th time: e.g. ("save_checkpoint", 4) kills after step 4, before its checkpoint;
    ("train", 1) kills after "before:", as the loop starts. The hook is the test's, not the trainer's."""
    code = (f"import os, sys, train\nreal, calls = train.{fn}, []\n"
            f"def hooked(*a, **k):\n    calls.append(1)\n    if len(calls) == {n}:\n"
            f"        sys.stdout.flush()\n        os._exit(17)\n"
            f"    return real(*a, **k)\ntrain.{fn} = hooked\ntrain.main({[str(a) for a in argv]!r})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, **(env or {})))


def make_qwen3(tok, layers, hidden=32, seed=0, vocab_size=None):
    """A tiny Qwen3-architecture causal LM; vocab_size (the head's rows) defaults to len(tok) + 1 padded
    up to a multiple of 64, like Qwen's 151,936 rows for 151,669 tokens."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size or -(-(len(tok) + 1) // 64) * 64, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg)


@pytest.fixture(scope="session")
def qwen_pair(tmp_path_factory):
    """The real user's path on CPU stand-ins: a saved tiny Qwen3 teacher (4 layers) and student (2 layers,
    its own random init), one byte-level BPE tokenizer saved with each, the head padded past the tokenizer
    (config.vocab_size = padded_vocab > vocab = len(tok)), and a data dir with one file of each kind.

    Returns a dict: teacher, student (dirs), vocab, padded_vocab, data (dir), txt, jsonl, parquet (files,
    each enough for `train.py --teacher T --student S --data FILE --seq-len 32 --tokens 1024
    --eval-tokens 64 --dtype bf16`: every file holds >= 3 documents, so it has val and test text).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path_factory.mktemp("qwen")
    tok = make_tokenizer()
    padded = -(-(len(tok) + 1) // 64) * 64  # 300 tokens -> 320 rows
    for name, layers, seed, gain in (("teacher", 4, 0, 40.0), ("student", 2, 1, 1.0)):
        model = make_qwen3(tok, layers, seed=seed, vocab_size=padded)
        with torch.no_grad():  # a peaked teacher: random init is near-uniform
            model.lm_head.weight.mul_(gain)
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    words = TEXT.split()
    g = torch.Generator().manual_seed(0)

    def doc(n_words):
        idx = torch.randint(0, len(words), (n_words,), generator=g).tolist()
        return " ".join(words[j] for j in idx)

    data_dir = d / "data"
    data_dir.mkdir()
    # .txt: ~40 chunks of ~MAX_DOC_CHARS (data.py cuts at line boundaries), so one file splits per chunk
    (data_dir / "corpus.txt").write_text("".join(doc(12) + "\n" for _ in range(40 * 60)))
    docs = [doc(150) for _ in range(60)]
    (data_dir / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), data_dir / "corpus.parquet")
    return {"teacher": d / "teacher", "student": d / "student", "vocab": len(tok),
            "padded_vocab": padded, "data": data_dir,
            **{kind: data_dir / f"corpus.{kind}" for kind in ("txt", "jsonl", "parquet")}}
