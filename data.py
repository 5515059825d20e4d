"""Data: documents -> tokens -> fixed-length packed sequences with stable sample ids.

Every training step sees a batch of packed sequences. A packed sequence is T+1 consecutive tokens of
the document stream (each document followed by EOS); position t has input x_t and next-token target
y_t = x_{t+1}, so every token of the stream is a target exactly once.

Document boundaries. Documents are concatenated and attention runs across the boundary (as in the
paper's standard HF packing; no block-diagonal masks). Position t is *valid* (may be supervised and
scored) unless its input x_t is EOS: that target is the first token of an unrelated next document,
which no model can predict from the previous one, and would only add noise to entropy/KL scores.
Predicting EOS at a document's end stays valid. There is no padding in pretraining data.

Sources (`--data`):
  - nothing / `stdlib`: an embedded offline corpus present on every machine: the Python standard
    library's own sources (docstrings, comments, code), in file chunks of ~4,000 characters;
  - local files: `.txt`, `.jsonl` (field `--text-field`, default `text`), `.parquet`, or a glob;
  - anything else: a hub dataset id streamed with `datasets` (the paper: `HuggingFaceFW/fineweb-edu`).

Splits. Each document is assigned to train / val / test by a hash of its key (file path, or row id),
independent of the seed, so held-out text never appears in training whatever the seed. The seed only
orders the training documents. Same data + seed + tokenizer => same sequences and same sample ids
(sample id = row index of the packed training split); the offline teacher cache is keyed by them.
"""
import glob as globlib
import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass

import torch

MAX_DOC_CHARS = 4000  # long files are cut into documents of about this size, at line boundaries
SPLIT_PCT = {"val": 3, "test": 3}  # percent of documents (by key hash) held out for each split


# -----------------------------------------------------------------------------
# documents

def _chunks(key, text):
    """Cut a long text into ~MAX_DOC_CHARS documents at line boundaries; keys key#0, key#1, ..."""
    if len(text) <= MAX_DOC_CHARS:
        return [(key, text)] if text.strip() else []
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= MAX_DOC_CHARS:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return [(f"{key}#{i}", t) for i, t in enumerate(out) if t.strip()]


def stdlib_files():
    """The embedded corpus: every .py file of the standard library (tests, site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return root, files


def _read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"--data: cannot read {path}: {e.strerror}") from None


def _local_files(spec):
    if os.path.isdir(spec):
        files = sorted(p for ext in ("txt", "jsonl", "parquet")
                       for p in globlib.glob(os.path.join(spec, "**", f"*.{ext}"), recursive=True))
    else:
        files = sorted(globlib.glob(spec, recursive=True))
    if not files:
        raise FileNotFoundError(f"--data {spec}: no such file (or no .txt/.jsonl/.parquet match)")
    return files


def iter_file_documents(path, text_field="text"):
    """(key, text) documents of one local file. Keys are unique and stable: 'file:line' etc."""
    name = os.path.basename(path)
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"--data {path}: line {i + 1} is not JSON") from None
                if text_field not in row:
                    raise ValueError(f"--data {path}: line {i + 1} has no field {text_field!r} "
                                     f"(set --text-field)")
                yield from _chunks(f"{name}:{i}", str(row[text_field]))
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq
        col = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
        for i, t in enumerate(col):
            yield from _chunks(f"{name}:{i}", str(t))
    else:
        yield from _chunks(name, _read_text(path))


def iter_documents(data=None, seed=0, text_field="text"):
    """Yield (key, text) for every document of the source, training order shuffled by `seed`."""
    if data in (None, "", "stdlib"):
        root, files = stdlib_files()
        random.Random(seed).shuffle(files)
        for p in files:
            yield from _chunks(os.path.relpath(p, root), _read_text(p))
    elif os.path.exists(data) or any(c in data for c in "*?[") or data.endswith((".txt", ".jsonl", ".parquet")):
        files = _local_files(data)
        random.Random(seed).shuffle(files)
        for p in files:
            yield from iter_file_documents(p, text_field)
    else:  # a hub dataset id, streamed (needs network; the paper's FineWeb-Edu)
        from datasets import load_dataset
        ds = load_dataset(data, split="train", streaming=True).shuffle(seed=seed, buffer_size=10_000)
        for i, row in enumerate(ds):
            yield from _chunks(str(row.get("id", f"row:{i}")), str(row[text_field]))


def split_of(key):
    """train / val / test from a hash of the document key (chunks of one file share the file's split)."""
    base = key.split("#", 1)[0]
    b = int(hashlib.sha256(base.encode()).hexdigest()[:8], 16) % 100
    if b < SPLIT_PCT["val"]:
        return "val"
    if b < SPLIT_PCT["val"] + SPLIT_PCT["test"]:
        return "test"
    return "train"


# -----------------------------------------------------------------------------
# tokenization: HF tokenizer, with an exact tiktoken fast path for byte-level BPE

def _bytes_decoder():
    """GPT-2's byte <-> printable-unicode table, inverted: char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiktoken_encoder(tok, check_texts=()):
    """An exact tiktoken twin of a byte-level BPE HF tokenizer, or None if it can't be proven exact.

    tiktoken merges the pair whose merged token has the lowest rank, so rank = index of the merge in
    the HF merges list reproduces HF's BPE. The result is checked id-for-id on `check_texts`.
    """
    try:
        import tiktoken
        spec = json.loads(tok.backend_tokenizer.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
        if (model["type"] != "BPE" or spec.get("normalizer") or pre.get("type") != "ByteLevel"
                or pre.get("add_prefix_space") or not pre.get("use_regex", True)):
            return None
        dec = _bytes_decoder()
        to_bytes = lambda s: bytes(dec[c] for c in s)
        vocab = model["vocab"]
        ranks, ids = {}, []
        for b in range(256):
            ranks[bytes([b])] = b
        for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]):
            tb = to_bytes(a + b)
            if tb not in ranks:
                ranks[tb] = len(ranks)
        byte_tok = {v: k for k, v in dec.items()}
        id_of = torch.full((len(ranks),), -1, dtype=torch.long)
        for tb, r in ranks.items():
            piece = "".join(byte_tok[x] for x in tb)
            if piece in vocab:
                id_of[r] = vocab[piece]
            elif len(tb) > 1:
                return None  # a merge result outside the vocab: not a plain GPT-2-style BPE
        # bytes absent from the vocab (rare control bytes) map to -1: such rows go to the HF path
        hf = lambda t: tok(t, add_special_tokens=False)["input_ids"]
        enc = tiktoken.Encoding("hf-twin", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
        lut = id_of.tolist()

        def encode(texts):
            rows = [[lut[r] for r in row] for row in enc.encode_ordinary_batch(texts)]
            return [hf(t) if -1 in row else row for t, row in zip(texts, rows)]

        for t in check_texts:
            if encode([t])[0] != tok(t, add_special_tokens=False)["input_ids"]:
                return None
        return encode
    except Exception:
        return None


def make_encoder(tok, backend="auto", sample=()):
    """texts -> list of id lists (no special tokens). auto: tiktoken if proven exact on `sample`."""
    hf = lambda texts: tok(list(texts), add_special_tokens=False)["input_ids"]
    if backend == "hf":
        return hf, "hf"
    fast = tiktoken_encoder(tok, sample) if sample else None
    if fast is None:
        if backend == "tiktoken":
            raise ValueError("--tokenizer-backend tiktoken: this tokenizer is not byte-level BPE "
                             "(or tiktoken disagrees with it); use auto or hf")
        return hf, "hf"
    return fast, "tiktoken"


# -----------------------------------------------------------------------------
# packing

@dataclass
class Packed:
    """N packed sequences. tokens (N, T+1); input_ids = tokens[:, :-1], targets = tokens[:, 1:]."""
    tokens: torch.Tensor      # (N, T+1) long
    valid: torch.Tensor       # (N, T) bool
    sample_ids: torch.Tensor  # (N,) long
    fingerprint: str

    @property
    def input_ids(self):
        return self.tokens[:, :-1]

    @property
    def targets(self):
        return self.tokens[:, 1:]

    def __len__(self):
        return self.tokens.shape[0]

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Packed(self.tokens[idx], self.valid[idx], self.sample_ids[idx], self.fingerprint)

    def batches(self, batch_size):
        for i in range(0, len(self), batch_size):
            yield self.input_ids[i:i + batch_size], self.targets[i:i + batch_size], self.valid[i:i + batch_size]


def pack(token_docs, seq_len, n_seqs, eos_id):
    """Pack documents (lists of ids, EOS appended here) into n_seqs rows of seq_len+1 tokens.

    Row i holds stream[i*T : i*T+T+1]: consecutive rows overlap by one token, so each stream token is
    a target exactly once. Returns (tokens (N, T+1), valid (N, T)); N may be < n_seqs if data runs out.
    """
    need = n_seqs * seq_len + 1
    stream = []
    for ids in token_docs:
        stream.extend(ids)
        stream.append(eos_id)
        if len(stream) >= need:
            break
    n = min(n_seqs, (len(stream) - 1) // seq_len) if stream else 0
    if n == 0:
        return torch.zeros(0, seq_len + 1, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.bool)
    flat = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    tokens = flat.unfold(0, seq_len + 1, seq_len).contiguous()  # (N, T+1)
    valid = tokens[:, :-1] != eos_id  # (N, T): target after EOS = next document's first token
    return tokens, valid


def _fingerprint(tokens, seq_len, tok_fp):
    h = hashlib.sha256()
    h.update(f"T={seq_len};tok={tok_fp};".encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()[:16]


def load_splits(tokenizer, data=None, seq_len=512, tokens=1_000_000, eval_tokens=32_768, seed=0,
                text_field="text", backend="auto", tokenizer_fp=""):
    """Tokenize and pack a source into {'train', 'val', 'test'}: Packed.

    train holds tokens // seq_len sequences; val and test eval_tokens // seq_len each (fewer if the
    source runs out; an empty split is an error for train only).
    """
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if tokens < seq_len:
        raise ValueError(f"--tokens {tokens} is smaller than one sequence (--seq-len {seq_len})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; packing needs one to separate documents")
    want = {"train": tokens // seq_len, "val": eval_tokens // seq_len, "test": eval_tokens // seq_len}
    need = {s: n * seq_len + 1 for s, n in want.items()}
    docs = {"train": [], "val": [], "test": []}
    have = {"train": 0, "val": 0, "test": 0}
    encode, batch = None, []

    def flush():
        nonlocal encode
        if not batch:
            return
        if encode is None:
            encode, _ = make_encoder(tokenizer, backend, sample=[t for _, t in batch[:32]])
        for (s, _), ids in zip(batch, encode([t for _, t in batch])):
            if have[s] < need[s]:
                docs[s].append(ids)
                have[s] += len(ids) + 1
        batch.clear()

    for key, text in iter_documents(data, seed, text_field):
        s = split_of(key)
        if have[s] < need[s]:
            batch.append((s, text))
        if len(batch) >= 64:
            flush()
            if all(have[x] >= need[x] for x in have):
                break
    flush()
    out = {}
    for s in ("train", "val", "test"):
        toks, valid = pack(docs[s], seq_len, want[s], eos)
        if s == "train" and len(toks) == 0:
            raise ValueError(f"--data {data or 'stdlib'}: no training text (empty source or every "
                             f"document shorter than --seq-len {seq_len})")
        out[s] = Packed(toks, valid, torch.arange(len(toks)), _fingerprint(toks, seq_len, tokenizer_fp))
    return out


# -----------------------------------------------------------------------------
# task-specific data: GSM8K (prompt masked, answer supervised)

GSM8K_PROMPT = "Question: {question}\nAnswer:"


def load_gsm8k_rows(source="openai/gsm8k", split="train"):
    """GSM8K rows {question, answer}: a local JSONL file, else the hub dataset (config 'main')."""
    if source.endswith(".jsonl") or os.path.exists(source):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"--task-data {source}: no such file")
        rows = [json.loads(l) for l in open(source, encoding="utf-8") if l.strip()]
        if not rows or any("question" not in r or "answer" not in r for r in rows):
            raise ValueError(f"--task-data {source}: need JSONL lines with 'question' and 'answer'")
        return rows
    from datasets import load_dataset
    return list(load_dataset(source, "main", split=split))


def pack_gsm8k(rows, tokenizer, seq_len, tokens=None, seed=0, held_out=0.05):
    """One example per sequence: prompt + ' ' + answer + EOS, right-padded with EOS.

    valid marks only the positions whose target is an answer token (or the closing EOS): the prompt
    is context, never supervised; padding is never supervised. Examples longer than seq_len+1 tokens
    are cut (their tail is lost, counted in the returned stats). A hash of the question puts
    `held_out` of the rows into 'val' and 'test' halves (never trained on).
    """
    eos = tokenizer.eos_token_id
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out = {"train": [], "val": [], "test": []}
    for i in order:
        r = rows[i]
        b = int(hashlib.sha256(r["question"].encode()).hexdigest()[:8], 16) % 1000
        s = "val" if b < held_out * 500 else "test" if b < held_out * 1000 else "train"
        p = tokenizer(GSM8K_PROMPT.format(question=r["question"]), add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (p + a)[: seq_len + 1]
        n_real = len(ids)
        row = torch.full((seq_len + 1,), eos, dtype=torch.long)
        row[:n_real] = torch.tensor(ids)
        valid = torch.zeros(seq_len, dtype=torch.bool)
        valid[len(p) - 1: n_real - 1] = True  # targets p[-1]+1 .. last real token = answer + EOS
        out[s].append((row, valid))
    res = {}
    for s, items in out.items():
        if tokens is not None and s == "train":
            items = items[: max(1, tokens // seq_len)]
        toks = torch.stack([x for x, _ in items]) if items else torch.zeros(0, seq_len + 1, dtype=torch.long)
        valid = torch.stack([v for _, v in items]) if items else torch.zeros(0, seq_len, dtype=torch.bool)
        res[s] = Packed(toks, valid, torch.arange(len(toks)), _fingerprint(toks, seq_len, "gsm8k"))
    if len(res["train"]) == 0:
        raise ValueError("--task gsm8k: no training examples")
    return res
