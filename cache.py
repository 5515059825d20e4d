"""Offline teacher cache for RS-KD: run the teacher once, train many students from disk.

Selective KD (Tavor et al., "Rethinking Selective Knowledge Distillation") supervises the student
q_t with the teacher p_t at each position t. Holding the teacher in memory next to every student run
is the dominant cost, so Sec. 7.1 / Appendix E cache a *sparse, unbiased* sketch of p_t instead of the
V-dimensional logits (RS-KD, random-sampling KD):

    per position t: draw U classes i.i.d. from p_t^(T) = softmax(z_t / T)       (with replacement)
                    keep the unique ids c with their counts n_c,   p_hat_t(c) = n_c / U
    E[p_hat_t(c)] = p_t^(T)(c)  ->  KL(p_hat_t || q_t) is an unbiased estimate of the dense target term

The draw is losses.sample_classes with the uniforms of losses.rs_uniforms(seed, sample ids, T, U): the
one class sampler of the project, so online RS-KD and a cache built with the same seed train on
identical classes and counts at every (sample id, position). It runs on the device of the logits
teacher_fn returns; only the kept ids and counts move to the host.

The target is integer counts out of U, so the cache stores exactly that (lossless; format 2):

    id_bits    = ceil(log2 V)           (V = 151,936, Qwen3: 18)
    count_bits = ceil(log2 U)           (U = 64: 6) ; the word stores count - 1, which lies in [0, U)
    word       = id | (count - 1) << id_bits, little-endian, bytes_per_class = ceil((id + count bits) / 8)

That is 3 bytes a class for every V <= 2^18 and U <= 64 (Qwen3 included), and the decoded target is
count / U exactly, bit for bit the online one. Past that (V > 2^18 or U > 64) a class takes 4 bytes
(or more); build says so, and nothing is ever rounded or dropped. Format 1 stored a quantized
probability in the bits left over (5 bits at V in (2^18, 2^19]), which dropped up to half the sampled
classes of diffuse rows; a format-1 cache is refused with "rebuild". Packing ids in 17 bits (as the
published code does) would map every id >= 131,072 onto another class; here pack_classes refuses
any id or count that does not fit.

On-disk layout of a cache directory (all files written to a temp name + os.replace):

    build.json              the plan: meta + format params; a resumed build must match it exactly
    shard_00000.bin         ragged packed classes of the shard, (K, bytes_per_class) uint8
    shard_00000.idx         index, raw little-endian: sample_ids int64 (n) | seq_offsets int64 (n+1)
                            | kept (n, seq_len) uint8 (uint16 when U > 255), kept classes per position
    shard_00000.json        per-shard sizes + sha256 checksums; written LAST: marks the shard complete
    header.json             plan + all shard records + totals; written by `finalize` once every shard exists

Storage per position = bytes_per_class x kept classes + 1 byte of index (+ 16 bytes per sequence);
position offsets are derived from the kept counts at read time instead of being stored as int64.

Entries are keyed by the stable sample id (data.py) and the position t in [0, seq_len). The draws of a
sequence depend only on (seed, sample_id), never on the batch composition, the rank or the resume
point, so a resumed or distributed build is byte-identical to a one-shot build. Everything that changes
the cached numbers is in the plan and checked on open: teacher, vocab_size, seq_len, tokenizer and data
fingerprints, U, temperature, seed, and the teacher's `dtype` when meta carries it.

Read path: `open_cache(dir, expect)` checks the header against the run and every file's size (and by
default its sha256; verify="lazy" checks each shard on first read); `TeacherCache.get(sample_ids)`
returns ids (B, T, Umax) long and probs = counts / U (B, T, Umax) fp32 from np.memmap.
`python cache.py inspect DIR` verifies the checksums, each shard's record against the header's copy, and
that every position's counts sum to U.

Table 6 of the paper (storage for 100B tokens, V = 100k): `python cache.py estimate --tokens 100e9
--vocab 100000 --u 64 --l 0.2`.
"""

import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import losses
from common import TMP_PREFIX, ArgumentParser, UserError, atomic_json, atomic_write, seed_from

FORMAT_VERSION = 2       # 2: exact counts (count - 1 in the count bits); 1: quantized probabilities (lossy)
SELECTION_VERSION = 1    # format of save_selection's file (independent of the class format)
HEADER = "header.json"
PLAN = "build.json"
_META_KEYS = ("teacher", "vocab_size", "seq_len", "tokenizer_fingerprint", "data_fingerprint")
_OPTIONAL_KEYS = ("dtype",)  # checked on open whenever the cache recorded them, even if the run omits them
MAX_U = 65535            # the most classes a position may draw: count - 1 and the kept counts fit uint16
_CHUNK = 1 << 22  # elements of a (rows, V) block of the sampler on CPU (x16 on GPU): bounds peak memory


class CacheMismatchError(UserError, ValueError):
    """The cache on disk was built for another run (teacher, vocab, data, U, temperature, dtype, format)."""


class CacheCorruptError(UserError, ValueError):
    """A cache file is missing, truncated or fails its checksum."""


class CacheNotFoundError(UserError, FileNotFoundError):
    """The directory does not exist or holds no teacher cache."""


# ----------------------------------------------------------------------------- format

def id_bits(vocab_size):
    """ceil(log2 V): bits needed to store every class id 0..V-1 exactly."""
    if int(vocab_size) < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, (int(vocab_size) - 1).bit_length())


def count_bits(U):
    """ceil(log2 U): bits that hold count - 1 in [0, U) exactly (U = 64 -> 6)."""
    if not 1 <= int(U) <= MAX_U:
        raise ValueError(f"U must be in [1, {MAX_U}], got {U}")
    return (int(U) - 1).bit_length()


def bytes_per_class(vocab_size, U=64):
    """Whole bytes for one exact (id, count - 1) word: 3 for V <= 2^18 at U <= 64, 4 (or more) past."""
    return math.ceil((id_bits(vocab_size) + count_bits(U)) / 8)


def _pack_np(ids, counts, vocab_size, U):
    ib, nb = id_bits(vocab_size), bytes_per_class(vocab_size, U)
    ids = np.asarray(ids).astype(np.int64, copy=False)
    counts = np.asarray(counts).astype(np.int64, copy=False)
    if ids.shape != counts.shape:
        raise ValueError(f"pack_classes: ids {ids.shape} and counts {counts.shape} differ in shape")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"pack_classes: ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    if counts.size and (counts.min() < 1 or counts.max() > U):
        raise ValueError(f"pack_classes: counts must lie in [1, U={U}], got [{counts.min()}, {counts.max()}]")
    w = (ids.astype(np.uint64) | ((counts - 1).astype(np.uint64) << np.uint64(ib))).astype("<u8")
    return w[..., None].view(np.uint8)[..., :nb]                      # (..., nb) little-endian bytes


def _unpack_np(buf, vocab_size, U):
    ib, nb = id_bits(vocab_size), bytes_per_class(vocab_size, U)
    b = np.asarray(buf, dtype=np.uint8)
    if b.shape[-1:] != (nb,):
        raise ValueError(f"unpack_classes: last dim must be {nb} bytes for vocab_size {vocab_size}, U {U}, "
                         f"got shape {b.shape}")
    w8 = np.zeros(b.shape[:-1] + (8,), np.uint8)                      # widen to one uint64 per class
    w8[..., :nb] = b
    w = w8.view("<u8")[..., 0]
    ids = (w & np.uint64((1 << ib) - 1)).astype(np.int64)
    counts = (w >> np.uint64(ib)).astype(np.int64) + 1
    return ids, counts


def pack_classes(ids, counts, vocab_size, U):
    """Pack class ids (...) and their counts (...) in [1, U] into np.uint8 (..., bytes_per_class(V, U)).

    Raises ValueError on ids outside [0, V) or counts outside [1, U]: nothing is silently truncated.
    """
    to_np = lambda a: a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    return np.ascontiguousarray(_pack_np(to_np(ids), to_np(counts), int(vocab_size), int(U)))


def unpack_classes(buf, vocab_size, U):
    """Inverse of pack_classes: uint8 (..., bytes_per_class) -> (ids, counts), int64 torch tensors (...)."""
    if torch.is_tensor(buf):
        buf = buf.detach().cpu().numpy()
    ids, counts = _unpack_np(buf, int(vocab_size), int(U))
    return torch.from_numpy(ids), torch.from_numpy(counts)


# ----------------------------------------------------------------------------- storage estimate

def estimate_storage(tokens, vocab, u, l):
    """Paper Table 6: teacher-target storage for `tokens` positions, in bytes/position and TB (1e12 B).

    Full KD stores fp16 logits (2V bytes); RS-KD stores at most U classes of bytes_per_class(V, U) bytes
    (an upper bound: the format stores unique classes only, plus ~1 byte/position of index); SE-KD_3X
    caches only the top-l fraction of samples (U x l); CE only needs no teacher storage at all (the
    target token is already in the training data), so it is 0.
    Returns {row label: {"bytes_per_position": float, "tb": float}} in table order.
    """
    tokens, vocab, u, l = float(tokens), int(vocab), int(u), float(l)
    if not (math.isfinite(tokens) and tokens >= 0):  # nan fails every comparison: say so, not a table of nan
        raise ValueError(f"--tokens must be a finite number >= 0, got {tokens}")
    if not 1 <= u <= MAX_U:
        raise ValueError(f"--u {u}: need u >= 1 and u <= {MAX_U} (classes drawn per position)")
    if not 0 <= l <= 1:
        raise ValueError(f"--l is a fraction of samples in [0, 1], got {l}")
    if vocab < 1:
        raise ValueError(f"--vocab must be >= 1, got {vocab}")
    rs = u * bytes_per_class(vocab, u)
    rows = {
        "Full KD (fp16 logits)": 2.0 * vocab,
        f"RS-KD (U={u})": float(rs),
        "SE-KD_3X (U x l)": rs * l,
        "CE only": 0.0,
    }
    return {k: {"bytes_per_position": b, "tb": b * tokens / 1e12} for k, b in rows.items()}


# ----------------------------------------------------------------------------- small file helpers

def _write_json(path, obj):
    atomic_json(path, obj, indent=1)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorruptError(f"{path}: not valid JSON ({e}); the file is truncated or corrupted") from None


def _norm(x):
    """JSON round trip so tuples/ints/floats compare the same as after writing to disk."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _sha256_file(path, bufsize=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _shard_name(i):
    return f"shard_{i:05d}"


def _diff(file, have, want, keys):
    bad = [f"{k}: cache={have.get(k, '<absent>')!r} run={want.get(k, '<absent>')!r}" for k in keys
           if k not in have or k not in want or _norm(have[k]) != _norm(want[k])]
    if bad:
        raise CacheMismatchError(f"{file}: cache does not match this run: " + "; ".join(bad)
                                 + " (use another --cache-dir, or delete this one to rebuild)")


def _check_format(path, d):
    v = d.get("format_version")
    if v != FORMAT_VERSION:
        old = " (format 1 stored quantized probabilities and could drop sampled classes)" if v == 1 else ""
        raise CacheMismatchError(f"{path}: cache format_version {v!r}, this code reads {FORMAT_VERSION}{old}: "
                                 f"rebuild it (delete {os.path.dirname(path)} or use another --cache-dir)")


# ----------------------------------------------------------------------------- build

def _plan(meta, vocab_size, seq_len, U, temperature, seed, shard_size, sample_ids):
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"build: meta is missing keys {missing}")
    plan = dict(_norm(meta))
    plan.update(
        format_version=FORMAT_VERSION, vocab_size=int(vocab_size), seq_len=int(seq_len),
        id_bits=id_bits(vocab_size), count_bits=count_bits(U), bytes_per_class=bytes_per_class(vocab_size, U),
        lossless=True, U=int(U), temperature=float(temperature), seed=int(seed), shard_size=int(shard_size),
        num_samples=len(sample_ids), num_shards=math.ceil(len(sample_ids) / shard_size),
        kept_dtype="uint8" if U <= 255 else "uint16",
        samples_sha256=hashlib.sha256(sample_ids.astype("<i8").tobytes()).hexdigest(),
    )
    return plan


def _shard_complete(d, i):
    """The shard's JSON record when the shard is complete (record present, files of recorded size)."""
    rec_path = os.path.join(d, _shard_name(i) + ".json")
    if not os.path.exists(rec_path):
        return None
    try:
        rec = _read_json(rec_path)
    except CacheCorruptError:
        return None
    for f, n in ((rec["data_file"], rec["data_bytes"]), (rec["index_file"], rec["index_bytes"])):
        p = os.path.join(d, f)
        if not os.path.exists(p) or os.path.getsize(p) != n:
            return None
    return rec


class _ShardWriter:
    """Streams one shard's packed classes to a temp file; `close` renames data, index, then the record."""

    def __init__(self, d, i, plan):
        self.d, self.i, self.plan = d, i, plan
        self.name = _shard_name(i)
        for f in os.listdir(d):                       # leftovers of a killed attempt at this shard
            if f.startswith(TMP_PREFIX + self.name + "."):
                os.remove(os.path.join(d, f))
        self.tmp = os.path.join(d, f"{TMP_PREFIX}{self.name}.bin.{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.total = 0
        self.kept, self.sids, self.offsets = [], [], [0]

    def add(self, sample_ids, kept, ids, counts):
        """sample_ids (b,), kept (b, T) classes per position, ids/counts (K,) the classes, row-major."""
        buf = _pack_np(ids, counts, self.plan["vocab_size"], self.plan["U"]).tobytes()
        self.f.write(buf)
        self.h.update(buf)
        per_seq = kept.sum(-1)
        for n in per_seq.tolist():
            self.offsets.append(self.offsets[-1] + int(n))
        self.total += int(per_seq.sum())
        self.kept.append(kept.astype(self.plan["kept_dtype"]))
        self.sids.append(np.asarray(sample_ids, dtype=np.int64))

    def close(self, tokens_sha256):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        d, name = self.d, self.name
        sids = np.concatenate(self.sids)
        idx = (sids.astype("<i8").tobytes() + np.asarray(self.offsets, "<i8").tobytes()
               + np.concatenate(self.kept).astype(np.dtype(self.plan["kept_dtype"]).newbyteorder("<"))
               .tobytes())
        os.replace(self.tmp, os.path.join(d, name + ".bin"))
        atomic_write(os.path.join(d, name + ".idx"), idx)
        rec = dict(index=self.i, num_samples=len(sids), kept=self.total,
                   data_file=name + ".bin", data_bytes=self.total * self.plan["bytes_per_class"],
                   data_sha256=self.h.hexdigest(), index_file=name + ".idx", index_bytes=len(idx),
                   index_sha256=hashlib.sha256(idx).hexdigest(), tokens_sha256=tokens_sha256)
        _write_json(os.path.join(d, name + ".json"), rec)              # last: the shard now counts as done
        return rec


def _tokens_sha(x):
    return hashlib.sha256(np.ascontiguousarray(x.numpy().astype("<i8")).tobytes()).hexdigest()


def _draw(logits, sample_ids, U, temperature, seed, chunk_size):
    """The RS-KD draw of a batch on the logits' device: (b, T, V) -> numpy kept (b, T), ids (K,), counts (K,).

    losses.sample_classes with losses.rs_uniforms: the same call online RS-KD makes, so the classes and
    counts are those of an online run with this seed. Only the kept ids and counts leave the device.
    """
    b, T, V = logits.shape
    u = losses.rs_uniforms(seed, torch.from_numpy(sample_ids), T, U).reshape(b * T, U)
    if chunk_size is None:
        chunk_size = max(1, (_CHUNK if logits.device.type == "cpu" else 16 * _CHUNK) // V)
    ids, counts = losses.sample_classes(logits.reshape(b * T, V), u, temperature, chunk_size)  # (bT, U)
    if not bool((counts.sum(-1) == U).all()):
        raise RuntimeError(f"build: losses.sample_classes returned counts that do not sum to U={U}")
    keep = counts > 0
    return (keep.sum(-1).reshape(b, T).cpu().numpy(), ids[keep].cpu().numpy(), counts[keep].cpu().numpy())


@torch.no_grad()
def build(cache_dir, teacher_fn, input_ids, sample_ids, meta, U=64, temperature=1.0, batch_size=4,
          shard_size=256, seed=0, rank=0, world_size=1, progress=True, chunk_size=None):
    """Run the teacher once over input_ids (N, T) and write the RS-KD cache; returns cache_dir.

    teacher_fn(input_ids (b, T) long, on CPU as given) -> logits (b, T, V), any float dtype, on the
    teacher's device (move the input there inside teacher_fn; do not move the logits to the host: the
    classes are drawn where the logits are). sample_ids (N,) are the stable ids of data.py.
    meta needs teacher, vocab_size, seq_len, tokenizer_fingerprint, data_fingerprint; pass dtype too
    (str of the teacher's dtype: it changes the logits); extra keys are recorded and checked on open.
    Shard i covers sample_ids[i*shard_size:(i+1)*shard_size]; rank r builds the shards with
    i % world_size == r. Complete shards are skipped (resume); a shard interrupted by a kill is rebuilt
    from scratch. With world_size == 1 the header is written here; otherwise call finalize(cache_dir)
    on rank 0 after a barrier. Calling build on a finished cache with the same plan is a no-op; with
    another plan (meta, U, T, seed, samples) it is a CacheMismatchError: nothing is mixed or recomputed.
    chunk_size: rows of the sampler's (rows, V) temporaries (default: ~16 MB of fp32 on CPU, 16x on GPU).
    """
    if not (torch.is_tensor(input_ids) and input_ids.dim() == 2):
        raise ValueError("build: input_ids must be a (N, T) LongTensor")
    if int(shard_size) < 1:
        raise UserError(f"--cache-shard-size (build shard_size) must be >= 1, got {shard_size}")
    sids = torch.as_tensor(sample_ids).to(torch.int64).cpu().numpy().reshape(-1)
    N, T = input_ids.shape
    if len(sids) != N:
        raise ValueError(f"build: sample_ids has {len(sids)} entries for {N} sequences")
    if N == 0:
        raise ValueError("build: no sequences to cache")
    if len(np.unique(sids)) != N:
        raise ValueError("build: sample_ids must be unique (they key the cache)")
    if int(meta.get("seq_len", T)) != T:
        raise ValueError(f"build: meta seq_len={meta['seq_len']} but input_ids has T={T}")
    if not (1 <= U <= MAX_U and temperature > 0 and batch_size >= 1):
        raise ValueError(f"build: need 1 <= U <= {MAX_U}, temperature > 0, batch_size >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"build: rank {rank} not in [0, world_size={world_size})")
    if "vocab_size" not in meta:
        raise ValueError("build: meta is missing 'vocab_size'")
    V = int(meta["vocab_size"])
    plan = _plan(meta, V, T, U, temperature, seed, shard_size, sids)
    if plan["bytes_per_class"] > 3 and rank == 0:
        warnings.warn(f"teacher cache {cache_dir}: V={V} needs {plan['id_bits']} id bits and U={U} needs "
                      f"{plan['count_bits']} count bits: {plan['bytes_per_class']} bytes a class instead of 3 "
                      f"(still lossless)", stacklevel=2)
    os.makedirs(cache_dir, exist_ok=True)
    plan_path = os.path.join(cache_dir, PLAN)
    if os.path.exists(plan_path):
        old = _read_json(plan_path)                                    # never mix two runs in one dir
        _check_format(plan_path, old)
        _diff(plan_path, old, plan, sorted(set(old) | set(plan)))
    else:
        _write_json(plan_path, plan)
    if os.path.exists(os.path.join(cache_dir, HEADER)):
        return cache_dir                                               # finished earlier with this plan

    mine = [i for i in range(plan["num_shards"]) if i % world_size == rank]
    todo = []
    for i in mine:
        rec = _shard_complete(cache_dir, i)
        lo, hi = i * shard_size, min(N, (i + 1) * shard_size)
        if rec is not None:
            if rec["tokens_sha256"] != _tokens_sha(input_ids[lo:hi]):
                raise CacheMismatchError(f"{os.path.join(cache_dir, _shard_name(i) + '.json')}: built from "
                                         f"other tokens than input_ids[{lo}:{hi}] (data changed); use a new "
                                         f"cache_dir")
            continue
        todo.append(i)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        n_todo = sum(min(N, (i + 1) * shard_size) - i * shard_size for i in todo)
        bar = tqdm(total=n_todo, desc=f"teacher cache {cache_dir}", unit="seq")
    for i in todo:
        lo, hi = i * shard_size, min(N, (i + 1) * shard_size)
        w = _ShardWriter(cache_dir, i, plan)
        for s in range(lo, hi, batch_size):
            e = min(hi, s + batch_size)
            logits = teacher_fn(input_ids[s:e])                                   # (b, T, V) on its device
            if tuple(logits.shape) != (e - s, T, V):
                raise ValueError(f"build: teacher_fn returned logits {tuple(logits.shape)}, "
                                 f"expected {(e - s, T, V)} (meta vocab_size={V})")
            w.add(sids[s:e], *_draw(logits, sids[s:e], U, temperature, seed, chunk_size))
            del logits
            if bar is not None:
                bar.update(e - s)
        w.close(_tokens_sha(input_ids[lo:hi]))
    if bar is not None:
        bar.close()
    if world_size == 1:
        finalize(cache_dir)
    return cache_dir


def open_or_build(cache_dir, teacher_fn, packed, meta, U, temperature, seed, shard_size=256, rank=0,
                  world_size=1, barrier=None, progress=True, log=print):
    """The cache of `packed` (data.Packed) at cache_dir: built once if missing (sharded over ranks; `barrier`
    syncs them, then rank 0 writes the header), then opened and checked against this run's numbers."""
    if not os.path.exists(os.path.join(cache_dir, HEADER)):
        log(f"building teacher cache {cache_dir}")
        build(cache_dir, teacher_fn, packed.input_ids, packed.sample_ids, meta, U=U, temperature=temperature,
              seed=seed, rank=rank, world_size=world_size, shard_size=shard_size, progress=progress)
        if barrier is not None:
            barrier()
            if rank == 0:
                finalize(cache_dir)
            barrier()
    return open_cache(cache_dir, dict(meta, U=U, temperature=temperature, seed=seed))



def open_run_caches(cache_dir, teacher_fn, splits, meta, U, temperature, seed, shard_size=256, rank=0,
                    world_size=1, barrier=None, progress=True, log=print):
    """{split: TeacherCache} for a run's packed splits {name: data.Packed}, one cache directory each under
    cache_dir, named by the split, its data fingerprint and the seed (the draws depend on it)."""
    out = {}
    for split, packed in splits.items():
        d = os.path.join(cache_dir, f"{split}-{packed.fingerprint}-seed{seed}")
        out[split] = open_or_build(d, teacher_fn, packed, dict(meta, data_fingerprint=packed.fingerprint), U,
                                   temperature, seed, shard_size, rank, world_size, barrier, progress, log)
    return out

def finalize(cache_dir):
    """Write header.json once every shard of the plan is complete (rank 0 after a barrier in DDP).

    Raises CacheCorruptError listing the missing shards otherwise. Idempotent and deterministic: the
    header has no timestamps, so a resumed build is byte-identical to an uninterrupted one.
    """
    plan_path = os.path.join(cache_dir, PLAN)
    if not os.path.exists(plan_path):
        raise CacheNotFoundError(f"{plan_path}: no build plan; run build() first")
    plan = _read_json(plan_path)
    _check_format(plan_path, plan)
    recs, missing = [], []
    for i in range(plan["num_shards"]):
        rec = _shard_complete(cache_dir, i)
        (missing.append(i) if rec is None else recs.append(rec))
    if missing:
        raise CacheCorruptError(f"{cache_dir}: shards {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                                f"of {plan['num_shards']} are missing or incomplete; rerun build on their "
                                f"ranks")
    positions = plan["num_samples"] * plan["seq_len"]
    kept = sum(r["kept"] for r in recs)
    data_bytes = sum(r["data_bytes"] for r in recs)
    index_bytes = sum(r["index_bytes"] for r in recs)
    header = dict(plan, shards=recs, totals=dict(
        positions=positions, kept_classes=kept, data_bytes=data_bytes, index_bytes=index_bytes,
        mean_kept=kept / positions, bytes_per_position=(data_bytes + index_bytes) / positions,
        index_fraction=index_bytes / max(1, data_bytes)))
    _write_json(os.path.join(cache_dir, HEADER), header)
    return header


# ----------------------------------------------------------------------------- read

class TeacherCache:
    """Read side of a finished cache. Use open_cache(); get(sample_ids) -> (ids, probs = counts / U)."""

    def __init__(self, cache_dir, header, verify):
        self.dir, self.header, self.verify = cache_dir, header, verify
        h = header
        self.V, self.T, self.U = h["vocab_size"], h["seq_len"], h["U"]
        self.nb = h["bytes_per_class"]
        self.kdt = np.dtype(h["kept_dtype"]).newbyteorder("<")
        self.shards = h["shards"]
        sids, offs, where = [], [], []
        for j, r in enumerate(self.shards):
            n = r["num_samples"]
            ip = os.path.join(cache_dir, r["index_file"])
            s = np.fromfile(ip, dtype="<i8", count=2 * n + 1)
            sids.append(s[:n])
            offs.append(s[n:])
            if s[n] != 0 or s[-1] != r["kept"] or (np.diff(s[n:]) < 1).any():
                raise CacheCorruptError(f"{ip}: sequence offsets are inconsistent with kept={r['kept']}")
            where.append(np.stack([np.full(n, j), np.arange(n)], 1))
        self._sids = np.concatenate(sids)                             # (N,) in build order
        self._offs = offs                                              # per shard (n+1,) in classes
        self._where = np.concatenate(where)                            # (N, 2) shard, row
        self._order = np.argsort(self._sids, kind="stable")
        self._sorted = self._sids[self._order]
        if (self._sorted[1:] == self._sorted[:-1]).any():
            raise CacheCorruptError(f"{cache_dir}: duplicate sample ids across shards")
        self._data, self._kept, self._checked = {}, {}, set()

    @property
    def sample_ids(self):
        return torch.from_numpy(self._sids.copy())

    @property
    def bytes_on_disk(self):
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in os.listdir(self.dir)
                   if not f.startswith(TMP_PREFIX))

    def __len__(self):
        return len(self._sids)

    def __contains__(self, sid):
        i = np.searchsorted(self._sorted, int(sid))
        return i < len(self._sorted) and self._sorted[i] == int(sid)

    def _shard(self, j):
        if j not in self._data:
            r = self.shards[j]
            if self.verify == "lazy" and j not in self._checked:
                _verify_shard(self.dir, r, full=True)
                self._checked.add(j)
            n = r["num_samples"]
            self._data[j] = np.memmap(os.path.join(self.dir, r["data_file"]), np.uint8, "r",
                                      shape=(r["kept"] * self.nb,))
            self._kept[j] = np.memmap(os.path.join(self.dir, r["index_file"]), self.kdt, "r",
                                      offset=8 * (2 * n + 1), shape=(n, self.T))
        return self._data[j], self._kept[j]

    def locate(self, sample_ids):
        """(B,) sample ids -> (B, 2) [shard, row]; KeyError naming the ids that are not cached."""
        s = torch.as_tensor(sample_ids).to(torch.int64).cpu().numpy().reshape(-1)
        i = np.searchsorted(self._sorted, s).clip(max=len(self._sorted) - 1)
        bad = self._sorted[i] != s
        if bad.any():
            raise KeyError(f"sample ids {s[bad][:10].tolist()} are not in the teacher cache {self.dir} "
                           f"({len(self._sids)} samples)")
        return self._where[self._order[i]]

    def counts(self, sample_ids):
        """The stored draws, undecoded: ids (K,) int64, counts (K,) int64 of every kept class (position-
        major), and kept (B, T) int64 classes per position."""
        loc = self.locate(sample_ids)
        chunks, kept = [], np.empty((len(loc), self.T), np.int64)
        for b, (j, r) in enumerate(loc):                               # B slices, not B*T
            data, kp = self._shard(int(j))
            o = self._offs[j]
            chunks.append(data[o[r] * self.nb:o[r + 1] * self.nb])
            kept[b] = kp[r]
        cid, cnt = _unpack_np(np.concatenate(chunks).reshape(-1, self.nb), self.V, self.U)
        return cid, cnt, kept

    def get(self, sample_ids, pad_to_u=False):
        """sample_ids (B,) -> ids (B, T, Umax) int64, probs (B, T, Umax) fp32 = counts / U exactly (the
        online RS-KD target); padding has prob 0, id 0. Umax = the most kept classes at any position of
        these rows (U with pad_to_u=True, for static shapes)."""
        cid, cnt, kept = self.counts(sample_ids)
        B, T = kept.shape
        n = kept.reshape(-1)                                          # (B*T,)
        umax = self.U if pad_to_u else int(n.max())
        # classes are stored position-major, so filling the (B*T, umax) slots below each position's
        # count in row-major order puts every class in place without an index computation
        mask = np.arange(umax)[None, :] < n[:, None]                  # (B*T, umax)
        ids = np.zeros((B * T, umax), np.int64)
        probs = np.zeros((B * T, umax), np.float32)
        ids[mask] = cid
        probs[mask] = cnt.astype(np.float32) / np.float32(self.U)     # one correctly rounded fp32 division
        return (torch.from_numpy(ids.reshape(B, T, umax)), torch.from_numpy(probs.reshape(B, T, umax)))

    def check_counts(self, batch=64):
        """Decode every position and check its counts sum to U and its ids are distinct and < V (a
        semantic check on top of the checksums). Returns the number of positions checked."""
        for s in range(0, len(self._sids), batch):
            sids = self._sids[s:s + batch]
            cid, cnt, kept = self.counts(sids)
            n = kept.reshape(-1)
            ok = (n >= 1).all() and n.sum() == len(cnt)
            if ok:
                sums = np.add.reduceat(cnt, np.concatenate([[0], np.cumsum(n)[:-1]]))
                pos = np.repeat(np.arange(len(n)), n)
                ok = ((sums == self.U).all() and (cid < self.V).all()
                      and len(np.unique(pos * self.V + cid)) == len(cid))
            if not ok:
                raise CacheCorruptError(f"{self.dir}: sample ids {sids[:4].tolist()}...: stored counts do not "
                                        f"sum to U={self.U} at every position (or repeat a class): rebuild")
        return len(self._sids) * self.T


def _verify_shard(d, rec, full):
    for f, n, h in ((rec["data_file"], rec["data_bytes"], rec["data_sha256"]),
                    (rec["index_file"], rec["index_bytes"], rec["index_sha256"])):
        p = os.path.join(d, f)
        if not os.path.exists(p):
            raise CacheCorruptError(f"{p}: missing shard file")
        if os.path.getsize(p) != n:
            raise CacheCorruptError(f"{p}: truncated or wrong size: {os.path.getsize(p)} bytes, "
                                    f"header says {n}")
        if full and _sha256_file(p) != h:
            raise CacheCorruptError(f"{p}: sha256 checksum mismatch: the file is corrupted (rebuild the cache)")


def _read_header(cache_dir):
    if not os.path.isdir(cache_dir):
        raise CacheNotFoundError(f"{cache_dir}: teacher cache directory does not exist")
    hp = os.path.join(cache_dir, HEADER)
    if not os.path.exists(hp):
        if os.path.exists(os.path.join(cache_dir, PLAN)):
            raise CacheCorruptError(f"{hp}: missing: the build of this cache is incomplete "
                                    f"(rerun build with the same arguments to resume)")
        inside = sorted(f for f in os.listdir(cache_dir) if any(
            os.path.exists(os.path.join(cache_dir, f, x)) for x in (HEADER, PLAN)))
        if inside:  # a --cache-dir root: its caches are one folder per split
            raise CacheNotFoundError(f"{cache_dir} is a --cache-dir root, not one teacher cache: its caches are "
                                     f"the folders {', '.join(inside[:6])}{' ...' if len(inside) > 6 else ''} "
                                     f"(inspect one of them)")
        raise CacheNotFoundError(f"{hp}: missing: {cache_dir} is not a teacher cache")
    h = _read_json(hp)
    if not isinstance(h, dict):
        raise CacheCorruptError(f"{hp}: not a cache header (a JSON object expected)")
    _check_format(hp, h)
    return h


def open_cache(cache_dir, expect=None, verify="full"):
    """Open a finished cache; `expect` = meta keys + U + temperature (+ seed) of this run (None: no check).

    Every key of expect is compared, and so is `dtype` whenever the cache recorded it (a run that does not
    say its dtype cannot reuse a cache built under a known one). verify: "full" checks sizes and sha256
    of every file now (~1.5 s per GB on one core), "lazy" checks sizes now and each shard's sha256 on its
    first read, "size" only sizes. Raises CacheMismatchError (names header.json and each differing key,
    or an old format: rebuild), CacheCorruptError (names the file), CacheNotFoundError: all UserError.
    """
    if verify not in ("full", "lazy", "size"):
        raise ValueError(f"open_cache: verify must be 'full', 'lazy' or 'size', got {verify!r}")
    cache_dir = os.fspath(cache_dir)
    h = _read_header(cache_dir)
    if expect is not None:
        keys = list(expect) + [k for k in _OPTIONAL_KEYS if k in h and k not in expect]
        _diff(os.path.join(cache_dir, HEADER), h, expect, keys)
    for r in h["shards"]:
        _verify_shard(cache_dir, r, full=verify == "full")
    return TeacherCache(cache_dir, h, verify)


# ----------------------------------------------------------------------------- selection cache

def save_selection(path, kept_ids, config):
    """Store the sample ids kept by sample selection (top-l% by s_i) with the scoring config.

    config must be JSON-serialisable and must contain 'data_fingerprint' (a selection is only valid
    for the data set it was scored on); include everything that changes the scores (student
    checkpoint, metric, l, seq_len, seed...). Written atomically.
    """
    if "data_fingerprint" not in config:
        raise ValueError("save_selection: config must contain 'data_fingerprint' so another data set "
                         "never reuses this selection")
    ids = torch.as_tensor(kept_ids).to(torch.int64).reshape(-1).tolist()
    _write_json(path, dict(format_version=SELECTION_VERSION, config=_norm(config), num_kept=len(ids),
                           kept_ids=ids))


def load_selection(path, config):
    """Kept sample ids (K,) LongTensor, or None when `path` is absent or was scored with another config
    (the caller then rescores and overwrites). config must contain 'data_fingerprint' (see save)."""
    if "data_fingerprint" not in config:
        raise ValueError("load_selection: config must contain 'data_fingerprint'")
    if not os.path.exists(path):
        return None
    d = _read_json(path)
    if not isinstance(d, dict) or "kept_ids" not in d or len(d["kept_ids"]) != d.get("num_kept"):
        raise CacheCorruptError(f"{path}: not a valid selection file")
    if d.get("format_version") != SELECTION_VERSION or d["config"] != _norm(config):
        return None
    return torch.tensor(d["kept_ids"], dtype=torch.int64)


def cached_selection(root, config, select, save=True):
    """The kept sample ids for `config`, from root/selections/<hash of config>.json when a run already scored
    them (the other runs of a table reuse one scoring), else select() and (when `save`) store them there."""
    path = os.path.join(root, "selections", f"{seed_from(sorted(config.items())):x}.json")
    kept = load_selection(path, config)
    if kept is None:
        kept = select()
        if save:
            save_selection(path, kept, config)
    return kept

# ----------------------------------------------------------------------------- CLI

def _cmd_estimate(a):
    est = estimate_storage(a.tokens, a.vocab, a.u, a.l)
    nb = bytes_per_class(a.vocab, a.u)
    print(f"Teacher-target storage (paper Table 6): {a.tokens:.3g} tokens, V={a.vocab}, U={a.u}, l={a.l}, "
          f"{nb} bytes/class ({id_bits(a.vocab)} id + {count_bits(a.u)} count bits, lossless)\n")
    print("| method | bytes/position | TB |")
    print("|---|---:|---:|")
    for k, v in est.items():
        print(f"| {k} | {v['bytes_per_position']:,.1f} | {v['tb']:,.2f} |")
    full = est["Full KD (fp16 logits)"]
    print(f"\nFull KD: 2 bytes x V={a.vocab:,} fp16 logits = {full['bytes_per_position']:,.0f} bytes a "
          f"position, "
          f"x {a.tokens:.3g} positions = {full['tb']:,.0f} TB.")
    print(f"RS-KD: at most U={a.u} classes x {nb} bytes (a cache keeps unique classes, + ~1 index byte a "
          f"position: `cache.py inspect DIR` measures one).")
    print("CE only: 0 TB, nothing to store: its target is the next token, already in the training data.")


def _cmd_inspect(a):
    h = _read_header(a.dir)
    c = open_cache(a.dir, verify="size" if a.no_verify else "full")
    for rec in h["shards"]:  # each shard's own record must agree with the header's copy of it
        path = os.path.join(a.dir, _shard_name(rec["index"]) + ".json")
        if not os.path.exists(path):
            raise CacheCorruptError(f"{path}: missing shard record")
        if _read_json(path) != rec:
            raise CacheCorruptError(f"{path}: shard record differs from {HEADER}'s: the file is corrupt (rebuild)")
    checked = 0 if a.no_verify else c.check_counts()
    show = {k: v for k, v in h.items() if k not in ("shards", "totals")}
    print(json.dumps(show, indent=1, sort_keys=True))
    t = h["totals"]
    files = [f for f in os.listdir(a.dir) if not f.startswith(TMP_PREFIX)]
    disk = sum(os.path.getsize(os.path.join(a.dir, f)) for f in files)
    print(f"format                 {h['format_version']}: {h['bytes_per_class']} bytes/class = "
          f"{h['id_bits']} id + {h['count_bits']} count bits (count - 1), whole bytes")
    print(f"lossless               yes: targets are the exact counts / U={h['U']} of the draw "
          f"(nothing rounded)")
    if a.no_verify:
        print("verified               sizes only (--no-verify): checksums and counts NOT checked")
    else:
        print(f"verified               sha256 of {2 * len(h['shards'])} files ok; counts sum to U at all "
              f"{checked:,} positions")
    print(f"shards                 {len(h['shards'])}")
    print(f"positions              {t['positions']:,}")
    print(f"mean kept classes      {t['kept_classes'] / t['positions']:.2f} (of U={h['U']})")
    print(f"data bytes/position    {t['data_bytes'] / t['positions']:.2f}")
    print(f"index bytes/position   {t['index_bytes'] / t['positions']:.2f} "
          f"({100 * t['index_bytes'] / max(1, t['data_bytes']):.2f}% of data)")
    print(f"bytes/position (all)   {disk / t['positions']:.2f} measured on disk ({disk:,} bytes, incl. JSON)")


def _cmd_bench(a):
    """Synthetic cache with a realistic kept-class count; times TeacherCache.get on random batches."""
    V, T, U = a.vocab, a.seq_len, a.u
    for flag, v in (("--vocab", V), ("--seq-len", T), ("--u", U), ("--kept", a.kept), ("--samples", a.samples),
                    ("--shard-size", a.shard_size), ("--iters", a.iters), ("--batch", a.batch)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if U > MAX_U or a.kept > U or a.batch > a.samples:
        raise UserError(f"need --kept <= --u <= {MAX_U} and --batch <= --samples; got --kept {a.kept}, --u {U}, "
                        f"--batch {a.batch}, --samples {a.samples}")
    rng = np.random.default_rng(0)
    meta = dict(teacher="bench", vocab_size=V, seq_len=T, tokenizer_fingerprint="-", data_fingerprint="-")
    N = a.samples
    with tempfile.TemporaryDirectory() as d:
        sids = np.arange(N, dtype=np.int64) * 7 + 3
        plan = _plan(meta, V, T, U, 1.0, 0, a.shard_size, sids)
        _write_json(os.path.join(d, PLAN), plan)
        t0 = time.time()
        for i in range(plan["num_shards"]):
            lo, hi = i * a.shard_size, min(N, (i + 1) * a.shard_size)
            w = _ShardWriter(d, i, plan)
            for s in range(lo, hi):
                kept = rng.integers(max(1, a.kept // 2), min(U, a.kept * 3 // 2) + 1, size=(1, T))
                K = int(kept.sum())
                w.add(sids[s:s + 1], kept, rng.integers(0, V, size=K), rng.integers(1, U + 1, size=K))
            w.close("-")
        finalize(d)
        t_write = time.time() - t0
        t0 = time.time()
        c = open_cache(d, verify="full")
        t_open = time.time() - t0
        c.get(sids[:a.batch])                                         # warm the page cache path
        times = []
        for _ in range(a.iters):
            b = rng.choice(sids, size=a.batch, replace=False)
            t0 = time.perf_counter()
            ids, probs = c.get(torch.from_numpy(b))
            times.append(time.perf_counter() - t0)
        ms = 1000 * float(np.median(times))
        print(f"cache: {N} x {T} positions, V={V}, U={U}, ~{a.kept} kept/position, "
              f"{c.bytes_on_disk / 1e6:.1f} MB on disk (write {t_write:.1f}s, open+sha256 {t_open:.2f}s)")
        print(f"get(B={a.batch}): median {ms:.2f} ms -> {a.batch * T / ms * 1e3 / 1e6:.2f} M positions/s, "
              f"output {tuple(ids.shape)}")


def main(argv=None):
    p = ArgumentParser(prog="cache.py", description="nano-sekd teacher cache (RS-KD, paper Sec. 7.1 / App. E)")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate", help="storage table of paper Table 6")
    e.add_argument("--tokens", type=float, default=100e9)
    e.add_argument("--vocab", type=int, default=100_000)
    e.add_argument("--u", type=int, default=64)
    e.add_argument("--l", type=float, default=0.2, help="fraction of samples kept by sample selection")
    e.set_defaults(fn=_cmd_estimate)
    i = sub.add_parser("inspect", help="verify a cache directory (checksums, counts) and show its sizes")
    i.add_argument("dir")
    i.add_argument("--no-verify", action="store_true", help="check file sizes only (skip sha256 and counts)")
    i.set_defaults(fn=_cmd_inspect)
    b = sub.add_parser("bench", help="time TeacherCache.get on a synthetic cache")
    b.add_argument("--vocab", type=int, default=151_936)
    b.add_argument("--seq-len", type=int, default=2048)
    b.add_argument("--u", type=int, default=64)
    b.add_argument("--kept", type=int, default=30, help="mean kept classes per position")
    b.add_argument("--samples", type=int, default=256)
    b.add_argument("--shard-size", type=int, default=64)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--iters", type=int, default=20)
    b.set_defaults(fn=_cmd_bench)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (UserError, ValueError) as err:                             # known bad input: one line, exit 2
        print(f"cache.py {a.cmd}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
