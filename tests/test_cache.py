"""Tests for cache.py: exact packing, quantization, unbiased RS-KD draws, build/resume/open, errors."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cache  # noqa: E402
import common  # noqa: E402
import losses  # noqa: E402

V, T = 1000, 16


def _teacher(calls=None, fail_after=None):
    """Fake teacher: fixed random logits per token id plus a position term; counts its calls."""
    g = torch.Generator().manual_seed(123)
    table = torch.randn(V, V, generator=g) * 3                        # (V_tok, V)
    pos = torch.randn(T, V, generator=g)

    def fn(x):                                                        # (b, T) -> (b, T, V)
        if calls is not None:
            calls.append(len(x))
            if fail_after is not None and len(calls) > fail_after:
                raise RuntimeError("simulated kill")
        return (table[x] + pos[: x.shape[1]]).to(torch.bfloat16)
    return fn


def _meta(**kw):
    m = dict(teacher="fake-teacher", vocab_size=V, seq_len=T, tokenizer_fingerprint="tok123",
             data_fingerprint="data456")
    m.update(kw)
    return m


def _expect(**kw):
    e = _meta()
    e.update(U=64, temperature=1.0)
    e.update(kw)
    return e


def _data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.arange(n, dtype=torch.int64) * 10 + 5


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("vocab,U,nb,ib,cb", [
    (151_936, 64, 3, 18, 6), (2 ** 18, 64, 3, 18, 6), (100_000, 64, 3, 17, 6), (1000, 64, 2, 10, 6),
    (2 ** 18 + 1, 64, 4, 19, 6), (2 ** 19, 64, 4, 19, 6), (151_936, 65, 4, 18, 7), (2 ** 21, 64, 4, 21, 6),
    (2 ** 26, 65535, 6, 26, 16), (151_936, 1, 3, 18, 0)])
def test_format_bits(vocab, U, nb, ib, cb):
    assert (cache.bytes_per_class(vocab, U), cache.id_bits(vocab), cache.count_bits(U)) == (nb, ib, cb)
    assert 2 ** ib >= vocab > 2 ** (ib - 1) and 2 ** cb >= U          # every id and every count - 1 fits
    assert 8 * nb >= ib + cb > 8 * (nb - 1)                           # whole bytes, none wasted


def _diffuse_draws(vocab, rows, U=64, seed=0):
    """RS-KD-like (ids, counts) of diffuse rows: U uniform draws over V give ~U distinct classes per row;
    row 0 is one class drawn U times, row 1 two classes (count U - 1 and 1)."""
    g = np.random.default_rng(seed)
    draws = g.integers(0, vocab, size=(rows, U))
    draws[0], draws[1, :-1], draws[1, -1] = vocab - 1, 131_072 % vocab, 0
    ids, counts = [], []
    for r in draws:
        u, c = np.unique(r, return_counts=True)
        ids.append(u)
        counts.append(c)
    return np.concatenate(ids), np.concatenate(counts), [len(u) for u in ids]


@pytest.mark.parametrize("vocab", [151_936, 2 ** 19])
def test_counts_round_trip_exact_on_diffuse_rows(vocab):
    """Diffuse rows keep every sampled class: counts are stored exactly (a quantized probability of a
    few bits, as format 1 stored, rounds rare classes of such rows to 0)."""
    ids, counts, k = _diffuse_draws(vocab, 500)
    assert np.mean(k[2:]) > 55 and counts.max() == 64 and counts.min() == 1
    buf = cache.pack_classes(ids, counts, vocab, 64)
    assert buf.shape == (len(ids), 3 if vocab <= 2 ** 18 else 4)
    ids2, counts2 = cache.unpack_classes(buf, vocab, 64)
    assert np.array_equal(ids2.numpy(), ids) and np.array_equal(counts2.numpy(), counts)
    assert (counts2 >= 1).all() and counts2.sum() == 64 * 500       # no class lost, every row sums to U


@pytest.mark.parametrize("vocab,U", [(151_936, 64), (100_000, 64), (2 ** 21, 64), (151_936, 300)])
def test_pack_round_trip_edges(vocab, U):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (50, 64), generator=g)
    edge = torch.tensor([0, 131_071, 131_072, vocab - 1, 2 ** 20]).clamp(max=vocab - 1)
    ids[0, :5] = edge                                                 # the ids 17-bit packing corrupts
    counts = torch.randint(1, U + 1, (50, 64), generator=g)
    counts[0, :2] = torch.tensor([1, U])
    buf = cache.pack_classes(ids, counts, vocab, U)
    assert buf.dtype == np.uint8 and buf.shape == (50, 64, cache.bytes_per_class(vocab, U))
    ids2, counts2 = cache.unpack_classes(buf, vocab, U)
    assert torch.equal(ids2, ids) and torch.equal(counts2, counts)
    assert ids2[0, :5].tolist() == edge.tolist()


def test_pack_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="ids"):
        cache.pack_classes(torch.tensor([[151_936]]), torch.tensor([[1]]), 151_936, 64)
    with pytest.raises(ValueError, match="counts"):
        cache.pack_classes(torch.tensor([[3]]), torch.tensor([[65]]), 151_936, 64)
    with pytest.raises(ValueError, match="counts"):
        cache.pack_classes(torch.tensor([[3]]), torch.tensor([[0]]), 151_936, 64)


# ----------------------------------------------------------------------------- build / read

def _online(logits, sid, U=64, temperature=1.0, seed=0):
    """What online RS-KD trains on for one sequence: losses' sampler with losses' uniforms."""
    u = losses.rs_uniforms(seed, torch.tensor([sid]), logits.shape[0], U)[0]          # (T, U)
    return losses.sample_classes(logits, u, temperature)                              # ids, counts (T, U)


@pytest.mark.parametrize("temperature,seed", [(1.0, 0), (2.0, 1337)])
def test_build_target_equals_online_draw(tmp_path, temperature, seed):
    """The cached target is count / U of losses.sample_classes on the same logits and uniforms, bit for
    bit (format 1 had its own fp64 sampler and rounded counts to prob bits: other classes, other mass)."""
    x, sid = _data(10)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), U=64, temperature=temperature, seed=seed,
                    batch_size=3, shard_size=4, progress=False)
    c = cache.open_cache(d, _expect(temperature=temperature, seed=seed))
    assert torch.equal(c.sample_ids, sid) and len(c) == 10
    order = torch.tensor([25, 5, 95])
    ids, probs = c.get(order, pad_to_u=True)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32 and ids.shape == (3, T, 64)
    fn = _teacher()
    for b, s in enumerate(order.tolist()):
        row = (sid == s).nonzero().item()
        rid, rcount = _online(fn(x[row:row + 1])[0], s, 64, temperature, seed)
        assert torch.equal(ids[b], rid)
        assert torch.equal(probs[b], rcount / 64)                    # exactly the online target
    ids2, probs2 = c.get(order)
    assert torch.equal(probs2, probs[..., :probs2.shape[-1]]) and (probs[..., probs2.shape[-1]:] == 0).all()
    h = c.header
    assert (h["id_bits"], h["count_bits"], h["U"], h["format_version"], h["lossless"]) == (10, 6, 64, 2, True)
    t = h["totals"]
    assert t["data_bytes"] == cache.bytes_per_class(V, 64) * t["kept_classes"] and t["positions"] == 10 * T
    assert c.bytes_on_disk > t["data_bytes"] + t["index_bytes"]
    with pytest.raises(KeyError, match="7"):
        c.get(torch.tensor([5, 7]))


class _Watched(torch.Tensor):
    """Logits that record every move to the host of a tensor still V wide (only ids and counts may leave
    the device: full-vocabulary logits on the host cost a copy of every batch)."""
    moved = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        rest = list(args[1:]) + list((kwargs or {}).values())
        host = name in ("cpu", "numpy", "tolist", "__array__") or (
            name == "to" and any(isinstance(a, (str, torch.device)) for a in rest))
        if host and torch.is_tensor(args[0]) and args[0].dim() and args[0].shape[-1] == V:
            cls.moved.append((name, tuple(args[0].shape)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_build_moves_only_ids_and_counts_to_the_host(tmp_path):
    x, sid = _data(4)
    fn = _teacher()
    _Watched.moved.clear()
    d = cache.build(tmp_path / "w", lambda inp: fn(inp).as_subclass(_Watched), x, sid, _meta(), batch_size=2,
                    progress=False)
    assert _Watched.moved == []
    _Watched.moved.clear()
    fn(x[:1]).as_subclass(_Watched).float().cpu()                    # the watcher sees what train.py did
    assert _Watched.moved == [("cpu", (1, T, V))]
    ref = cache.build(tmp_path / "ref", fn, x, sid, _meta(), batch_size=2, progress=False)
    assert torch.equal(cache.open_cache(d).get(sid)[1], cache.open_cache(ref).get(sid)[1])


def test_build_past_3_bytes_says_so_and_loses_nothing(tmp_path):
    """V = 2^19, diffuse (uniform) rows: 4 bytes a class, announced, and every sampled class kept."""
    Vb, Tb = 2 ** 19, 4
    x, sid = torch.zeros(2, Tb, dtype=torch.int64), torch.tensor([11, 12])
    fn = lambda inp: torch.zeros(inp.shape[0], Tb, Vb)                                 # uniform teacher
    meta = _meta(vocab_size=Vb, seq_len=Tb)
    with pytest.warns(UserWarning, match="19 id bits.*4 bytes a class"):
        d = cache.build(tmp_path / "c", fn, x, sid, meta, U=64, progress=False)
    c = cache.open_cache(d, dict(meta, U=64, temperature=1.0))
    assert c.header["bytes_per_class"] == 4 and c.check_counts() == 2 * Tb
    ids, probs = c.get(sid, pad_to_u=True)
    for b in range(2):
        rid, rcount = _online(torch.zeros(Tb, Vb), int(sid[b]), 64)
        assert (rcount > 0).sum(-1).min() > 50                        # diffuse: > 50 distinct classes a row
        assert torch.equal(ids[b], rid) and torch.equal(probs[b], rcount / 64)
    assert torch.equal(probs.sum(-1), torch.ones(2, Tb))              # 64 / 64 exactly


def test_end_to_end_mean_matches_teacher(tmp_path):
    """Unbiasedness through build + disk + get: average over many sequences of the same tokens."""
    n = 128
    x = torch.full((n, T), 17)
    d = cache.build(tmp_path / "c", _teacher(), x, torch.arange(n), _meta(), U=64, temperature=1.5,
                    shard_size=64, batch_size=32, progress=False)
    ids, probs = cache.open_cache(d, _expect(temperature=1.5)).get(torch.arange(n))
    dense = torch.zeros(n, T, V).scatter_add_(2, ids, probs).mean(0)   # (T, V)
    p = torch.softmax(_teacher()(x[:1])[0].float() / 1.5, -1)          # (T, V)
    tol = 5 * (p / (64 * n)).sqrt() + 2e-4
    assert ((dense - p).abs() < tol).all()


def test_rows_of_one_batch_get_different_keys(tmp_path):
    x = _data(1)[0].repeat(4, 1)                                      # identical tokens in every row
    sid = torch.tensor([3, 4, 5, 6])
    a = cache.build(tmp_path / "a", _teacher(), x, sid, _meta(), batch_size=4, progress=False)
    ids, probs = cache.open_cache(a, _expect()).get(sid, pad_to_u=True)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not (torch.equal(ids[i], ids[j]) and torch.equal(probs[i], probs[j]))
    # content depends on (seed, sample id) only: other batch size / shard size / subset -> same rows
    b = cache.build(tmp_path / "b", _teacher(), x[2:], sid[2:], _meta(), batch_size=1, shard_size=1,
                    progress=False)
    ids_b, probs_b = cache.open_cache(b, _expect()).get(sid[2:], pad_to_u=True)
    assert torch.equal(ids_b, ids[2:]) and torch.equal(probs_b, probs[2:])
    # another seed gives other draws
    c = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), seed=1, progress=False)
    assert not torch.equal(cache.open_cache(c, _expect(seed=1)).get(sid, pad_to_u=True)[0], ids)


def test_resume_after_kill_is_byte_identical(tmp_path):
    x, sid = _data(10)
    kw = dict(U=64, batch_size=2, shard_size=4, progress=False)
    ref = cache.build(tmp_path / "ref", _teacher(), x, sid, _meta(), **kw)
    calls = []
    d = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="simulated kill"):
        cache.build(d, _teacher(calls, fail_after=3), x, sid, _meta(), **kw)  # dies inside shard 1
    assert os.path.exists(d / "shard_00000.json") and not os.path.exists(d / "shard_00001.json")
    assert not os.path.exists(d / "header.json")
    with pytest.raises(cache.CacheCorruptError, match="incomplete"):
        cache.open_cache(d, _expect())
    with pytest.raises(cache.CacheCorruptError, match=r"\[1, 2\]"):
        cache.finalize(d)
    calls2 = []
    cache.build(d, _teacher(calls2), x, sid, _meta(), **kw)
    assert sum(calls2) == 6                                          # shard 0 was not recomputed
    assert _files(d) == _files(ref)
    calls3 = []
    cache.build(d, _teacher(calls3), x, sid, _meta(), **kw)           # finished: no teacher call
    assert calls3 == []


def test_distributed_shards_then_finalize(tmp_path):
    x, sid = _data(10)
    kw = dict(batch_size=3, shard_size=3, progress=False)
    ref = cache.build(tmp_path / "ref", _teacher(), x, sid, _meta(), **kw)
    d = tmp_path / "ddp"
    cache.build(d, _teacher(), x, sid, _meta(), rank=1, world_size=2, **kw)
    assert not os.path.exists(d / "header.json")
    with pytest.raises(cache.CacheCorruptError, match=r"\[0, 2\]"):
        cache.finalize(d)
    cache.build(d, _teacher(), x, sid, _meta(), rank=0, world_size=2, **kw)
    cache.finalize(d)
    assert _files(d) == _files(ref)


def test_build_refuses_to_mix_runs(tmp_path):
    x, sid = _data(6)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), shard_size=4, progress=False)
    with pytest.raises(cache.CacheMismatchError, match="build.json.*teacher: cache='fake-teacher' run='other'"):
        cache.build(d, _teacher(), x, sid, _meta(teacher="other"), shard_size=4, progress=False)
    with pytest.raises(cache.CacheMismatchError, match="U: cache=64 run=32"):
        cache.build(d, _teacher(), x, sid, _meta(), U=32, shard_size=4, progress=False)
    os.remove(os.path.join(d, "header.json"))                         # tokens changed under an unchanged plan
    with pytest.raises(cache.CacheMismatchError, match="other tokens"):
        cache.build(d, _teacher(), (x + 1) % V, sid, _meta(), shard_size=4, progress=False)
    with pytest.raises(ValueError, match="logits"):
        cache.build(tmp_path / "v", _teacher(), x, sid, _meta(vocab_size=999), progress=False)


def test_open_errors(tmp_path):
    x, sid = _data(6)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), shard_size=4, progress=False)
    with pytest.raises(cache.CacheMismatchError) as e:
        cache.open_cache(d, _expect(teacher="Qwen3-8B", temperature=2.0, seq_len=32))
    msg = str(e.value)
    assert "header.json" in msg and "teacher: cache='fake-teacher' run='Qwen3-8B'" in msg
    assert "temperature: cache=1.0 run=2.0" in msg and "seq_len: cache=16 run=32" in msg and "\n" not in msg
    with pytest.raises(cache.CacheMismatchError, match="data_fingerprint"):
        cache.open_cache(d, _expect(data_fingerprint="other"))
    with pytest.raises(cache.CacheMismatchError, match="seed: cache=0 run=1"):
        cache.open_cache(d, _expect(seed=1))
    for err in (cache.CacheMismatchError, cache.CacheCorruptError, cache.CacheNotFoundError):
        assert issubclass(err, common.UserError)                     # the CLIs print one line, exit 2
    assert isinstance(cache.CacheMismatchError("x"), ValueError)

    data = os.path.join(d, "shard_00001.bin")
    raw = open(data, "rb").read()
    with open(data, "r+b") as f:                                      # flip one byte: checksum error
        f.seek(len(raw) // 2)
        f.write(bytes([raw[len(raw) // 2] ^ 1]))
    with pytest.raises(cache.CacheCorruptError, match="shard_00001.bin.*checksum"):
        cache.open_cache(d, _expect())
    c = cache.open_cache(d, _expect(), verify="lazy")                 # lazy: fails on first read of it
    c.get(sid[:1])
    with pytest.raises(cache.CacheCorruptError, match="shard_00001.bin"):
        c.get(sid[4:5])
    with open(data, "wb") as f:                                       # truncate: size error even unverified
        f.write(raw[:-3])
    with pytest.raises(cache.CacheCorruptError, match="shard_00001.bin.*truncated"):
        cache.open_cache(d, _expect(), verify="size")
    with open(os.path.join(d, "header.json"), "r+b") as f:
        f.truncate(50)
    with pytest.raises(cache.CacheCorruptError, match="header.json.*not valid JSON") as e:
        cache.open_cache(d, _expect())
    assert "\n" not in str(e.value)
    with pytest.raises(cache.CacheNotFoundError, match="nope"):
        cache.open_cache(tmp_path / "nope", _expect())
    assert issubclass(cache.CacheNotFoundError, FileNotFoundError)


def test_dtype_is_part_of_the_key(tmp_path):
    """An fp32 run never reuses a cache built under bf16: the dtype recorded by the build is checked on
    open even when the run does not pass it."""
    x, sid = _data(4)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(dtype="torch.bfloat16"), progress=False)
    assert cache.open_cache(d, _expect(dtype="torch.bfloat16")).header["dtype"] == "torch.bfloat16"
    with pytest.raises(cache.CacheMismatchError, match="dtype: cache='torch.bfloat16' run='torch.float32'"):
        cache.open_cache(d, _expect(dtype="torch.float32"))
    with pytest.raises(cache.CacheMismatchError, match="dtype: cache='torch.bfloat16' run='<absent>'"):
        cache.open_cache(d, _expect())
    with pytest.raises(cache.CacheMismatchError, match="build.json.*dtype"):
        cache.build(d, _teacher(), x, sid, _meta(dtype="torch.float32"), progress=False)


def test_old_format_is_refused_with_rebuild(tmp_path):
    x, sid = _data(4)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), progress=False)
    for name in ("header.json", "build.json"):
        p = os.path.join(d, name)
        h = json.load(open(p))
        h["format_version"] = 1
        common.atomic_json(p, h)
    with pytest.raises(cache.CacheMismatchError, match=r"header.json: cache format_version 1.*rebuild"):
        cache.open_cache(d, _expect())
    with pytest.raises(cache.CacheMismatchError, match=r"build.json: cache format_version 1.*rebuild"):
        cache.build(d, _teacher(), x, sid, _meta(), progress=False)


def test_bad_shard_size_names_the_flag(tmp_path):
    x, sid = _data(2)
    with pytest.raises(common.UserError, match="--cache-shard-size.*>= 1, got 0"):
        cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), shard_size=0, progress=False)
    assert not os.path.exists(tmp_path / "c")                         # refused before anything is written


# ----------------------------------------------------------------------------- selection cache

def test_selection_cache(tmp_path):
    p = tmp_path / "sel.json"
    cfg = dict(data_fingerprint="d1", metric="student_entropy", l=0.2, student="ckpt7")
    assert cache.load_selection(p, cfg) is None
    cache.save_selection(p, torch.tensor([9, 3, 100_000_000_000]), cfg)
    assert cache.load_selection(p, dict(cfg)).tolist() == [9, 3, 100_000_000_000]
    assert cache.load_selection(p, dict(cfg, l=0.3)) is None
    assert cache.load_selection(p, dict(cfg, data_fingerprint="d2")) is None
    with pytest.raises(ValueError, match="data_fingerprint"):
        cache.save_selection(p, torch.tensor([1]), dict(metric="x"))
    with open(p, "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match="sel.json"):
        cache.load_selection(p, cfg)


# ----------------------------------------------------------------------------- estimate / CLI

def test_estimate_table6():
    est = cache.estimate_storage(100e9, 100_000, 64, 0.2)
    assert est["RS-KD (U=64)"]["bytes_per_position"] == 192
    assert est["RS-KD (U=64)"]["tb"] == pytest.approx(19.2)
    assert est["SE-KD_3X (U x l)"]["tb"] == pytest.approx(3.84)
    assert est["Full KD (fp16 logits)"]["bytes_per_position"] == 200_000
    assert est["CE only"]["tb"] == 0
    assert cache.estimate_storage(1e9, 2 ** 21, 64, 1.0)["RS-KD (U=64)"]["bytes_per_position"] == 256


def _cli(capsys, *args):
    """cache.main in-process (a subprocess costs seconds of imports): (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        cache.main([str(a) for a in args])
        rc = 0
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def test_cli_estimate(capsys):
    r = _cli(capsys, "estimate", "--tokens", "100e9", "--vocab", "100000", "--u", "64", "--l", "0.2")
    out = r.stdout
    assert r.returncode == 0 and "| RS-KD (U=64) | 192.0 | 19.20 |" in out
    assert "| SE-KD_3X (U x l) | 38.4 | 3.84 |" in out
    assert "| Full KD (fp16 logits) | 200,000.0 | 20,000.00 |" in out and "= 20,000 TB." in out
    ce = [l for l in out.splitlines() if l.startswith("CE only:")]
    assert len(ce) == 1 and "training data" in ce[0]                  # the CE-only row explained in one line
    r = _cli(capsys, "estimate", "--u", "0")
    assert r.returncode == 2 and "u >= 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_inspect_verifies(tmp_path, capsys):
    x, sid = _data(4)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), shard_size=2, progress=False)
    r = _cli(capsys, "inspect", d)
    h = cache.open_cache(d).header
    assert r.returncode == 0 and '"teacher": "fake-teacher"' in r.stdout
    assert f"mean kept classes      {h['totals']['kept_classes'] / (4 * T):.2f}" in r.stdout
    assert "lossless               yes" in r.stdout and f"counts sum to U at all {4 * T} positions" in r.stdout

    # a valid checksum over wrong counts (a builder bug, or a file rewritten with its sha): caught by decoding
    data = os.path.join(d, "shard_00001.bin")
    raw = bytearray(open(data, "rb").read())
    raw[1] ^= 0x80                                      # top count bit of class 0 (V=1000: 2 bytes a class)
    open(data, "wb").write(bytes(raw))
    for name in ("header.json", "shard_00001.json"):
        p = os.path.join(d, name)
        rec = json.load(open(p))
        for r_ in (rec["shards"] if "shards" in rec else [rec]):
            if r_["data_file"] == "shard_00001.bin":
                r_["data_sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
        common.atomic_json(p, rec)
    r = _cli(capsys, "inspect", d)
    assert r.returncode == 2 and "do not sum to U=64" in r.stderr

    raw[5] ^= 1                                         # a bit flip the checksum catches
    open(data, "wb").write(bytes(raw))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "cache.py", "inspect", str(d)], cwd=root, capture_output=True,
                       text=True)                       # the real CLI once: exit 2, one line, no traceback
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "shard_00001.bin: sha256 checksum mismatch" in r.stderr and r.stdout == ""
    r = _cli(capsys, "inspect", d, "--no-verify")
    assert r.returncode == 0 and "NOT checked" in r.stdout
    r = _cli(capsys, "inspect", tmp_path / "nope")
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1
