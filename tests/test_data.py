"""Packing exactness, masks, budgets, determinism, split disjointness and bad-input errors."""
import json
import os

import pytest
import torch

import data
from common import UserError


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
    for key, _, split in data.iter_documents(str(tiny_dir / "corpus"), seed=0):
        keys[split].add(key)
    assert keys["val"] and keys["test"] and keys["train"]
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"])
    assert data.split_of("x.txt#0") == data.split_of("x.txt#5")  # chunks of one file share its split


def test_stdlib_corpus_exists_and_splits():
    docs = []
    for key, text, split in data.iter_documents(None, seed=0):
        docs.append((key, text, split))
        if len(docs) >= 400:
            break
    assert len(docs) == 400 and all(len(t) <= data.MAX_DOC_CHARS * 2 for _, t, _ in docs)
    assert {s for _, _, s in docs} == {"train", "val", "test"}


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
    with pytest.raises(UserError, match="--seq-len"):
        data.load_splits(tiny_tok, str(p), seq_len=1, tokens=160)
    with pytest.raises(UserError, match="--tokens"):
        data.load_splits(tiny_tok, str(p), seq_len=16, tokens=8)
    with pytest.raises(UserError, match="--data .*missing.txt: no such file"):
        data.load_splits(tiny_tok, str(tmp_path / "missing.txt"), seq_len=16, tokens=160)
    with pytest.raises(UserError, match="text_x.*--text-field"):
        data.load_splits(tiny_tok, str(p), seq_len=16, tokens=160, text_field="text_x")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="train split is empty: no text in the source"):
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


# -----------------------------------------------------------------------------
# one local file has a held-out split; a held-out-only load; rows whose text is not a string

@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_single_file_has_heldout_split(qwen_pair, tiny_tok, kind):
    path = str(qwen_pair[kind])
    sp = data.load_splits(tiny_tok, path, seq_len=32, tokens=1024, eval_tokens=64)
    assert len(sp["train"]) == 32 and len(sp["val"]) == 2 and len(sp["test"]) == 2
    keys = {s: set() for s in ("train", "val", "test")}
    for key, _, split in data.iter_documents(path, seed=0):
        keys[split].add(key)
    assert keys["val"] and keys["test"] and not (keys["train"] & (keys["val"] | keys["test"]))
    for split in ("val", "test"):  # held-out sequences hold none of the training sequences' text
        train_rows = {tuple(r) for r in sp["train"].tokens[:, :-1].tolist()}
        assert not train_rows & {tuple(r) for r in sp[split].tokens[:, :-1].tolist()}


def test_txt_chunks_split_one_by_one(qwen_pair):
    splits = {}
    for key, _, split in data.iter_documents(str(qwen_pair["txt"]), seed=0):
        assert key.startswith("corpus.txt#")
        splits[key] = split
    assert len(splits) >= 30 and set(splits.values()) == {"train", "val", "test"}
    assert data.file_splits(["a"]) == {"a": data.split_of("a")}  # one document: the hash alone decides


def test_default_corpus_split_is_still_per_file():
    """The stdlib corpus keeps its per-file split (the README's numbers rest on it): every chunk's split
    is the per-file rule's, sha256 of the file's relative path mod 100 (< 3 val, < 6 test)."""
    def old(key):
        b = int(__import__("hashlib").sha256(key.split("#", 1)[0].encode()).hexdigest()[:8], 16) % 100
        return "val" if b < 3 else "test" if b < 6 else "train"
    n = {"train": 0, "val": 0, "test": 0}
    for key, _, split in data.iter_documents(None, seed=0):
        assert split == old(key), key
        n[split] += 1
    assert n["val"] > 10 and n["test"] > 10


def test_empty_heldout_split_is_a_clear_error(tmp_path, tiny_tok):
    one = tmp_path / "one.txt"  # one short document: it cannot be both trained on and held out
    one.write_text("a single short document about the quick brown fox, " * 40)
    with pytest.raises(UserError, match=r"--data .*one.txt: the (val|test) split is empty: none of its 1 "):
        data.load_splits(tiny_tok, str(one), seq_len=16, tokens=160, eval_tokens=16)
    sp = data.load_splits(tiny_tok, str(one), seq_len=16, tokens=160, splits=("train",))
    assert list(sp) == ["train"] and len(sp["train"]) > 0  # nothing held out asked, nothing missing
    with pytest.raises(UserError, match="--eval-tokens"):
        data.load_splits(tiny_tok, str(one), seq_len=16, tokens=160, eval_tokens=8)


def test_heldout_only_never_tokenizes_the_training_budget(qwen_pair, tiny_tok, monkeypatch):
    path = str(qwen_pair["jsonl"])
    full = data.load_splits(tiny_tok, path, seq_len=32, tokens=1024, eval_tokens=64)
    held = {t for _, t, s in data.iter_documents(path) if s != "train"}
    encoded = []
    make = data.make_encoder

    def spy(*a, **k):
        enc, name = make(*a, **k)
        return (lambda texts: encoded.extend(texts) or enc(texts)), name
    monkeypatch.setattr(data, "make_encoder", spy)
    only = data.load_splits(tiny_tok, path, seq_len=32, tokens=10 ** 12, eval_tokens=64,
                            splits=("val", "test"))
    assert sorted(only) == ["test", "val"]
    for s in ("val", "test"):
        assert torch.equal(only[s].tokens, full[s].tokens) and only[s].fingerprint == full[s].fingerprint
    assert encoded and set(encoded) <= held  # not one training document was tokenized


def test_non_string_text_is_skipped_and_counted(tmp_path, tiny_tok, capsys):
    good = [{"text": f"document number {i} is plain text. " * 20} for i in range(40)]
    bad = [{"text": None}, {"text": 123}, {"text": ["a", "b"]}, {"text": 1.5}]
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in bad[:2] + good + bad[2:]))
    texts = [t for _, t, _ in data.iter_documents(str(p))]
    assert len(texts) == 40 and not {"None", "123", "['a', 'b']", "1.5"} & set(texts)
    stats = {}
    data.load_splits(tiny_tok, str(p), seq_len=16, tokens=160, eval_tokens=16, stats=stats)
    assert stats["skipped"] == {"null": 1, "int": 1, "list": 1, "float": 1}
    assert "skipped 4 rows whose 'text' is not a string" in capsys.readouterr().err
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(UserError, match="no text in the source .4 rows skipped"):
        data.load_splits(tiny_tok, str(only_bad), seq_len=16, tokens=160)


def test_bad_parquet_and_empty_sources_are_one_line_errors(tmp_path, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": ["some text"] * 5, "n": [None, 1, 2, 3, 4]}), p)
    with pytest.raises(UserError, match=r"--data .*rows.parquet: no column 'text' \(columns: content, n\); "
                                        r"set --text-field"):
        data.load_splits(tiny_tok, str(p), seq_len=16, tokens=160)
    stats = {}
    with pytest.raises(UserError, match="no text in the source .5 rows skipped"):  # a numeric column
        data.load_splits(tiny_tok, str(p), seq_len=16, tokens=160, text_field="n", stats=stats)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(UserError, match="broken.parquet: not a readable .parquet file"):
        data.load_splits(tiny_tok, str(bad), seq_len=16, tokens=160)
    d = tmp_path / "nodata"
    d.mkdir()
    (d / "notes.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="nodata: the directory holds no .txt, .jsonl or .parquet file"):
        data.load_splits(tiny_tok, str(d), seq_len=16, tokens=160)
    with pytest.raises(UserError, match=r"\*.jsonl: matches no file"):
        data.load_splits(tiny_tok, os.path.join(str(d), "*.jsonl"), seq_len=16, tokens=160)
    for line, what in (("[1, 2]", "not a JSON object"), ("{oops", "not JSON")):
        j = tmp_path / "odd.jsonl"
        j.write_text(line + "\n")
        with pytest.raises(UserError, match=f"odd.jsonl: line 1 is {what}"):
            data.load_splits(tiny_tok, str(j), seq_len=16, tokens=160)


# -----------------------------------------------------------------------------
# the step's inputs: what each position is scored on

def test_packed_targets_are_each_inputs_next_token():
    stream = list(range(1, 10))  # one document, no EOS inside the rows
    toks, valid = data.pack([stream[:-1]], seq_len=4, n_seqs=2, eos_id=0)
    p = data.Packed(toks, valid, torch.arange(len(toks)), "fp")
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert p.targets.tolist() == [[2, 3, 4, 5], [6, 7, 8, 0]]  # y_t = x_{t+1}; the stream's EOS closes it
    assert p.targets.shape == p.input_ids.shape == p.valid.shape
    x, y, v = next(p.batches(2))
    assert torch.equal(y, p.targets) and torch.equal(x, p.input_ids)


def test_gsm8k_supervises_every_answer_token_and_nothing_else(tiny_tok):
    eos = tiny_tok.eos_token_id
    for i in range(5):
        row = {"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.\n#### {2 * i}"}
        tr = data.pack_gsm8k([row], tiny_tok, seq_len=96, held_out=0.0)["train"]
        p = tiny_tok(data.GSM8K_PROMPT.format(question=row["question"]), add_special_tokens=False)["input_ids"]
        a = tiny_tok(" " + row["answer"], add_special_tokens=False)["input_ids"] + [eos]
        assert tr.input_ids[0, :len(p)].tolist() == p
        # exactly the answer's tokens and its closing EOS are targets, the first answer token included
        assert tr.valid[0].nonzero().flatten().tolist() == list(range(len(p) - 1, len(p) - 1 + len(a)))
        assert tr.targets[0][tr.valid[0]].tolist() == a


# -----------------------------------------------------------------------------
# a file without line breaks; input that does not look like text

def test_a_file_without_line_breaks_is_cut_into_documents(tmp_path, tiny_tok):
    words = " ".join(f"word{i % 97}" for i in range(60_000))  # ~400 KB on one line
    f = tmp_path / "oneline.txt"
    f.write_text(words)
    docs = list(data.iter_documents(str(f)))
    assert len(docs) >= 50 and all(len(t) <= 2 * data.MAX_DOC_CHARS for _, t, _ in docs)
    assert {s for _, _, s in docs} == {"train", "val", "test"}
    assert "".join(t for _, t, _ in docs) == words  # cut between words; not a character lost
    assert all(t.endswith(" ") for _, t, _ in docs[:-1])
    sp = data.load_splits(tiny_tok, str(f), seq_len=32, tokens=1024, eval_tokens=64)
    assert len(sp["val"]) == 2 and len(sp["test"]) == 2


def test_sniff_names_what_is_not_text(tmp_path):
    def sniff(name, content):
        p = tmp_path / name
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        return data.sniff(str(p))
    assert sniff("ok.txt", "plain text, naïve café ✓\n" * 100) is None
    assert sniff("cut.txt", "é" * 40_000) is None  # a character cut at the sniffed prefix is not an error
    assert "GGUF" in sniff("m.gguf", b"GGUF\x03\x00\x00\x00" + bytes(100))
    assert "3 of its first" in sniff("nul.txt", b"abc\x00def\x00\x00")
    latin = sniff("latin.txt", "Le café est très noir.\n".encode("latin-1"))
    assert "2 of its first 23 bytes" in latin and "latin-1" in latin
