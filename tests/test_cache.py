"""Tests for cache.py: exact packing, quantization, unbiased RS-KD draws, build/resume/open, errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cache  # noqa: E402

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


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("vocab,nb,pb", [(151_936, 3, 6), (100_000, 3, 7), (2 ** 21, 4, 11), (1000, 3, 14)])
def test_format_bits(vocab, nb, pb):
    assert cache.bytes_per_class(vocab) == nb
    assert cache.prob_bits(vocab) == pb
    assert cache.id_bits(vocab) + pb == 8 * nb
    assert 2 ** cache.id_bits(vocab) >= vocab > 2 ** (cache.id_bits(vocab) - 1)


@pytest.mark.parametrize("vocab", [151_936, 100_000, 2 ** 21])
def test_pack_round_trip(vocab):
    pb = cache.prob_bits(vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (50, 64), generator=g)
    edge = torch.tensor([0, 131_071, 131_072, vocab - 1, 2 ** 20]).clamp(max=vocab - 1)
    ids[0, :5] = edge                                                 # the ids 17-bit packing corrupts
    q = torch.randint(0, 2 ** pb, (50, 64), generator=g)
    q[0, :2] = torch.tensor([0, 2 ** pb - 1])
    buf = cache.pack_classes(ids, q, vocab)
    assert buf.dtype == np.uint8 and buf.shape == (50, 64, cache.bytes_per_class(vocab))
    ids2, q2 = cache.unpack_classes(buf, vocab)
    assert torch.equal(ids2, ids) and torch.equal(q2, q)
    assert ids2[0, :5].tolist() == edge.tolist()


def test_pack_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="ids"):
        cache.pack_classes(torch.tensor([[151_936]]), torch.tensor([[1]]), 151_936)
    with pytest.raises(ValueError, match="prob bits"):
        cache.pack_classes(torch.tensor([[3]]), torch.tensor([[64]]), 151_936)   # 6 prob bits


# ----------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("pb", [6, 7, 14])
def test_quantize_sums_exact(pb):
    g = torch.Generator().manual_seed(pb)
    U = 64
    ids = torch.randint(0, 40, (500, U), generator=g)                 # random draws -> counts / U
    cnt = torch.zeros(500, 40).scatter_add_(1, ids, torch.ones(500, U))
    probs = cnt / U
    probs[3] = 0                                                      # an all-padding row
    q = cache.quantize(probs, pb)
    M = 2 ** pb - 1
    live = probs.sum(-1) > 0
    assert q.dtype == torch.int64
    assert (q.sum(-1)[live] == M).all() and (q[~live] == 0).all()
    assert (q[probs == 0] == 0).all()                                 # padding stays 0
    k = (probs > 0).sum(-1)
    assert (q[(probs > 0) & (k <= M)[:, None]] >= 1).all()            # kept classes survive
    # largest remainder stays within one unit of p * M except where the >= 1 rule moved units
    assert ((q - probs * M).abs()[k * 2 < M] <= 1 + 1e-9).all()


def test_quantize_hand_example():
    # p = (1/2, 1/4, 1/4) * 7 = (3.5, 1.75, 1.75): floors (3, 1, 1), 2 units to the largest remainders
    q = cache.quantize(torch.tensor([[0.5, 0.25, 0.25, 0.0]]), 3)
    assert q.tolist() == [[3, 2, 2, 0]]
    # 64 singletons at 6 bits (M = 63): one class must stay at 0, all others 1
    q = cache.quantize(torch.full((1, 64), 1 / 64), 6)
    assert q.sum() == 63 and (q == 0).sum() == 1
    # tiny class would round to 0 at 3 bits: gets one unit taken from the largest
    q = cache.quantize(torch.tensor([[0.97, 0.03]]), 3)
    assert q.tolist() == [[6, 1]]


def test_sampling_unbiased():
    """Mean of decoded probs over many draws matches softmax(z / T) (RS-KD is unbiased)."""
    g = torch.Generator().manual_seed(1)
    Vs, R, U, temp = 20, 20_000, 64, 2.0
    z = torch.randn(Vs, generator=g) * 2
    u = torch.rand(R, U, generator=g, dtype=torch.float64)
    ids, q = cache.sample_classes(z.expand(R, Vs), u, temp, prob_bits=14)
    dense = torch.zeros(R, Vs, dtype=torch.float64).scatter_add_(1, ids, q.double() / (2 ** 14 - 1))
    assert torch.allclose(dense.sum(-1), torch.ones(R, dtype=torch.float64))
    p = torch.softmax(z.double() / temp, -1)
    err = (dense.mean(0) - p).abs()
    tol = 5 * (p / (U * R)).sqrt() + 1e-4                              # 5 sigma + rounding
    assert (err < tol).all(), (err / tol).max()


# ----------------------------------------------------------------------------- build / read

def test_build_open_get_matches_dense_reference(tmp_path):
    x, sid = _data(10)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), U=64, batch_size=3, shard_size=4,
                    progress=False)
    c = cache.open_cache(d, _expect())
    assert torch.equal(c.sample_ids, sid) and len(c) == 10
    order = torch.tensor([25, 5, 95])
    ids, probs = c.get(order)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32 and ids.shape[:2] == (3, T)
    assert torch.allclose(probs.sum(-1), torch.ones(3, T), atol=1e-5)
    # reference: draw each row alone with the documented generator and compare
    fn = _teacher()
    for b, s in enumerate(order.tolist()):
        row = (sid == s).nonzero().item()
        u = torch.rand(T, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(cache._seq_seed(0, s)))
        rid, rq = cache.sample_classes(fn(x[row:row + 1])[0], u, 1.0, cache.prob_bits(V))
        ref = torch.zeros(T, V).scatter_add_(1, rid, rq.float() / (2 ** cache.prob_bits(V) - 1))
        got = torch.zeros(T, V).scatter_add_(1, ids[b], probs[b])
        assert torch.allclose(got, ref)
    ids2, probs2 = c.get(order, pad_to_u=True)
    assert ids2.shape == (3, T, 64) and torch.equal(probs2[..., :probs.shape[-1]], probs)
    h = c.header
    assert h["id_bits"] == 10 and h["prob_bits"] == 14 and h["U"] == 64
    t = h["totals"]
    assert t["data_bytes"] == 3 * t["kept_classes"] and t["positions"] == 10 * T
    assert c.bytes_on_disk > t["data_bytes"] + t["index_bytes"]
    with pytest.raises(KeyError, match="7"):
        c.get(torch.tensor([5, 7]))


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
    assert "temperature: cache=1.0 run=2.0" in msg and "seq_len: cache=16 run=32" in msg
    with pytest.raises(cache.CacheMismatchError, match="data_fingerprint"):
        cache.open_cache(d, _expect(data_fingerprint="other"))
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
    with pytest.raises(cache.CacheCorruptError, match="header.json"):
        cache.open_cache(d, _expect())
    with pytest.raises(FileNotFoundError):
        cache.open_cache(tmp_path / "nope", _expect())


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


def test_cli_estimate_and_inspect(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "cache.py", "estimate", "--tokens", "100e9", "--vocab", "100000",
                          "--u", "64", "--l", "0.2"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "| RS-KD (U=64) | 192.0 | 19.20 |" in out and "| SE-KD_3X (U x l) | 38.4 | 3.84 |" in out
    x, sid = _data(4)
    d = cache.build(tmp_path / "c", _teacher(), x, sid, _meta(), progress=False)
    out = subprocess.run([sys.executable, "cache.py", "inspect", str(d)], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    h = cache.open_cache(d).header
    assert '"teacher": "fake-teacher"' in out
    assert f"mean kept classes      {h['totals']['kept_classes'] / (4 * T):.2f}" in out
