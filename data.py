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
check_source checks a source before any model loads (files exist and have the field, a hub id is cached
or reachable) and warns about files that do not look like UTF-8 text (sniff: NUL bytes, GGUF, latin-1).

Splits. Each document is assigned to train / val / test by a hash of its key, independent of the
seed, so held-out text never appears in training whatever the seed; the seed only orders the training
documents. The unit that is hashed: a file of the stdlib corpus (all its chunks share a split), a row
of a .jsonl/.parquet file or of a hub dataset, a ~4,000-character chunk of a local .txt file (cut at
line breaks; a longer line at a space, so a file without line breaks has chunks too). So one
local file is split too: a file of n >= 3 documents whose hash gave it no val (or no test) document
sends its lowest-hash training documents there. An empty held-out split is an error (common.UserError)
before any training. Same data + seed + tokenizer => same sequences and same sample ids (sample id =
row index of the packed training split); the offline teacher cache is keyed by them.
"""
import codecs
import functools
import glob as globlib
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass

import torch

from common import HUB_ID, UserError, hub_source, read_jsonl

MAX_DOC_CHARS = 4000  # long files are cut into documents of about this size, at line boundaries
SPLIT_PCT = {"val": 3, "test": 3}  # percent of documents (by key hash) held out for each split


# -----------------------------------------------------------------------------
# documents

def _pieces(line):
    """A line longer than MAX_DOC_CHARS cut after a space (the last before MAX_DOC_CHARS, else the first
    after it), so a file without line breaks still makes many documents and a held-out split. A run
    without spaces stays whole: a cut there could split a word or a special token ('<|endoftext|>')."""
    while len(line) > MAX_DOC_CHARS:
        cut = line.rfind(" ", 0, MAX_DOC_CHARS) + 1 or line.find(" ", MAX_DOC_CHARS) + 1
        if not cut:
            break
        yield line[:cut]
        line = line[cut:]
    yield line


def _chunks(key, text):
    """Cut a long text into ~MAX_DOC_CHARS documents at line boundaries (over-long lines: _pieces); keys
    key#0, key#1, ..."""
    if len(text) <= MAX_DOC_CHARS:
        return [(key, text)] if text.strip() else []
    out, cur, n = [], [], 0
    for line in (p for full in text.splitlines(keepends=True) for p in _pieces(full)):
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
        raise UserError(f"--data: cannot read {path}: {e.strerror}") from None


def _local_files(spec):
    exts = (".txt", ".jsonl", ".parquet")
    if os.path.isdir(spec):
        root = globlib.escape(spec)
        files = sorted(p for ext in exts for p in globlib.glob(os.path.join(root, "**", "*" + ext), recursive=True))
        if not files:
            raise UserError(f"--data {spec}: the directory holds no .txt, .jsonl or .parquet file")
        return files
    files = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))
    if not files:
        what = "matches no file" if any(c in spec for c in "*?[") else "no such file"
        raise UserError(f"--data {spec}: {what} (give a .txt/.jsonl/.parquet file, a directory or a glob)")
    return files


def _text(value, skipped):
    """A row's text, or None (counted in `skipped` by kind) when it is not a string: null, 123 or
    ['a', 'b'] is never trained on as 'None', '123' or "['a', 'b']"."""
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    skipped[kind] = skipped.get(kind, 0) + 1
    return None


def _jsonl_rows(path, text_field, skipped):
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"--data {path}: line {i + 1} is not JSON") from None
            if not isinstance(row, dict):
                raise UserError(f"--data {path}: line {i + 1} is not a JSON object (with a field {text_field!r})")
            if text_field not in row:
                raise UserError(f"--data {path}: line {i + 1} has no field {text_field!r} (set --text-field)")
            yield i, _text(row[text_field], skipped)


def _parquet_check(path, text_field):
    import pyarrow.parquet as pq
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 (pyarrow raises several kinds for a bad file)
        raise UserError(f"--data {path}: not a readable .parquet file ({type(e).__name__})") from None
    if text_field not in names:
        raise UserError(f"--data {path}: no column {text_field!r} (columns: {', '.join(names[:10])}); "
                        f"set --text-field")


def _parquet_rows(path, text_field, skipped):
    import pyarrow.parquet as pq
    _parquet_check(path, text_field)
    for i, t in enumerate(pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()):
        yield i, _text(t, skipped)


def _file_units(path, text_field, skipped):
    """The split units of one local file: [(unit, [(key, text), ...])], in file order. A .txt chunk is
    its own unit (key 'name#i'); a .jsonl/.parquet row is one (key 'name:row', long rows 'name:row#i')."""
    name = os.path.basename(path)
    if path.endswith((".jsonl", ".parquet")):
        rows = (_jsonl_rows if path.endswith(".jsonl") else _parquet_rows)(path, text_field, skipped)
        units = [(f"{name}:{i}", _chunks(f"{name}:{i}", t)) for i, t in rows if t is not None]
    else:
        units = [(key, [(key, t)]) for key, t in _chunks(name, _read_text(path))]
    return [(u, docs) for u, docs in units if docs]


def _unit_hash(unit):
    return int(hashlib.sha256(unit.encode()).hexdigest()[:8], 16)


def _split_of_hash(h):
    b = h % 100
    if b < SPLIT_PCT["val"]:
        return "val"
    if b < SPLIT_PCT["val"] + SPLIT_PCT["test"]:
        return "test"
    return "train"


def split_of(key):
    """train / val / test from a hash of a key without its '#chunk' suffix: all chunks of a stdlib file
    (or of a hub row) share a split. Local files split per row / .txt chunk (file_splits)."""
    return _split_of_hash(_unit_hash(key.split("#", 1)[0]))


def file_splits(units):
    """{unit: split} for the units of one local file: by hash, then a file of >= 3 units whose hash
    left val (or test) empty sends its lowest-hash train unit there, so one file still has held-out text."""
    hashes = {u: _unit_hash(u) for u in units}
    out = {u: _split_of_hash(h) for u, h in hashes.items()}
    if len(out) >= 3:
        for s in ("val", "test"):
            if s not in out.values():
                out[min((u for u in out if out[u] == "train"), key=hashes.get)] = s
    return out


def iter_documents(data=None, seed=0, text_field="text", skipped=None):
    """Yield (key, text, split) for every document of the source, training order shuffled by `seed`.

    `skipped` (a dict, optional) counts the rows whose text is not a string, by kind ('null', 'int', ...).
    """
    skipped = {} if skipped is None else skipped
    if data in (None, "", "stdlib"):
        root, files = stdlib_files()
        random.Random(seed).shuffle(files)
        for p in files:
            for key, text in _chunks(os.path.relpath(p, root), _read_text(p)):
                yield key, text, split_of(key)  # per file: the README's numbers rest on this split
    elif _is_local(data):
        files = _local_files(data)
        random.Random(seed).shuffle(files)
        for p in files:
            units = _file_units(p, text_field, skipped)
            split = file_splits([u for u, _ in units])
            for u, docs in units:
                for key, text in docs:
                    yield key, text, split[u]
    else:  # a hub dataset id, streamed (needs network; the paper's FineWeb-Edu)
        check_hub_dataset(data, "--data")
        from datasets import load_dataset
        try:
            ds = load_dataset(data, split="train", streaming=True).shuffle(seed=seed, buffer_size=10_000)
            for i, row in enumerate(ds):
                if text_field not in row:
                    raise UserError(f"--data {data}: rows have no field {text_field!r} (set --text-field)")
                text = _text(row[text_field], skipped)
                if text is not None:
                    for key, t in _chunks(str(row.get("id", f"row:{i}")), text):
                        yield key, t, split_of(key)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (a dropped connection mid-stream: connection, HTTP, timeout)
            raise UserError(f"--data {data}: reading the hub dataset failed ({_first_line(e)})") from e


def _is_local(spec):
    """A --data spec that names local files (an existing path, a glob, or a data file name), not a hub id."""
    return os.path.exists(spec) or any(c in spec for c in "*?[") or spec.endswith((".txt", ".jsonl", ".parquet"))


def _is_hub(spec):
    """A --task-data spec that reads as a hub id (owner/name), not a local file."""
    return not _is_local(spec) and HUB_ID.fullmatch(spec) is not None


def _first_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__


# -----------------------------------------------------------------------------
# checks before any model loads: the source exists, has the field, looks like text

CHECK_FILES = 64  # files of a --data directory or glob checked up front (the load checks every one)
SNIFF_BYTES = 1 << 16


def _hub_dataset_cached(repo):
    """Whether a hub dataset left files on this machine: its card in the hub cache or a prepared copy."""
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(repo, "README.md", repo_type="dataset"), str):
        return True
    prepared = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    return os.path.isdir(os.path.join(prepared, repo.replace("/", "___")))


@functools.lru_cache(maxsize=None)
def check_hub_dataset(repo, flag):
    """A UserError at once, naming `flag`, when the hub dataset `repo` is neither cached here nor reachable
    (instead of a ConnectionError from `datasets` after the models load)."""
    if not HUB_ID.fullmatch(repo):
        raise UserError(f"{flag} {repo}: no such file or directory (nor a hub dataset id)")
    if not _hub_dataset_cached(repo):  # a cached dataset is read without asking the hub
        local = "a local JSONL file of question/answer rows" if flag == "--task-data" else \
            "a local .txt/.jsonl/.parquet file"
        hub_source(repo, flag, "dataset", local=local)


def sniff(path, n=SNIFF_BYTES):
    """Why the file at `path` does not look like UTF-8 text, judged by its first `n` bytes; None when it
    does. Such a file still trains (bad bytes read as U+FFFD), so this is a warning, not an error."""
    with open(path, "rb") as f:
        head = f.read(n)
    if head[:4] == b"GGUF":
        return f"{path} is a GGUF model file (magic 'GGUF'), not text"
    nul = head.count(0)
    if nul:
        return f"{path}: {nul} of its first {len(head):,} bytes are NUL: a binary file, not text"
    dec = codecs.getincrementaldecoder("utf-8")("ignore")
    text = dec.decode(head, final=len(head) < n)  # a character cut at byte n is not an error
    bad = len(head) - len(dec.getstate()[0]) - len(text.encode("utf-8"))
    if bad:
        return (f"{path}: {bad:,} of its first {len(head):,} bytes ({bad / len(head):.1%}) are not UTF-8 and "
                f"would be read as U+FFFD: latin-1 text (convert it: iconv -f latin1 -t utf-8) or not text")
    return None


def check_source(data=None, text_field="text"):
    """Check a --data source before any model loads (common.UserError): the files exist, a .jsonl's first
    row and a .parquet's columns have `text_field`, a hub id is cached or reachable. Returns warnings:
    files that do not look like text (sniff)."""
    if data in (None, "", "stdlib"):
        return []
    if not _is_local(data):
        check_hub_dataset(data, "--data")
        return []
    notes = []
    for path in _local_files(data)[:CHECK_FILES]:
        if path.endswith(".parquet"):
            _parquet_check(path, text_field)
            continue
        if path.endswith(".jsonl"):
            next(_jsonl_rows(path, text_field, {}), None)
        why = sniff(path)
        if why:
            notes.append(f"--data {why}")
    return notes


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


SPLITS = ("train", "val", "test")


def load_splits(tokenizer, data=None, seq_len=512, tokens=1_000_000, eval_tokens=32_768, seed=0,
                text_field="text", backend="auto", tokenizer_fp="", splits=SPLITS, stats=None):
    """Tokenize and pack a source into {split: Packed} for the requested `splits` (default all three).

    train holds tokens // seq_len sequences; val and test eval_tokens // seq_len each (fewer if the
    source runs out). A requested split that comes out empty is a common.UserError naming --data and
    why. splits=('val',) reads only held-out text: the training budget is never tokenized (eval.py),
    and the held-out sequences are the same as those of a full call. `stats` (a dict, optional) receives
    {'documents': {split: n seen}, 'skipped': {kind: n rows whose text is not a string}}; skipped rows
    are also reported on stderr.
    """
    name = data or "stdlib"
    if seq_len < 2:
        raise UserError(f"--seq-len must be >= 2, got {seq_len}")
    if "train" in splits and tokens < seq_len:
        raise UserError(f"--tokens {tokens} is smaller than one sequence (--seq-len {seq_len})")
    if any(s != "train" for s in splits) and eval_tokens < seq_len:
        raise UserError(f"--eval-tokens {eval_tokens} is smaller than one sequence (--seq-len {seq_len})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the --teacher's tokenizer has no EOS token; packing needs one to separate documents")
    want = {"train": tokens // seq_len, "val": eval_tokens // seq_len, "test": eval_tokens // seq_len}
    need = {s: (want[s] * seq_len + 1 if s in splits else 0) for s in SPLITS}
    docs = {s: [] for s in SPLITS}
    have = {s: 0 for s in SPLITS}
    seen = {s: 0 for s in SPLITS}
    skipped = {}
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

    for _, text, s in iter_documents(data, seed, text_field, skipped):
        seen[s] += 1
        if have[s] < need[s]:
            batch.append((s, text))
        if len(batch) >= 64:
            flush()
            if all(have[x] >= need[x] for x in have):
                break
    flush()
    n_skipped = sum(skipped.values())
    if n_skipped:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
        print(f"--data {name}: skipped {n_skipped} rows whose {text_field!r} is not a string ({kinds})",
              file=sys.stderr)
    if stats is not None:
        stats.update(documents=dict(seen), skipped=dict(skipped))
    out = {}
    for s in splits:
        toks, valid = pack(docs[s], seq_len, want[s], eos)
        if len(toks) == 0:
            why = _empty_reason(s, seen, skipped, seq_len)
            raise UserError(f"--data {name}: the {s} split is empty: {why}")
        if not valid.any():
            raise UserError(f"--data {name}: no position of the {s} split can be supervised (every target "
                            "follows an end-of-text token): nothing would train or be measured")
        out[s] = Packed(toks, valid, torch.arange(len(toks)), _fingerprint(toks, seq_len, tokenizer_fp))
    return out


def _empty_reason(split, seen, skipped, seq_len):
    n_skipped = sum(skipped.values())
    if sum(seen.values()) == 0:
        return "no text in the source" + (f" ({n_skipped} rows skipped: their text is not a string)"
                                          if n_skipped else "")
    if seen[split] == 0:
        return (f"none of its {sum(seen.values())} documents was assigned to it (held-out documents are "
                f"picked by a hash of each row or ~{MAX_DOC_CHARS}-character chunk, cut at line breaks or "
                f"spaces; a file needs at least 3 of them: give more text)")
    return (f"its {seen[split]} documents hold fewer tokens than one sequence of --seq-len {seq_len} "
            f"(give more text or a smaller --seq-len)")


# -----------------------------------------------------------------------------
# task-specific data: GSM8K (prompt masked, answer supervised)

GSM8K_PROMPT = "Question: {question}\nAnswer:"


def load_gsm8k_rows(source="openai/gsm8k", split="train"):
    """GSM8K rows {question, answer}: a local JSONL file, else the hub dataset (config 'main')."""
    if not _is_hub(source):
        return _gsm8k_file(source)
    check_hub_dataset(source, "--task-data")
    from datasets import load_dataset
    try:
        return list(load_dataset(source, "main", split=split))
    except Exception as e:  # noqa: BLE001 (connection, HTTP, a config the dataset lacks)
        raise UserError(f"--task-data {source}: loading the hub dataset failed ({_first_line(e)})") from e


GSM8K_ROW = "JSONL lines {\"question\": str, \"answer\": str}"


def _gsm8k_file(path):
    """The rows of a local GSM8K JSONL file; a UserError naming --task-data, the file and the line."""
    rows = read_jsonl(path, "--task-data")
    for i, row in enumerate(rows, 1):
        if not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise UserError(f"--task-data {path}: row {i} needs string fields 'question' and 'answer'; need "
                            f"{GSM8K_ROW}")
    if not rows:
        raise UserError(f"--task-data {path}: no examples; need {GSM8K_ROW}")
    return rows


def check_task_data(source="openai/gsm8k"):
    """Check --task-data before any model loads: a local file is read and checked row by row (GSM8K is
    small), a hub id must be cached or reachable."""
    if _is_hub(source):
        check_hub_dataset(source, "--task-data")
    else:
        _gsm8k_file(source)


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
        raise UserError(f"--task gsm8k: none of the {len(rows)} examples went to training (a hash of each "
                        f"question holds {held_out:.0%} out); give more examples")
    return res
