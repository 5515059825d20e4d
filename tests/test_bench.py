"""bench/selective_head.py's FLOP model: the counts behind its GFLOP/s and its step-time floor."""
import os
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT

sys.path.append(os.path.join(ROOT, "bench"))  # after the root: bench/cache.py must not shadow cache.py
import selective_head as sh  # noqa: E402


def _cfg(d=64, H=4, kv=2, L=3, ffn=256, V=1000):
    return SimpleNamespace(hidden_size=d, num_attention_heads=H, num_key_value_heads=kv, num_hidden_layers=L,
                           intermediate_size=ffn, vocab_size=V, head_dim=None)


def test_flops_per_token_counts_each_matmul():
    c, T = _cfg(), 9
    hd = 64 // 4
    per_layer = 64 * 64 + 2 * 64 * 2 * hd + 64 * 64 + 4 * hd * (T + 1) + 3 * 64 * 256  # q,k,v,o; QK^T, AV; MLP
    assert sh.flops_per_token(c, T) == (2 * 3 * per_layer, 2 * 64 * 1000)


def test_flop_floor_of_selection():
    """Same student and teacher (trunk t, head h per token): SE-KD's step is 4t + h + 4kh against the
    default flow's 4(t + h); k = 1 costs more than the default (the scoring pass comes on top)."""
    c, T = _cfg(), 9
    t, h = sh.flops_per_token(c, T)
    for k in (0.0, 0.2, 1.0):
        assert sh.flop_floor(c, c, T, k) == pytest.approx((4 * t + h + 4 * k * h) / (4 * (t + h)))
    assert sh.flop_floor(c, c, T, 1.0) > 1 > sh.flop_floor(c, c, T, 0.2)
    big_head = _cfg(V=100000)  # the more of a step the head is, the more selection can save
    assert sh.flop_floor(big_head, big_head, T, 0.2) < sh.flop_floor(c, c, T, 0.2)
