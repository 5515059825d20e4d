"""Offline teacher cache for RS-KD: run the teacher once, train many students from disk.

Selective KD (Tavor et al., "Rethinking Selective Knowledge Distillation") supervises the student
q_t with the teacher p_t at each position t. Holding the teacher in memory next to every student run
is the dominant cost, so Sec. 7.1 / Appendix E cache a *sparse, unbiased* sketch of p_t instead of the
V-dimensional logits (RS-KD, random-sampling KD):

    per position t: draw U classes i.i.d. from p_t^(T) = softmax(z_t / T)       (with replacement)
                    keep the unique ids c with their counts n_c,   p_hat_t(c) = n_c / U
    E[p_hat_t(c)] = p_t^(T)(c)  ->  KL(p_hat_t || q_t) is an unbiased estimate of the dense target term

Each kept class is stored as an id and a quantized probability packed into one little-endian word:

    id_bits   = ceil(log2 V)
    prob_bits = 24 - id_bits           -> 3 bytes per class   (when that leaves >= 5 bits)
              = 32 - id_bits           -> 4 bytes per class   (otherwise, e.g. V = 2^21)
    word      = id | q << id_bits,     decoded prob = q / (2^prob_bits - 1)

V = 151,936 (Qwen3) needs 18 id bits: packing ids in 17 bits (as the published code does) silently
maps every id >= 131,072 onto another class. Here ids are always exact, and pack_classes refuses ids
that do not fit.

Quantization (`quantize`) is largest-remainder rounding of p_hat * M, M = 2^prob_bits - 1, so the
integers of every position sum to exactly M (decoded probs sum to exactly 1). Decision on tiny
classes: a sampled class could round to q = 0 at small prob_bits; whenever a position has
k <= M kept classes we move single units from the largest q's so that every kept class gets q >= 1
(a sampled class is never silently dropped). Only when k > M (possible only for prob_bits <= 6 with
U = 64, e.g. Qwen3's vocab) do some classes stay at 0; `build` does not store q = 0 entries (they carry
no mass). Rounding moves each decoded prob by at most about 1/M (+ k/M for the >= 1 rule), which is
negligible at 14 bits (V ~ 1000) and visible at 6 bits (V = 151,936).

On-disk layout of a cache directory (all files written to a temp name + os.replace):

    build.json              the plan: meta + format params; a resumed build must match it exactly
    shard_00000.bin         ragged packed classes of the shard, (K, bytes_per_class) uint8
    shard_00000.idx         index, raw little-endian: sample_ids int64 (n) | seq_offsets int64 (n+1)
                            | counts (n, seq_len) uint8 (uint16 when U > 255), kept classes per position
    shard_00000.json        per-shard sizes + sha256 checksums; written LAST: marks the shard complete
    header.json             plan + all shard records + totals; written by `finalize` once every shard exists

Storage per position = bytes_per_class x kept classes + 1 byte of count (+ 16 bytes per sequence):
the index is < 5% of the data whenever the mean kept classes is >= 7 (3-byte classes); position
offsets are derived from the counts at read time instead of being stored as int64 (8 bytes/position
would be ~10% of the data at a typical 25-30 kept classes).

Entries are keyed by the stable sample id (data.py) and the position t in [0, seq_len). The random
draws of a sequence depend only on (seed, sample_id) (one torch.Generator per sequence), never on the
batch composition, the rank or the resume point, so two rows of one batch with identical tokens still
get independent draws, and a resumed or distributed build is byte-identical to a one-shot build.

Read path: `open_cache(dir, expect)` checks the header against the run (teacher, vocab, seq_len,
tokenizer, data, U, temperature) and every file's size (and by default its sha256, ~0.7 GB/s on one
CPU core; pass verify="lazy" to check each shard on first read instead); `TeacherCache.get(sample_ids)`
returns dense padded tensors (ids (B, T, Umax) long, probs (B, T, Umax) fp32) from np.memmap with
vectorised numpy only (`python cache.py bench` measures it).

Table 6 of the paper (storage for 100B tokens, V = 100k): `python cache.py estimate --tokens 100e9
--vocab 100000 --u 64 --l 0.2`.
"""

import argparse
import hashlib
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

FORMAT_VERSION = 1
HEADER = "header.json"
PLAN = "build.json"
_META_KEYS = ("teacher", "vocab_size", "seq_len", "tokenizer_fingerprint", "data_fingerprint")
_CHUNK = 1 << 22  # elements of a (rows, V) block in the softmax/cumsum: bounds peak memory (~32 MB fp64)


class CacheMismatchError(ValueError):
    """The cache on disk was built for another run (teacher, vocab, data, U, temperature, ...)."""


class CacheCorruptError(ValueError):
    """A cache file is missing, truncated or fails its checksum."""


# ----------------------------------------------------------------------------- format

def id_bits(vocab_size):
    """ceil(log2 V): bits needed to store every class id 0..V-1 exactly."""
    if int(vocab_size) < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, (int(vocab_size) - 1).bit_length())


def bytes_per_class(vocab_size):
    """3 when ceil(log2 V) leaves >= 5 probability bits in 24, else 4 (Appendix E)."""
    b = id_bits(vocab_size)
    if 24 - b >= 5:
        return 3
    if 32 - b >= 5:
        return 4
    raise ValueError(f"vocab_size {vocab_size} needs {b} id bits: too large for a 4-byte class")


def prob_bits(vocab_size):
    """Bits left for the quantized probability once the id is stored exactly."""
    return 8 * bytes_per_class(vocab_size) - id_bits(vocab_size)


def quantize(probs, prob_bits):
    """Largest-remainder quantization of each row of probs to integers summing to 2^prob_bits - 1.

    probs: (N, U) float (typically counts / U; 0 = padding; rows need not sum exactly to 1, they are
    normalised first). Returns int64 (N, U) q with q.sum(-1) == M = 2^prob_bits - 1 for every row with
    any mass, 0 on padding and on all-zero rows. Every kept class gets q >= 1 when the row has at most
    M kept classes (see module docstring); decode with q / M.
    """
    p = torch.as_tensor(probs)
    if p.dim() != 2:
        raise ValueError(f"quantize: probs must be (N, U), got shape {tuple(p.shape)}")
    if int(prob_bits) < 1:
        raise ValueError(f"quantize: prob_bits must be >= 1, got {prob_bits}")
    p = p.to(torch.float64)
    if bool((p < 0).any()) or not bool(torch.isfinite(p).all()):
        raise ValueError("quantize: probs must be finite and >= 0")
    M = (1 << int(prob_bits)) - 1
    kept = p > 0                                                      # (N, U)
    tot = p.sum(-1, keepdim=True)                                     # (N, 1)
    x = p / tot.clamp_min(1e-300) * M                                 # (N, U) ideal real values
    f = x.floor()
    r = torch.where(kept, x - f, torch.full_like(x, -1.0))            # padding sorts last
    q = f.to(torch.int64)
    deficit = M - q.sum(-1)                                           # (N,) units still to hand out
    order = torch.argsort(r, dim=-1, descending=True, stable=True)    # ties -> lower slot first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(p.shape[1], device=p.device).expand_as(order))
    q = q + ((rank < deficit[:, None]) & kept).to(torch.int64)
    q = torch.where(kept, q, torch.zeros_like(q))
    live = kept.any(-1)                                               # rows with mass
    # fp rounding can leave the sum off by a unit in pathological rows: settle it on the largest entry
    diff = torch.where(live, M - q.sum(-1), torch.zeros_like(deficit))
    if bool((diff != 0).any()):
        q.scatter_add_(1, q.argmax(-1, keepdim=True), diff[:, None])
    # every kept class >= 1 when possible: move one unit from the row's largest q per zero
    fixable = kept.sum(-1) <= M
    rows = torch.arange(p.shape[0], device=p.device)
    while True:
        zero = kept & (q == 0) & fixable[:, None]                     # (N, U)
        need = zero.any(-1)
        if not bool(need.any()):
            break
        first = zero.to(torch.int8).argmax(-1)                        # first zero slot per row
        big = q.argmax(-1)                                            # its donor (>= 2, see docstring)
        step = need.to(torch.int64)
        q[rows, first] += step
        q[rows, big] -= step
    return q


def _pack_np(ids, q, vocab_size):
    ib, pb, nb = id_bits(vocab_size), prob_bits(vocab_size), bytes_per_class(vocab_size)
    ids = np.asarray(ids).astype(np.int64, copy=False)
    q = np.asarray(q).astype(np.int64, copy=False)
    if ids.shape != q.shape:
        raise ValueError(f"pack_classes: ids {ids.shape} and q {q.shape} differ in shape")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"pack_classes: ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    if q.size and (q.min() < 0 or q.max() >= (1 << pb)):
        raise ValueError(f"pack_classes: q must lie in [0, {1 << pb}) for {pb} prob bits, got max {q.max()}")
    w = (ids.astype(np.uint32) | (q.astype(np.uint32) << np.uint32(ib))).astype("<u4")
    return w[..., None].view(np.uint8)[..., :nb]                      # (..., nb) little-endian bytes


def _unpack_np(buf, vocab_size):
    ib, nb = id_bits(vocab_size), bytes_per_class(vocab_size)
    b = np.asarray(buf, dtype=np.uint8)
    if b.shape[-1:] != (nb,):
        raise ValueError(f"unpack_classes: last dim must be {nb} bytes for vocab_size {vocab_size}, "
                         f"got shape {b.shape}")
    w4 = np.zeros(b.shape[:-1] + (4,), np.uint8)                      # widen to one uint32 per class
    w4[..., :nb] = b
    w = w4.view("<u4")[..., 0]
    ids = (w & np.uint32((1 << ib) - 1)).astype(np.int64)
    q = (w >> np.uint32(ib)).astype(np.int64)
    return ids, q


def pack_classes(ids, q, vocab_size):
    """Pack class ids (N, U) and quantized probs q (N, U) into np.uint8 (N, U, bytes_per_class).

    Works for any shape (..., ) -> (..., bytes_per_class). Raises ValueError on ids outside [0, V) or
    q that does not fit prob_bits, so nothing is ever silently truncated.
    """
    to_np = lambda a: a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    return np.ascontiguousarray(_pack_np(to_np(ids), to_np(q), int(vocab_size)))


def unpack_classes(buf, vocab_size):
    """Inverse of pack_classes: uint8 (..., bytes_per_class) -> (ids, q), both int64 torch tensors (...)."""
    if torch.is_tensor(buf):
        buf = buf.detach().cpu().numpy()
    ids, q = _unpack_np(buf, int(vocab_size))
    return torch.from_numpy(ids), torch.from_numpy(q)


# ----------------------------------------------------------------------------- storage estimate

def estimate_storage(tokens, vocab, u, l):
    """Paper Table 6: teacher-target storage for `tokens` positions, in bytes/position and TB (1e12 B).

    Full KD stores fp16 logits (2V bytes); RS-KD stores at most U classes of bytes_per_class(V) bytes
    (an upper bound: the format stores unique classes only, plus ~1 byte/position of index); SE-KD_3X
    caches only the top-l fraction of samples (U x l); CE only needs no teacher storage at all (the
    target token is already in the training data), so it is 0.
    Returns {row label: {"bytes_per_position": float, "tb": float}} in table order.
    """
    tokens, vocab, u, l = float(tokens), int(vocab), int(u), float(l)
    if tokens < 0 or u < 1 or not 0 <= l <= 1:
        raise ValueError(f"estimate_storage: need tokens >= 0, u >= 1, 0 <= l <= 1; got {tokens}, {u}, {l}")
    rs = u * bytes_per_class(vocab)
    rows = {
        "Full KD (fp16 logits)": 2.0 * vocab,
        f"RS-KD (U={u})": float(rs),
        "SE-KD_3X (U x l)": rs * l,
        "CE only": 0.0,
    }
    return {k: {"bytes_per_position": b, "tb": b * tokens / 1e12} for k, b in rows.items()}


# ----------------------------------------------------------------------------- small file helpers

def atomic_write(path, data):
    """Write str or bytes to `path` atomically: a temp file in the same directory, fsync, then
    os.replace, so a reader sees the old file or the whole new one, never a half-written file.
    The project's other writers (train.py, eval.py, ifeval.py) use this too."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp." + os.path.basename(path) + ".", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise



def _write_json(path, obj):
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CacheCorruptError(f"{path}: not valid JSON ({e}); the file is truncated or corrupted") from None


def _norm(x):
    """JSON round trip so tuples/ints/floats compare the same as after writing to disk."""
    return json.loads(json.dumps(x, sort_keys=True))


def _sha256_file(path, bufsize=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _seq_seed(seed, sample_id):
    """63-bit generator seed from (seed, sample_id) only: independent of batch, rank and resume point."""
    d = hashlib.sha256(f"nano-sekd/rs-kd/{int(seed)}/{int(sample_id)}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


def _shard_name(i):
    return f"shard_{i:05d}"


def _diff(file, have, want, keys):
    bad = [f"{k}: cache={have.get(k, '<absent>')!r} run={want.get(k, '<absent>')!r}" for k in keys
           if k not in have or k not in want or _norm(have[k]) != _norm(want[k])]
    if bad:
        raise CacheMismatchError(f"{file}: cache does not match this run: " + "; ".join(bad))


# ----------------------------------------------------------------------------- sampling

def sample_classes(logits, u, temperature, prob_bits):
    """RS-KD draw for a block of positions.

    logits: (R, V) any float dtype/device; u: (R, U) float64 uniforms in [0, 1) (from the per-sequence
    generators). Inverse-CDF sampling of softmax(logits / T) in fp32 (cumsum in fp64, so the V-long
    sum does not drift), then unique ids with counts. Returns ids (R, U) int64 ascending with the kept
    classes first (padding id 0) and q (R, U) int64 quantized probs (0 = padding / dropped).
    """
    R, V = logits.shape
    U = u.shape[1]
    ids = torch.empty(R, U, dtype=torch.int64, device=logits.device)
    step = max(1, (_CHUNK if logits.device.type == "cpu" else 16 * _CHUNK) // V)  # GPU: fewer, larger kernels
    u = u.to(logits.device)
    for s in range(0, R, step):
        p = torch.softmax(logits[s:s + step].float() / temperature, dim=-1)        # (r, V) fp32
        cdf = torch.cumsum(p, dim=-1, dtype=torch.float64)                       # (r, V)
        tgt = u[s:s + step] * cdf[:, -1:]                                        # (r, U)
        ids[s:s + step] = torch.searchsorted(cdf, tgt, right=True).clamp_(max=V - 1)
        del p, cdf
    srt = ids.sort(-1).values                                                    # (R, U)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    g = new.long().cumsum(-1) - 1                                                # group index
    cnt = torch.zeros_like(srt).scatter_add_(1, g, torch.ones_like(srt))         # (R, U) counts
    uid = torch.zeros_like(srt).scatter_(1, g, srt)                              # (R, U) unique ids
    q = quantize(cnt.double() / U, prob_bits)
    return uid, q


# ----------------------------------------------------------------------------- build

def _plan(meta, vocab_size, seq_len, U, temperature, seed, shard_size, sample_ids):
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"build: meta is missing keys {missing}")
    plan = dict(_norm(meta))
    plan.update(
        format_version=FORMAT_VERSION, vocab_size=int(vocab_size), seq_len=int(seq_len),
        id_bits=id_bits(vocab_size), prob_bits=prob_bits(vocab_size),
        bytes_per_class=bytes_per_class(vocab_size), U=int(U), temperature=float(temperature),
        seed=int(seed), shard_size=int(shard_size), num_samples=len(sample_ids),
        num_shards=math.ceil(len(sample_ids) / shard_size),
        count_dtype="uint8" if U <= 255 else "uint16",
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
            if f.startswith(".tmp." + self.name + "."):
                os.remove(os.path.join(d, f))
        self.tmp = os.path.join(d, f".tmp.{self.name}.bin.{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.kept = 0
        self.counts, self.sids, self.offsets = [], [], [0]

    def add(self, sample_ids, counts, ids, q):
        """sample_ids (b,), counts (b, T) kept per position, ids/q (K,) kept classes in row-major order."""
        buf = _pack_np(ids, q, self.plan["vocab_size"]).tobytes()
        self.f.write(buf)
        self.h.update(buf)
        per_seq = counts.sum(-1)
        for n in per_seq.tolist():
            self.offsets.append(self.offsets[-1] + int(n))
        self.kept += int(per_seq.sum())
        self.counts.append(counts.astype(self.plan["count_dtype"]))
        self.sids.append(np.asarray(sample_ids, dtype=np.int64))

    def close(self, tokens_sha256):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        d, name = self.d, self.name
        sids = np.concatenate(self.sids)
        idx = (sids.astype("<i8").tobytes() + np.asarray(self.offsets, "<i8").tobytes()
               + np.concatenate(self.counts).astype(np.dtype(self.plan["count_dtype"]).newbyteorder("<")).tobytes())
        os.replace(self.tmp, os.path.join(d, name + ".bin"))
        atomic_write(os.path.join(d, name + ".idx"), idx)
        rec = dict(index=self.i, num_samples=len(sids), kept=self.kept,
                   data_file=name + ".bin", data_bytes=self.kept * self.plan["bytes_per_class"],
                   data_sha256=self.h.hexdigest(), index_file=name + ".idx", index_bytes=len(idx),
                   index_sha256=hashlib.sha256(idx).hexdigest(), tokens_sha256=tokens_sha256)
        _write_json(os.path.join(d, name + ".json"), rec)              # last: the shard now counts as done
        return rec


def _tokens_sha(x):
    return hashlib.sha256(np.ascontiguousarray(x.numpy().astype("<i8")).tobytes()).hexdigest()


@torch.no_grad()
def build(cache_dir, teacher_fn, input_ids, sample_ids, meta, U=64, temperature=1.0, batch_size=4,
          shard_size=256, seed=0, rank=0, world_size=1, progress=True):
    """Run the teacher once over input_ids (N, T) and write the RS-KD cache; returns cache_dir.

    teacher_fn(input_ids (b, T) long, on CPU as given) -> logits (b, T, V), any float dtype/device (move
    the input to the teacher's device inside teacher_fn). sample_ids (N,) are the stable ids of data.py.
    meta needs teacher, vocab_size, seq_len, tokenizer_fingerprint, data_fingerprint (extra keys kept).
    Shard i covers sample_ids[i*shard_size:(i+1)*shard_size]; rank r builds the shards with
    i % world_size == r. Complete shards are skipped (resume); a shard interrupted by a kill is rebuilt
    from scratch. With world_size == 1 the header is written here; otherwise call finalize(cache_dir)
    on rank 0 after a barrier. Calling build on a finished cache with the same plan is a no-op; with
    another plan (meta, U, T, seed, samples) it is a CacheMismatchError: nothing is mixed or recomputed.
    """
    if not (torch.is_tensor(input_ids) and input_ids.dim() == 2):
        raise ValueError("build: input_ids must be a (N, T) LongTensor")
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
    if not (1 <= U <= 65535 and temperature > 0 and shard_size >= 1 and batch_size >= 1):
        raise ValueError(f"build: need 1 <= U <= 65535, temperature > 0, shard_size >= 1, batch_size >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"build: rank {rank} not in [0, world_size={world_size})")
    V = int(meta["vocab_size"]) if "vocab_size" in meta else None
    if V is None:
        raise ValueError("build: meta is missing 'vocab_size'")
    plan = _plan(meta, V, T, U, temperature, seed, shard_size, sids)
    os.makedirs(cache_dir, exist_ok=True)
    plan_path = os.path.join(cache_dir, PLAN)
    if os.path.exists(plan_path):
        old = _read_json(plan_path)                                    # never mix two runs in one dir
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
                                         f"other tokens than input_ids[{lo}:{hi}] (data changed); use a new cache_dir")
            continue
        todo.append(i)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        n_todo = sum(min(N, (i + 1) * shard_size) - i * shard_size for i in todo)
        bar = tqdm(total=n_todo, desc=f"teacher cache {cache_dir}", unit="seq")
    pb = plan["prob_bits"]
    for i in todo:
        lo, hi = i * shard_size, min(N, (i + 1) * shard_size)
        w = _ShardWriter(cache_dir, i, plan)
        for s in range(lo, hi, batch_size):
            e = min(hi, s + batch_size)
            logits = teacher_fn(input_ids[s:e])                                   # (b, T, V)
            if tuple(logits.shape) != (e - s, T, V):
                raise ValueError(f"build: teacher_fn returned logits {tuple(logits.shape)}, "
                                 f"expected {(e - s, T, V)} (meta vocab_size={V})")
            u = torch.cat([torch.rand(T, U, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(_seq_seed(seed, sid)))
                           for sid in sids[s:e]])                                 # (b*T, U)
            ids, q = sample_classes(logits.reshape((e - s) * T, V), u, temperature, pb)
            keep = q > 0                                                          # (b*T, U)
            counts = keep.sum(-1).reshape(e - s, T).cpu().numpy()
            w.add(sids[s:e], counts, ids[keep].cpu().numpy(), q[keep].cpu().numpy())
            if bar is not None:
                bar.update(e - s)
        w.close(_tokens_sha(input_ids[lo:hi]))
    if bar is not None:
        bar.close()
    if world_size == 1:
        finalize(cache_dir)
    return cache_dir


def finalize(cache_dir):
    """Write header.json once every shard of the plan is complete (rank 0 after a barrier in DDP).

    Raises CacheCorruptError listing the missing shards otherwise. Idempotent and deterministic: the
    header has no timestamps, so a resumed build is byte-identical to an uninterrupted one.
    """
    plan_path = os.path.join(cache_dir, PLAN)
    if not os.path.exists(plan_path):
        raise FileNotFoundError(f"{plan_path}: no build plan; run build() first")
    plan = _read_json(plan_path)
    recs, missing = [], []
    for i in range(plan["num_shards"]):
        rec = _shard_complete(cache_dir, i)
        (missing.append(i) if rec is None else recs.append(rec))
    if missing:
        raise CacheCorruptError(f"{cache_dir}: shards {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                                f"of {plan['num_shards']} are missing or incomplete; rerun build on their ranks")
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
    """Read side of a finished cache. Use open_cache(); get(sample_ids) -> (ids, probs)."""

    def __init__(self, cache_dir, header, verify):
        self.dir, self.header, self.verify = cache_dir, header, verify
        h = header
        self.V, self.T, self.U = h["vocab_size"], h["seq_len"], h["U"]
        self.nb = h["bytes_per_class"]
        self.M = (1 << h["prob_bits"]) - 1
        self.cdt = np.dtype(h["count_dtype"]).newbyteorder("<")
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
        self._data, self._counts, self._checked = {}, {}, set()

    @property
    def sample_ids(self):
        return torch.from_numpy(self._sids.copy())

    @property
    def bytes_on_disk(self):
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in os.listdir(self.dir)
                   if not f.startswith(".tmp."))

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
            self._counts[j] = np.memmap(os.path.join(self.dir, r["index_file"]), self.cdt, "r",
                                        offset=8 * (2 * n + 1), shape=(n, self.T))
        return self._data[j], self._counts[j]

    def locate(self, sample_ids):
        """(B,) sample ids -> (B, 2) [shard, row]; KeyError naming the ids that are not cached."""
        s = torch.as_tensor(sample_ids).to(torch.int64).cpu().numpy().reshape(-1)
        i = np.searchsorted(self._sorted, s).clip(max=len(self._sorted) - 1)
        bad = self._sorted[i] != s
        if bad.any():
            raise KeyError(f"sample ids {s[bad][:10].tolist()} are not in the teacher cache {self.dir} "
                           f"({len(self._sids)} samples)")
        return self._where[self._order[i]]

    def get(self, sample_ids, pad_to_u=False):
        """sample_ids (B,) -> ids (B, T, Umax) int64, probs (B, T, Umax) fp32; padding has prob 0, id 0.

        Umax = the most kept classes at any position of these rows (U with pad_to_u=True, for static
        shapes). Each row's classes are one contiguous memmap slice; decoding and the scatter to the
        dense layout are vectorised over the whole batch.
        """
        loc = self.locate(sample_ids)
        B, T = len(loc), self.T
        chunks, cnts = [], np.empty((B, T), np.int64)
        for b, (j, r) in enumerate(loc):                               # B slices, not B*T
            data, counts = self._shard(int(j))
            o = self._offs[j]
            chunks.append(data[o[r] * self.nb:o[r + 1] * self.nb])
            cnts[b] = counts[r]
        flat = np.concatenate(chunks).reshape(-1, self.nb)            # (K, nb)
        cid, cq = _unpack_np(flat, self.V)                            # (K,)
        n = cnts.reshape(-1)                                          # (B*T,)
        umax = self.U if pad_to_u else int(n.max())
        # classes are stored position-major, so filling the (B*T, umax) slots below each position's
        # count in row-major order puts every class in place without an index computation
        mask = np.arange(umax)[None, :] < n[:, None]                  # (B*T, umax)
        ids = np.zeros((B * T, umax), np.int64)
        probs = np.zeros((B * T, umax), np.float32)
        ids[mask] = cid
        probs[mask] = cq.astype(np.float32) * np.float32(1.0 / self.M)
        return (torch.from_numpy(ids.reshape(B, T, umax)), torch.from_numpy(probs.reshape(B, T, umax)))


def _verify_shard(d, rec, full):
    for f, n, h in ((rec["data_file"], rec["data_bytes"], rec["data_sha256"]),
                    (rec["index_file"], rec["index_bytes"], rec["index_sha256"])):
        p = os.path.join(d, f)
        if not os.path.exists(p):
            raise CacheCorruptError(f"{p}: missing shard file")
        if os.path.getsize(p) != n:
            raise CacheCorruptError(f"{p}: truncated or wrong size: {os.path.getsize(p)} bytes, header says {n}")
        if full and _sha256_file(p) != h:
            raise CacheCorruptError(f"{p}: sha256 checksum mismatch: the file is corrupted")


def _read_header(cache_dir):
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"{cache_dir}: teacher cache directory does not exist")
    hp = os.path.join(cache_dir, HEADER)
    if not os.path.exists(hp):
        if os.path.exists(os.path.join(cache_dir, PLAN)):
            raise CacheCorruptError(f"{hp}: missing: the build of this cache is incomplete "
                                    f"(rerun build with the same arguments to resume)")
        raise FileNotFoundError(f"{hp}: missing: {cache_dir} is not a teacher cache")
    h = _read_json(hp)
    if h.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{hp}: format_version: cache={h.get('format_version')!r} run={FORMAT_VERSION}")
    return h


def open_cache(cache_dir, expect=None, verify="full"):
    """Open a finished cache; `expect` = meta keys + U + temperature of this run (None: no check).

    verify: "full" checks sizes and sha256 of every file now (~1.5 s per GB on one core), "lazy"
    checks sizes now and each shard's sha256 on its first read, "size" only sizes.
    CacheMismatchError names header.json and each differing key; CacheCorruptError names the file.
    """
    if verify not in ("full", "lazy", "size"):
        raise ValueError(f"open_cache: verify must be 'full', 'lazy' or 'size', got {verify!r}")
    h = _read_header(cache_dir)
    if expect is not None:
        _diff(os.path.join(cache_dir, HEADER), h, expect, list(expect))
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
    _write_json(path, dict(format_version=FORMAT_VERSION, config=_norm(config), num_kept=len(ids), kept_ids=ids))


def load_selection(path, config):
    """Kept sample ids (K,) LongTensor, or None when `path` is absent or was scored with another config
    (the caller then rescoring and overwrites). config must contain 'data_fingerprint' (see save)."""
    if "data_fingerprint" not in config:
        raise ValueError("load_selection: config must contain 'data_fingerprint'")
    if not os.path.exists(path):
        return None
    d = _read_json(path)
    if not isinstance(d, dict) or "kept_ids" not in d or len(d["kept_ids"]) != d.get("num_kept"):
        raise CacheCorruptError(f"{path}: not a valid selection file")
    if d.get("format_version") != FORMAT_VERSION or d["config"] != _norm(config):
        return None
    return torch.tensor(d["kept_ids"], dtype=torch.int64)


# ----------------------------------------------------------------------------- CLI

def _cmd_estimate(a):
    est = estimate_storage(a.tokens, a.vocab, a.u, a.l)
    print(f"Teacher-target storage (paper Table 6): {a.tokens:.3g} tokens, V={a.vocab}, U={a.u}, l={a.l}, "
          f"{bytes_per_class(a.vocab)} bytes/class ({id_bits(a.vocab)} id + {prob_bits(a.vocab)} prob bits)\n")
    print("| method | bytes/position | TB |")
    print("|---|---:|---:|")
    for k, v in est.items():
        print(f"| {k} | {v['bytes_per_position']:,.1f} | {v['tb']:,.2f} |")


def _cmd_inspect(a):
    h = _read_header(a.dir)
    show = {k: v for k, v in h.items() if k not in ("shards", "totals")}
    print(json.dumps(show, indent=1, sort_keys=True))
    t = h["totals"]
    files = [f for f in os.listdir(a.dir) if not f.startswith(".tmp.")]
    disk = sum(os.path.getsize(os.path.join(a.dir, f)) for f in files)
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
                counts = rng.integers(max(1, a.kept // 2), min(U, a.kept * 3 // 2) + 1, size=(1, T))
                K = int(counts.sum())
                ids = rng.integers(0, V, size=K)
                q = rng.integers(1, 1 << plan["prob_bits"], size=K)
                w.add(sids[s:s + 1], counts, ids, q)
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
    p = argparse.ArgumentParser(description="nano-sekd teacher cache (RS-KD, paper Sec. 7.1 / App. E)")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate", help="storage table of paper Table 6")
    e.add_argument("--tokens", type=float, default=100e9)
    e.add_argument("--vocab", type=int, default=100_000)
    e.add_argument("--u", type=int, default=64)
    e.add_argument("--l", type=float, default=0.2, help="fraction of samples kept by sample selection")
    e.set_defaults(fn=_cmd_estimate)
    i = sub.add_parser("inspect", help="header and measured sizes of a cache directory")
    i.add_argument("dir")
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
    a.fn(a)


if __name__ == "__main__":
    main()
