"""Tests for bench/gpu_check.py (the prepared GPU check), on CPU.

The building blocks run at tiny size in seconds: tokenizer (vocabulary filled to its target length),
random-init Qwen3 models (config vocab padded past the tokenizer, bf16, deterministic), the weights-changed
measure, and the train.py flags the check passes. The whole CPU smoke (`bash bench/gpu_check.sh
--cpu-smoke`) takes about a minute on 2 cores, so it runs only with NANO_SEKD_GPU_CHECK_SMOKE=1.
"""
import importlib.util
import json
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)

TINY = dict(gc.MODES["cpu_smoke"], bpe_vocab=400, tok_len=512, padded_vocab=576, corpus_files=8)


@pytest.fixture(scope="module")
def texts():
    return gc.corpus_texts(TINY["corpus_files"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, texts):
    out = {}
    for run in ("a", "b"):
        out[run] = gc.build_models(str(tmp_path_factory.mktemp(f"build_{run}")), TINY, "cpu", texts=texts)
    return out


def test_paper_widths_and_vocab():
    g = gc.MODES["gpu"]
    assert g["teacher"] == dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                intermediate_size=12288, tie_word_embeddings=False, num_hidden_layers=4)
    assert g["student"] == dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                intermediate_size=6144, tie_word_embeddings=True, num_hidden_layers=2)
    assert (g["tok_len"], g["padded_vocab"], g["seq_len"], g["device"]) == (151_669, 151_936, 512, "cuda")


def test_tokenizer_is_filled_to_its_length(texts):
    tok, trained = gc.build_tokenizer(texts, 512, bpe_vocab=400)
    assert trained == 400 and len(tok) == 512 and tok.eos_token_id == 0
    ids = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    assert ids and max(ids) < trained  # reserved fillers are never produced
    assert tok.decode(ids) == "def add(a, b):\n    return a + b\n"


def test_models_padded_bf16_and_deterministic(built):
    from transformers import AutoConfig, AutoTokenizer
    from safetensors.torch import load_file
    a, b = built["a"], built["b"]
    assert a["tok_len"] == len(AutoTokenizer.from_pretrained(a["teacher"])) == 512
    for name in ("teacher", "student"):
        cfg = AutoConfig.from_pretrained(a[name])
        assert cfg.model_type == "qwen3" and cfg.vocab_size == 576 > a["tok_len"]
        assert cfg.num_hidden_layers == TINY[name]["num_hidden_layers"]
        assert cfg.tie_word_embeddings == TINY[name]["tie_word_embeddings"]
        sa = load_file(os.path.join(a[name], "model.safetensors"))
        sb = load_file(os.path.join(b[name], "model.safetensors"))
        assert sa.keys() == sb.keys() and all(t.dtype == torch.bfloat16 for t in sa.values())
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name}: two builds differ"
        assert sa["model.embed_tokens.weight"].shape[0] == 576
        assert open(os.path.join(a[name], "tokenizer.json")).read() == open(os.path.join(b[name], "tokenizer.json")).read()
    ta = load_file(os.path.join(a["teacher"], "model.safetensors"))["model.embed_tokens.weight"]
    sa = load_file(os.path.join(a["student"], "model.safetensors"))["model.embed_tokens.weight"]
    assert ta.shape[1] != sa.shape[1]  # teacher and student widths differ (the student is not a layer copy)


def test_weights_changed_counts_live_rows(tmp_path, built):
    from safetensors.torch import load_file, save_file
    src = built["a"]["student"]
    w = {k: v.float() for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    new = {k: v.clone() for k, v in w.items()}
    V = built["a"]["tok_len"]
    new["model.embed_tokens.weight"][:V] += 1e-6  # live rows, below bf16 resolution
    new["model.norm.weight"] += 1.0
    os.makedirs(tmp_path / "m")
    save_file(new, str(tmp_path / "m" / "model.safetensors"))
    out = gc.weights_changed(src, str(tmp_path / "m"), V)
    emb = w["model.embed_tokens.weight"]
    n_live = out["live_entries"]
    assert out["entries"] == sum(v.numel() for v in w.values())
    assert n_live == out["entries"] - (emb.shape[0] - V) * emb.shape[1]
    changed = V * emb.shape[1] + w["model.norm.weight"].numel()
    assert out["live_frac"] == pytest.approx(changed / n_live)
    assert out["norm_frac"] > 0 and out["live_bf16_frac"] < out["live_frac"]
    assert gc.weights_changed(src, src, V)["all_frac"] == 0.0


def test_train_flags_parse(built):
    import config
    flags = gc.train_flags(gc.MODES["gpu"], built["a"], "/scratch", "adamw", "cuda:0")
    se, x3 = (config.parse_args(flags[n]) for n in ("se_kd", "se_kd_3x"))
    for a in (se, x3):
        assert (a.seq_len, a.batch_size, a.grad_accum, a.lr, a.dtype, a.optim) == (512, 2, 8, 1e-5, "bf16", "adamw")
        assert (a.k, a.pos_metric, a.teacher_device, a.student_device, a.max_steps) == \
            (0.2, "student_entropy", "cuda:0", "cuda:0", 30)
        assert a.teacher == built["a"]["teacher"] and a.data == "stdlib"
    assert se.sample_metric == "none" and not se.cache_dir and se.rs_u == 0
    assert (x3.sample_metric, x3.sample_frac, x3.rs_u, x3.cache_dir) == ("student_entropy", 0.2, 64, "/scratch/cache")
    assert x3.tokens * x3.sample_frac == se.tokens == 30 * 16 * 512  # one epoch of the kept sequences


@pytest.mark.skipif(os.environ.get("NANO_SEKD_GPU_CHECK_SMOKE") != "1",
                    reason="the whole CPU smoke takes ~1 min: set NANO_SEKD_GPU_CHECK_SMOKE=1")
def test_cpu_smoke_end_to_end(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    res = json.load(open(tmp_path / "out" / "gpu_check.json"))
    assert res["status"] == "ok" and res["build"]["tok_len"] == 1024 and res["build"]["padded_vocab"] == 1088
    for name in ("se_kd", "se_kd_3x"):
        r = res["runs"][name]
        assert r["numbers"]["steps"] == 4 and r["numbers"]["precision"].startswith("bf16")
        assert r["weights_changed"]["live_frac"] > 0.99  # fp32 master weights: lr 1e-5 updates survive
    assert res["runs"]["se_kd_3x"]["numbers"]["kl_name"] == "kl_rs_estimate"
    assert res["selective_head"]["status"].startswith("skipped")
    assert len(os.listdir(tmp_path / "out")) <= 8
