"""Shared fixtures: tiny random HF models and a tiny byte-level BPE tokenizer, built offline."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

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
