"""Packing exactness, masks, budgets, determinism, split disjointness and bad-input errors."""
import json

import pytest
import torch

import data


def test_pack_boundaries_and_mask():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    eos = 0
    toks, valid = data.pack(docs, seq_len=4, n_seqs=2, eos_id=eos)
    stream = [10, 11, 12, 0, 20, 21, 0, 30, 31]
    assert toks.tolist() == [stream[0:5], stream[4:9]]
    # each stream token after the first is a target exactly once
    targets = toks[:, 1:].flatten().tolist()
    assert targets == stream[1:9]
    # invalid exactly where the input is EOS (target = first token of the next document)
    assert valid.tolist() == [[True, True, True, False], [True, True, False, True]]


def test_pack_budget_and_short_data():
    docs = [[1] * 100]
    toks, valid = data.pack(docs, seq_len=8, n_seqs=5, eos_id=0)
    assert toks.shape == (5, 9) and valid.shape == (5, 8)
    toks, _ = data.pack([[1, 2, 3]], seq_len=8, n_seqs=5, eos_id=0)
    assert toks.shape[0] == 0  # 4 tokens cannot fill one sequence of 8 + 1


def test_load_splits_deterministic_and_disjoint(tiny_dir, tiny_tok):
    kw = dict(data=str(tiny_dir / "corpus"), seq_len=16, tokens=512, eval_tokens=64, seed=3)
    a = data.load_splits(tiny_tok, **kw)
    b = data.load_splits(tiny_tok, **kw)
    assert torch.equal(a["train"].tokens, b["train"].tokens)
    assert a["train"].fingerprint == b["train"].fingerprint
    assert a["train"].sample_ids.tolist() == list(range(len(a["train"])))
    assert len(a["train"]) == 512 // 16
    c = data.load_splits(tiny_tok, **dict(kw, seed=4))
    assert not torch.equal(a["train"].tokens, c["train"].tokens)  # the seed orders documents
    # held-out documents never reach training, for any seed
    keys = {s: set() for s in ("train", "val", "test")}
    for key, _ in data.iter_documents(str(tiny_dir / "corpus"), seed=0):
        keys[data.split_of(key)].add(key)
    assert keys["val"] and keys["test"] and keys["train"]
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"])
    assert data.split_of("x.txt#0") == data.split_of("x.txt#5")  # chunks of one file share its split


def test_stdlib_corpus_exists_and_splits():
    docs = []
    for key, text in data.iter_documents(None, seed=0):
        docs.append((key, text))
        if len(docs) >= 400:
            break
    assert len(docs) == 400 and all(len(t) <= data.MAX_DOC_CHARS * 2 for _, t in docs)
    splits = {data.split_of(k) for k, _ in docs}
    assert splits == {"train", "val", "test"}


def test_tiktoken_twin_is_exact_or_absent(tiny_tok):
    texts = ["Hello world, it's 2024!  Tabs\tand  spaces\n\n  def f(x): return x**2", "naïve café ✓ 123456"]
    enc, backend = data.make_encoder(tiny_tok, "auto", texts)
    assert enc(texts) == tiny_tok(texts, add_special_tokens=False)["input_ids"]
    assert backend in ("tiktoken", "hf")
    hf, name = data.make_encoder(tiny_tok, "hf")
    assert name == "hf"


def test_jsonl_and_bad_inputs(tmp_path, tiny_tok):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(50)))
    sp = data.load_splits(tiny_tok, str(p), seq_len=16, tokens=160, eval_tokens=16)
    assert len(sp["train"]) == 10
    with pytest.raises(ValueError, match="--seq-len"):
        data.load_splits(tiny_tok, str(p), seq_len=1, tokens=160)
    with pytest.raises(ValueError, match="--tokens"):
        data.load_splits(tiny_tok, str(p), seq_len=16, tokens=8)
    with pytest.raises(FileNotFoundError, match="--data"):
        data.load_splits(tiny_tok, str(tmp_path / "missing.txt"), seq_len=16, tokens=160)
    with pytest.raises(ValueError, match="text_x"):
        data.load_splits(tiny_tok, str(p), seq_len=16, tokens=160, text_field="text_x")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="no training text"):
        data.load_splits(tiny_tok, str(empty), seq_len=16, tokens=160)


def test_gsm8k_prompt_masked(tmp_path, tiny_tok):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.\n#### {2 * i}"} for i in range(40)]
    sp = data.pack_gsm8k(rows, tiny_tok, seq_len=96)
    tr = sp["train"]
    assert len(tr) + len(sp["val"]) + len(sp["test"]) == 40
    for b in range(len(tr)):
        v = tr.valid[b]
        sup = tiny_tok.decode(tr.targets[b][v])
        assert "####" in sup and "Question" not in sup  # answer supervised, prompt masked
        assert int(tr.targets[b][v][-1]) == tiny_tok.eos_token_id  # the closing EOS is supervised
