"""Benchmark: our KD loss head against the libraries people use for KD, and how close to the machine's limit.

One training step's KD loss + backward through the LM head, on the shapes of selective_head.py (b: Qwen3
vocab V = 151,936, d = 128; a: the SmolLM2 pair, V = 49,152, d = 576). Inputs are real final hidden
states of that script's models on its batch (selective_head.make_ctx + models.trunk), given to every
variant as leaf tensors: student hidden (B, T, d) and student head W_s (V, d) require grad; the
teacher's hidden (B, T, d_t) and head W_t (V, d_t) are fixed. Every variant computes the teacher
logits inside its step. Variants:
    ours_full    ours Full KD: fused_head.head_loss over all rows (chunked fused head, weights 1/T per row, / B)
    ours_sekd20  ours SE-KD k = 20%: selection.chunked_scores("student_entropy") -> POLICIES["top_k"]
                 -> head_loss on the selected rows only (the train.py step)
    torchtune    torchtune ForwardKLWithChunkedOutputLoss (8 output chunks, as torchtune's KD recipe)
    trl_gkd      TRL GKDTrainer.generalized_jsd_loss, beta = 0 (TRL: F.kl_div(log q_s, log p_t) = KL(p_t||q_s))
    dense        plain PyTorch: full logits, log_softmax, F.kl_div(log_target=True), mean over tokens
    liger        Liger LigerFusedLinearJSD(jsd_beta=0) (= forward KL), CUDA only (Triton kernels)

Check before timing: every full variant's loss equals the dense KL of the same inputs; torchtune's
"forward KL" is the soft cross-entropy -sum p_t log q_s (no teacher entropy term: same gradient), so
its loss is checked against dense KL + mean H(p_t), and shown minus that entropy. SE-KD's loss is compared with the dense
KL restricted to its rows (selection.batch_mean over the same weights). Gradients (of h_s and W_s) are
compared with the dense reference's too. Tolerance: rtol 1e-4 (loss), 1e-3 x max|grad| (fp32); 2e-2 in bf16.

Memory: one fresh process per variant. CPU: VmHWM after a reset (/proc/self/clear_refs) minus VmRSS
before the step, with a fixed glibc mmap threshold (freed tensors go back to the OS), after one warm-up
step, grads set to None (so they count); GPU: max_memory_allocated minus the level before the step.
Time: one process, all variants, rotated order per round, with freed pages kept (system.keep_freed_memory,
train.py --keep-freed-memory); a ratio is the median of the per-round ratios, with their min-max.
FLOPs: LM-head matmuls only, 2 per multiply-add: logits 2RdV (student) + 2Rd_tV (teacher) forward and
2 x 2RdV backward (dh, dW) over R = B*T rows; SE-KD adds its scoring pass 2(B*T)dV and has R = selected
rows. Softmax/elementwise work is not counted. Peak = best n^3 GEMM (fp32, bf16; n = 2048, smaller
where a dtype is slow here) before and after the timings, in this run.

    python bench/peers.py --quick          # shapes b, a with selective_head.py's quick sizes
    python bench/peers.py --out peers.json # its full sizes

Prints a table per shape, then `RATIO <metric> <ours>/<best peer> = v` lines. Targets: ours_full <= 1.0x
the best peer's memory and time; ours_sekd20 <= 0.5x its memory and <= 0.7x its time.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the root first: `import cache` is cache.py, not bench/cache.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import config  # noqa: E402
import fused_head  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import selection  # noqa: E402
import system  # noqa: E402
from benchutil import machine, matmul_peak, median_minmax, sync, write_json  # noqa: E402
from selective_head import SHAPE_DEFAULTS, Meter, cpu_peak_reset_works, make_ctx, prepare_a  # noqa: E402

OURS = ["ours_full", "ours_sekd20"]
PEERS = ["torchtune", "trl_gkd", "dense", "liger"]
VARIANTS = OURS + PEERS
TARGETS = {"ours_full": {"peak_mem": 1.0, "step_time": 1.0}, "ours_sekd20": {"peak_mem": 0.5, "step_time": 0.7}}
K, TT_CHUNKS, MB = 0.2, 8, 1 << 20


def peer_status(name, device):
    """None if the peer can run here, else one line saying why not."""
    try:
        if name == "torchtune":
            from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss  # noqa: F401
        elif name == "trl_gkd":
            from trl.experimental.gkd import GKDTrainer  # noqa: F401
        elif name == "liger":
            if torch.device(device).type != "cuda":
                return "skipped: needs CUDA (Triton kernels)"
            from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report any import failure as one line
        return f"not installed/importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def load_inputs(path, device):
    d = torch.load(path)
    x = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()}
    x["hs"].requires_grad_(True)
    x["Ws"].requires_grad_(True)
    return x


def labels(x):
    return torch.where(x["valid"], x["y"], -100)


def ours(x, k):
    """The train.py step's loss: (scoring, top_k), then head_loss on the selected rows. Returns (loss, w)."""
    hs, Ws, y, valid = x["hs"], x["Ws"], x["y"], x["valid"]
    if selection.needs_scores("top_k", k):
        scores = selection.chunked_scores("student_entropy", hs.detach(), Ws.detach(), y, chunk_size=x["chunk"])
    else:
        scores = torch.zeros(y.shape, device=y.device)
    w = selection.POLICIES["top_k"](scores, valid, k)
    sel = w > 0
    rw = losses.normalise_by_samples(w)[sel]
    return fused_head.head_loss(hs[sel], Ws, y[sel], rw, losses.DenseTeacher(x["ht"][sel], x["Wt"]),
                                chunk_size=x["chunk"]), w


def dense_logits(x):
    ls = x["hs"] @ x["Ws"].T
    with torch.no_grad():
        lt = x["ht"] @ x["Wt"].T
    return ls, lt


def run_variant(v, x):
    """One step's loss (before backward)."""
    if v == "ours_full":
        return ours(x, 1.0)[0]
    if v == "ours_sekd20":
        return ours(x, K)[0]
    if v == "dense":
        ls, lt = dense_logits(x)
        kl = F.kl_div(F.log_softmax(ls.float(), -1), F.log_softmax(lt.float(), -1), reduction="none",
                      log_target=True).sum(-1)
        return kl[x["valid"]].mean()
    if v == "trl_gkd":
        from trl.experimental.gkd import GKDTrainer
        ls, lt = dense_logits(x)
        return GKDTrainer.generalized_jsd_loss(ls, lt, labels=labels(x), beta=0.0)
    if v == "torchtune":
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss
        s = [h @ x["Ws"].T for h in x["hs"].chunk(TT_CHUNKS, dim=1)]  # torchtune's chunked output
        with torch.no_grad():
            t = [h @ x["Wt"].T for h in x["ht"].chunk(TT_CHUNKS, dim=1)]
        return ForwardKLWithChunkedOutputLoss(num_output_chunks=TT_CHUNKS)(s, t, labels(x))
    if v == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD
        B, T, d = x["hs"].shape
        return LigerFusedLinearJSD(jsd_beta=0.0)(x["hs"].reshape(B * T, d), x["Ws"], x["ht"].reshape(B * T, -1),
                                                 x["Wt"], labels(x).reshape(-1))
    raise ValueError(v)


def step(v, x):
    x["hs"].grad = x["Ws"].grad = None
    loss = run_variant(v, x)
    loss.backward()
    return float(loss.detach())


def check(x, avail, bf16):
    """Every variant against the dense KL of the same inputs (SE-KD: restricted to its rows)."""
    rtol, gtol = (2e-2, 2e-2) if bf16 else (1e-4, 1e-3)
    with torch.no_grad():
        ls, lt = dense_logits(x)
        kl = losses.kl_per_position(ls.float(), lt.float())  # (B, T) KL(p_t || q_s)
        h_t = losses.entropy(lt.float())[x["valid"]].mean()
    out = {}
    for v in avail:
        w = ours(x, K if v == "ours_sekd20" else 1.0)[1]
        ref_loss = float(selection.batch_mean(w, kl)) if v.startswith("ours") else float(kl[x["valid"]].mean())
        # reference gradients: the dense KL with the same per-position weights
        x["hs"].grad = x["Ws"].grad = None
        kl_g = losses.kl_per_position(*(z.float() for z in dense_logits(x)))
        (selection.batch_mean(w, kl_g) if v.startswith("ours") else kl_g[x["valid"]].mean()).backward()
        ref_g = [x["hs"].grad.clone(), x["Ws"].grad.clone()]
        got = step(v, x)
        if v == "torchtune":  # its own definition (soft CE = KL + H(p_t)) is checked; the KL is shown
            ok_tt = abs(got - (ref_loss + float(h_t))) <= rtol * abs(ref_loss + float(h_t))
            got -= float(h_t)
        gerr = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
                   for g, r in zip([x["hs"].grad, x["Ws"].grad], ref_g))
        ok = (ok_tt if v == "torchtune" else abs(got - ref_loss) <= rtol * abs(ref_loss) + 1e-6) and gerr <= gtol
        out[v] = dict(loss=got, ref=ref_loss, grad_err=gerr, ok=ok)
        print(f"  check {v:12s} loss {got:.6f} ref {ref_loss:.6f} rel {abs(got - ref_loss) / abs(ref_loss):.1e} "
              f"grad rel err {gerr:.1e} -> {'ok' if ok else 'MISMATCH'}", flush=True)
    return out


def flops(v, x, n_rows):
    B, T, d = x["hs"].shape
    dt, V = x["ht"].shape[-1], x["Ws"].shape[0]
    head = 2 * n_rows * V * (3 * d + dt)
    return head + (2 * B * T * d * V if v == "ours_sekd20" else 0)


def worker_memory(a):
    x = load_inputs(a.inputs, a.device)
    step(a.variant, x)  # warm-up: one-time buffers
    x["hs"].grad = x["Ws"].grad = None
    import gc
    gc.collect()
    meter = Meter(a.device)
    base = meter.now()
    meter.reset_peak()
    loss = step(a.variant, x)
    return dict(peak=meter.peak() - base, loss=loss)


def timing(x, avail, reps):
    system.keep_freed_memory()  # as train.py --keep-freed-memory: no page faults from the allocator in the timings
    for v in avail:
        step(v, x)  # warm-up
    times = {v: [] for v in avail}
    for r in range(reps):
        for v in avail[r % len(avail):] + avail[:r % len(avail)]:
            sync(x["hs"].device)
            t0 = time.perf_counter()
            step(v, x)
            sync(x["hs"].device)
            times[v].append(time.perf_counter() - t0)
    return times


def bench_shape(shape, a, avail, prep):
    B, T, reps = SHAPE_DEFAULTS[shape]["quick" if a.quick else "full"]
    reps = max(3, a.reps or reps)
    chunk = a.chunk or config.default_entropy_chunk(torch.device(a.device).type)  # train.py's default
    c = make_ctx(shape, B, T, a.device, prep, K, chunk)
    with torch.no_grad():
        hs, ht = models.trunk(c.student, c.x), models.trunk(c.teacher, c.x)
    path = os.path.join(prep, f"inputs_{shape}.pt")
    torch.save(dict(hs=hs.detach().clone(), ht=ht.detach().clone(), Ws=c.Ws.detach().clone(),
                    Wt=c.Wt.detach().clone(), y=c.y, valid=c.valid, chunk=chunk), path)
    del c, hs, ht
    x = load_inputs(path, a.device)
    V, d, dt = x["Ws"].shape[0], x["hs"].shape[-1], x["ht"].shape[-1]
    print(f"\nshape {shape}: B={B} T={T} V={V} d={d} d_t={dt} chunk={chunk} dtype={x['hs'].dtype}", flush=True)
    chk = check(x, avail, x["hs"].dtype == torch.bfloat16)
    bad = [v for v in avail if not chk[v]["ok"]]
    if bad:
        sys.exit(f"loss/gradient mismatch for {bad}: not timing")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    mem = {}
    for v in avail:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--variant", v, "--inputs", path,
                            "--device", a.device], capture_output=True, text=True, env=env, timeout=1200)
        if p.returncode:
            raise RuntimeError(f"memory worker {v} failed:\n{p.stderr[-2000:]}")
        mem[v] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  memory {v:12s} {mem[v]['peak'] / MB:9.1f} MB", flush=True)
    times = timing(x, avail, reps)
    n_sel = int((ours(x, K)[1] > 0).sum())
    rows = {v: (n_sel if v == "ours_sekd20" else int(x["valid"].sum())) for v in avail}
    return dict(shape=shape, B=B, T=T, V=V, d=d, d_t=dt, chunk=chunk, reps=reps, check=chk, memory=mem,
                times=times, rows=rows, flops={v: flops(v, x, rows[v]) for v in avail})


def report(r, avail, skipped, peak):
    lines = [f"\n### shape {r['shape']}: B={r['B']}, T={r['T']}, V={r['V']}, d={r['d']}, d_t={r['d_t']}, "
             f"chunk={r['chunk']}, step time = median of {r['reps']} alternating rounds\n",
             "| variant | loss | rows | peak MB | step s (median) | min-max s | head GFLOP | GFLOP/s | % fp32 peak | % machine peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in avail:
        med, lo, hi = median_minmax(r["times"][v])
        gf = r["flops"][v] / 1e9
        limit = max(peak["fp32"], peak.get("bf16") or 0)  # the machine's best GEMM dtype
        lines.append(f"| {v} | {r['check'][v]['loss']:.6f} | {r['rows'][v]} | {r['memory'][v]['peak'] / MB:.1f} | "
                     f"{med:.4f} | {lo:.4f}-{hi:.4f} | {gf:.2f} | {gf / med:.1f} | {gf / med / peak['fp32']:.1%} | {gf / med / limit:.1%} |")
    for v, why in skipped.items():
        lines.append(f"| {v} | {why} | | | | | | | | |")
    ratios = []
    peers = [p for p in PEERS if p in avail]
    for ours_v in OURS:
        for metric in ("peak_mem", "step_time"):
            val = (lambda v: r["memory"][v]["peak"]) if metric == "peak_mem" else \
                (lambda v: median_minmax(r["times"][v])[0])
            best = min(peers, key=val)
            ratio, spread = val(ours_v) / val(best), ""
            if metric == "step_time":  # the median of per-round ratios (same round, alternating order), min-max
                ratio, lo, hi = median_minmax([o / p for o, p in zip(r["times"][ours_v], r["times"][best])])
                spread = f"median of {len(r['times'][best])} paired rounds; min {lo:.3f}, max {hi:.3f}"
            ratios.append((metric, ours_v, best, ratio, TARGETS[ours_v][metric], spread))
    return "\n".join(lines), ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="selective_head.py's quick sizes and repeats")
    p.add_argument("--shapes", default="b,a")
    p.add_argument("--reps", type=int, help="timed rounds (>= 3)")
    p.add_argument("--chunk", type=int, help="rows of logits per chunk of ours (train.py --entropy-chunk); "
                   "default train.py's: 256 on a CPU, 1024 on a GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="save all numbers to this JSON file (atomic)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.chunk is not None and a.chunk < 1:
        p.error("--chunk must be >= 1")
    if a.worker:
        print(json.dumps(worker_memory(a)))
        return
    if torch.device(a.device).type == "cpu" and not cpu_peak_reset_works():
        sys.exit("CPU memory measure needs /proc/self/clear_refs (Linux); not available here")
    mach = machine()
    print(f"machine: {mach['cpu_count']} CPUs ({mach['cpu']}), torch {mach['torch']}, threads {mach['threads']}, "
          f"device {a.device}{' (' + mach['gpu'] + ')' if mach['gpu'] else ''}", flush=True)
    skipped = {v: s for v in PEERS if (s := peer_status(v, a.device))}
    avail = [v for v in VARIANTS if v not in skipped]
    vers = {}
    for mod in ("torchtune", "trl", "liger_kernel", "torchao"):
        try:
            from importlib.metadata import version
            vers[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            vers[mod] = None
    print("peers: " + ", ".join(f"{m} {v or 'not installed'}" for m, v in vers.items()), flush=True)
    for v, why in skipped.items():
        print(f"{v}: {why}", flush=True)
    peak, gemm_n = {}, {}
    for dt, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        peak[key], gemm_n[key] = matmul_peak(dt, device=a.device)
    results, all_ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="sekd_peers_") as prep:
        shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
        if "a" in shapes:
            B, T, _ = SHAPE_DEFAULTS["a"]["quick" if a.quick else "full"]
            prepare_a(B, T, prep)
        for s in shapes:
            results.append(bench_shape(s, a, avail, prep))
    # the GEMM peak again after the timings: the cores are shared, so keep the better of the two
    for dt, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        again, gemm_n[key] = matmul_peak(dt, device=a.device)
        peak[key] = max(peak[key] or 0, again or 0) or None
    print(f"\nmachine matmul peak (best n^3 GEMM, before and after the run): fp32 {peak['fp32']:.1f} GFLOP/s "
          f"(n={gemm_n['fp32']}), bf16 " + (f"{peak['bf16']:.1f} GFLOP/s (n={gemm_n['bf16']})" if peak["bf16"] else "n/a")
          + f"; variants run in {'bf16' if a.device.startswith('cuda') else 'fp32'}; machine peak = the faster of the two")
    for r in results:
        t, all_ratios[r["shape"]] = report(r, avail, skipped, peak)
        print(t)
    print("\n### targets (ratio to the best peer for that metric, same shape and machine)\n")
    for s, rs in all_ratios.items():
        for metric, o, best, v, thr, _ in rs:
            print(f"- shape {s}: {o} {metric} / best peer ({best}) = {v:.3f} (<= {thr}) -> "
                  f"{'met' if v <= thr else 'NOT met'}")
    print()
    for s, rs in all_ratios.items():
        for metric, o, best, v, _, spread in rs:
            tag = metric if s == "b" else f"{metric}@shape_{s}"
            print(f"RATIO {tag} {o}/{best} = {v:.3f}" + (f" ({spread})" if spread else ""))
    if a.out:
        write_json(a.out, dict(machine=mach, argv=sys.argv, peers=vers, skipped=skipped, peak_gflops=peak, gemm_n=gemm_n,
                               results=results))


if __name__ == "__main__":
    main()
