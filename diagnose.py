"""Where selection aims: which positions a score picks, and where each method's student ends up.

    python diagnose.py step1 --preset sandbox       # the near regime: sandbox.py's pretrained pair
    python diagnose.py step1 --preset tiny          # the far regime: SmolLM2 and its 8-layer cut
    python diagnose.py step1 --batches 4 --preset sandbox --seed 1   # after step1's own flags, train.py's
    python diagnose.py quintiles out/lr_sweep/*_lr0.0003/seed*   # held-out numbers by the student's entropy
    python diagnose.py answers --preset sandbox     # where the suite's answers sit among those quintiles

step1. SE-KD's premise is that the positions where the student is unsure are where its teacher still
has something to teach. Before any update (the first --batches training batches),
for every position metric (selection.METRICS) this picks the top --k of each sequence, as train.py's
top_k policy does (the train.py flags after step1's own name the run: its pair, text and seed; the
batches are the training split's first, in fp32), and prints

    KL on the selected positions / KL on all valid positions,   KL = KL(p_teacher || q_student),

the mean of the per-batch ratios and their range. 1.0 is what random selection gets on average; above 1,
the metric aims at positions where the student disagrees with its teacher; KL itself is the ceiling.

quintiles. Splits the held-out positions (the runs' text, --split) into five equal groups by the
undistilled student's entropy H(q) (the same positions for every run), and prints per group the mean
KL(p || q), the student's CE on the true token and its top-1 accuracy: for the undistilled student, each
run name (mean ± sd over seeds), and each run name minus --baseline, paired by seed, with a 95% t interval
(report.paired_stats; * = the interval excludes 0). SE-KD trains on the high-entropy end only: this shows
what that does to the positions it trains on and to those it never sees.

answers. Where the downstream suite's answers sit on the same entropy scale: for each suite task
(suite.SUITE, --split of the suite), the undistilled student's entropy at the positions that decide
the example, i.e. those that predict the gold continuation's tokens from the first token where it
differs from another choice (the choices' common prefix scores the same for all of them), and the share
of those positions in each quintile of the held-out text's entropy (the quintiles' edges, from the
train.py flags' pair and text; in fp32, as step1, whatever --dtype says). Equal shares (20% each) would
mean the suite asks about positions like any other; a share piled in Q1 means it asks about the
confident positions SE-KD never trains on.
"""
import os
import sys
import tempfile

import torch

import common
import config
import data
import eval as eval_  # encode_pair: the suite's context / continuation split, as its scorer makes it
import heldout
import losses
import models
import report
import selection
import suite

QUINTILES = 5


# -----------------------------------------------------------------------------
# step 1: KL on what a metric selects / KL on the batch

@torch.no_grad()
def step1(train_argv, k=0.2, batches=8, metrics=None):
    """({metric: [ratio per batch]}, a line naming the pair) for the first `batches` batches of the training
    split of the run `train.py *train_argv` would make (its pair, text and seed), before any update, in fp32."""
    args = config.parse_args([*train_argv, "--out-dir", tempfile.gettempdir()])  # presets and checks only
    tok = models.load_tokenizer(args.teacher)
    teacher, _ = models.load_model(args.teacher)
    if args.student:
        student, s_tok = models.load_model(args.student, flag="--student")
        V = models.check_vocab(tok, s_tok)
    else:  # the tiny preset's student: the teacher with --student-layers kept
        keep = models.parse_layers(args.student_layers, teacher.config.num_hidden_layers)
        student, V = models.layer_dropped_student(lambda: teacher, keep, "cpu", tok), len(tok)
    rows = data.load_splits(tok, args.data, args.seq_len, args.tokens, args.eval_tokens, args.seed, args.text_field,
                            args.tokenizer_backend, models.tokenizer_fingerprint(tok))["train"]
    Ws, Wt = models.head_weight(student, V), models.head_weight(teacher, V)
    ratios, kl_all = {m: [] for m in metrics or selection.METRICS}, []
    for step, (x, y, valid) in enumerate(rows.batches(args.batch_size)):
        if step == batches:
            break
        hs, ht = models.trunk(student, x), models.trunk(teacher, x)  # (B, T, d), (B, T, d_t)
        scores = {m: selection.chunked_scores(m, hs, Ws, y, ht, Wt, args.entropy_chunk, common.generator(args.seed, step))
                  for m in set(ratios) | {"kl"}}  # (B, T) each
        kl = scores["kl"]  # KL(p || q) per position
        kl_all.append(float(kl[valid].mean()))
        for m in ratios:
            sel = selection.POLICIES["top_k"](scores[m], valid, k) > 0
            ratios[m].append(float(kl[sel].mean() / kl[valid].mean()))
    if not kl_all:
        raise common.UserError(f"{' '.join(train_argv)}: no training batch to read")
    student_name = args.student or f"teacher layers {args.student_layers}"
    head = (f"--preset {args.preset}: teacher {args.teacher}, student {student_name}, {len(kl_all)} batches of "
            f"{args.batch_size} x {args.seq_len}, seed {args.seed}, k = {k}; mean KL on a batch "
            f"{sum(kl_all) / len(kl_all):.4f} nats")
    return ratios, head


def format_step1(ratios, head):
    lines = [head, "", "| metric | KL on selected / KL on batch | min | max |", "|---|---:|---:|---:|"]
    for m, v in sorted(ratios.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {m} | {sum(v) / len(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# quintiles: held-out KL, CE and top-1 by the undistilled student's entropy

# what fixes the pair and the held-out positions (the training budget and the seed do not: the held-out
# documents are chosen by hash, and quintiles reads them in seed 0's order)
PAIR_KEYS = ("teacher", "student", "data", "seq_len", "eval_tokens", "text_field", "tokenizer_backend")


def _runs(run_dirs):
    """[(run name, seed, run dir, config)]; every run needs model/ and the same pair and text."""
    runs = []
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, "config.json")) or not os.path.isdir(os.path.join(d, "model")):
            raise common.UserError(f"{d}: not a finished train.py run with model/ (quintiles load the model)")
        cfg = common.read_json(os.path.join(d, "config.json"))
        if not cfg.get("student"):
            raise common.UserError(f"{d}: quintiles need a run with --student (the undistilled model to compare)")
        runs.append((cfg.get("run_name") or os.path.basename(d), cfg.get("seed", 0), d, cfg))
    for key in PAIR_KEYS:
        if len({str(c.get(key)) for *_, c in runs}) > 1:
            raise common.UserError(f"the runs have different --{key.replace('_', '-')} values: quintiles compare "
                                   "one pair's runs on one held-out text")
    return runs


def quintile_edges(entropy):
    """(QUINTILES - 1,) cut points that split the entropies (N,) into equal fifths; bucketize gives the group."""
    return torch.quantile(entropy, torch.linspace(0, 1, QUINTILES + 1, dtype=torch.float64)[1:-1])


@torch.no_grad()
def quintiles(run_dirs, split="test", log=print):
    """(edges, {name: rows}) where rows[i] = {metric: (QUINTILES,) tensor} for the i-th seed, and name
    'undistilled' for the student before KD; held-out positions grouped by the undistilled entropy."""
    runs = _runs(run_dirs)
    cfg = runs[0][3]
    tok = models.load_tokenizer(cfg["teacher"])
    teacher = models.load_model(cfg["teacher"])[0]
    kw = report.data_kwargs(cfg)
    kw["seed"] = 0  # the held-out documents are chosen by hash; one order for every run's seed
    held = data.load_splits(tok, splits=(split,), **kw)[split]
    V = len(tok)

    def positions(model):
        return heldout.per_position(model, held.batches(16), teacher, V)

    base = positions(models.load_model(cfg["student"])[0])
    edges = quintile_edges(base["entropy"])
    group = torch.bucketize(base["entropy"], edges)  # (N,) in 0..QUINTILES-1, by the undistilled entropy

    def by_group(per):
        return {m: torch.stack([per[m][group == q].mean() for q in range(QUINTILES)]) for m in ("kl", "ce", "top1")}

    out = {"undistilled": {0: by_group(base)}}
    for run_name, seed, d, _ in runs:
        log(f"quintiles: {d}")
        out.setdefault(run_name, {})[seed] = by_group(positions(models.load_model(os.path.join(d, "model"))[0]))
    return edges, out, int(group.numel())


def format_quintiles(edges, out, n, baseline=None):
    cuts = [0.0] + [float(e) for e in edges] + [float("inf")]
    head = " | ".join(f"Q{q + 1} H in [{cuts[q]:.2f}, {cuts[q + 1]:.2f})" for q in range(QUINTILES))
    lines = [f"{n} held-out positions, {n // QUINTILES} a quintile, grouped by the undistilled student's entropy "
             f"H(q) (Q1 lowest). Mean ± sd over seeds; Δ rows: run - {baseline}, paired by seed, 95% t interval."]
    for metric, title, fmt in (("kl", "KL(p || q), nats", ".4f"), ("ce", "student CE on the true token, nats", ".4f"),
                               ("top1", "student top-1 accuracy", ".4f")):
        lines += ["", f"**{title}**", "", f"| run | n | {head} |", "|---|---:|" + "---:|" * QUINTILES]
        for name, seeds in out.items():
            vals = [seeds[s][metric] for s in sorted(seeds)]
            cells = [report.format_mean_std(report.mean_std([float(v[q]) for v in vals]), fmt) for q in range(QUINTILES)]
            lines.append(f"| {name} | {len(vals)} | " + " | ".join(cells) + " |")
        if baseline in out:
            for name, seeds in out.items():
                if name in (baseline, "undistilled"):
                    continue
                common_seeds = sorted(set(seeds) & set(out[baseline]))
                cells = [report.format_paired(report.paired_stats(
                    [float(seeds[s][metric][q] - out[baseline][s][metric][q]) for s in common_seeds]), "+" + fmt)
                    for q in range(QUINTILES)]
                lines.append(f"| Δ {name} | {len(common_seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# answers: the suite's deciding positions on the held-out entropy scale

def _shared(a, b):
    """How many leading tokens the lists a and b share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def deciding(context_ids, conts, gold):
    """Indices into context_ids + conts[gold] of the positions whose next-token distribution scores the
    gold's tokens from its first one that differs from another choice's (all of them with no other choice)."""
    g = conts[gold]
    p = min((_shared(g, c) for i, c in enumerate(conts) if i != gold), default=0)
    return [len(context_ids) - 1 + j for j in range(min(p, len(g) - 1), len(g))]  # >= 1: the gold's last


@torch.no_grad()
def answers(train_argv, split="test", tasks=suite.SUITE):
    """(edges, {task: (examples, H (n,) at every deciding position, H (examples,) at each example's first)},
    head) for the pair and text that `train.py *train_argv` names, H the undistilled student's entropy;
    edges: quintile_edges of its entropy on the held-out test text (the quintiles' positions)."""
    args = config.parse_args([*train_argv, "--out-dir", tempfile.gettempdir()])
    if not args.student:
        raise common.UserError("answers needs a pair with --student (the undistilled model), e.g. --preset sandbox")
    examples = {task: suite.examples(task, split) for task in tasks}  # before any model: is the suite built?
    tok = models.load_tokenizer(args.teacher)
    teacher, _ = models.load_model(args.teacher)
    student, s_tok = models.load_model(args.student, flag="--student")
    V = models.check_vocab(tok, s_tok)
    kw = dict(report.data_kwargs(vars(args)), seed=0)  # the held-out positions quintiles reads
    held = data.load_splits(tok, splits=("test",), **kw)["test"]
    edges = quintile_edges(heldout.per_position(student, held.batches(16), teacher, V)["entropy"])
    out = {}
    for task in tasks:
        exs, hs, firsts = examples[task], [], []
        for ex in exs:
            conts = [" " + c for c in ex["choices"]] if "choices" in ex else [ex["target"]]
            pairs = [eval_.encode_pair(tok, ex["context"], c) for c in conts]
            gold = ex.get("gold", 0)
            ids = pairs[gold][0] + pairs[gold][1]
            logits = student(torch.tensor([ids])).logits[0, :, :V]  # (T, V)
            h = losses.entropy(logits[deciding(pairs[gold][0], [c for _, c in pairs], gold)].float())
            hs.append(h)
            firsts.append(h[:1])  # where the choices part
        out[task] = (len(exs), torch.cat(hs).double(), torch.cat(firsts).double())
    head = (f"--preset {args.preset}: student {args.student}; held-out test text {int(held.valid.sum())} positions; "
            f"suite part {split}")
    return edges, out, head


def format_answers(edges, out, head):
    cuts = [0.0] + [float(e) for e in edges] + [float("inf")]
    cols = " | ".join(f"Q{q + 1} [{cuts[q]:.2f}, {cuts[q + 1]:.2f})" for q in range(QUINTILES))
    lines = [head, "", f"| task | positions | n | mean H | {cols} |", "|---|---|---:|---:|" + "---:|" * QUINTILES]
    for task, (_, h_all, h_first) in out.items():
        for which, h in (("every deciding", h_all), ("the first deciding", h_first)):
            share = torch.bincount(torch.bucketize(h, edges), minlength=QUINTILES).double() / max(h.numel(), 1)
            lines.append(f"| {task} | {which} | {h.numel()} | {float(h.mean()):.2f} | "
                         + " | ".join(f"{float(x):.1%}" for x in share) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    ap = common.ArgumentParser(prog="diagnose.py", description="where selection aims (see the module doc)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("step1", help="KL on the selected positions / KL on the batch, every metric, step 1; "
                       "other flags are train.py's, naming the run (default --preset sandbox)")
    a.add_argument("--k", type=float, default=0.2, help="fraction of each sequence selected")
    a.add_argument("--batches", type=int, default=8, help="training batches averaged (before any update)")
    b = sub.add_parser("quintiles", help="held-out KL, CE, top-1 per quintile of the undistilled entropy")
    b.add_argument("runs", nargs="+", help="train.py run dirs with model/ (one pair)")
    b.add_argument("--split", choices=["val", "test"], default="test", help="held-out split of the text")
    b.add_argument("--baseline", default=None, help="run name the Δ rows subtract (e.g. full_kd)")
    c = sub.add_parser("answers", help="the suite's deciding positions per quintile of the held-out entropy; "
                       "other flags are train.py's, naming the pair (default --preset sandbox)")
    c.add_argument("--split", choices=list(suite.SPLITS), default="test", help="the suite's part")
    for p in (a, b, c):
        p.add_argument("--out", help="also write the table to this file")
    args, train_flags = ap.parse_known_args(argv)  # step1, answers: the rest are train.py flags naming the run
    if train_flags and args.cmd == "quintiles":
        ap.error(f"unrecognized arguments: {' '.join(train_flags)}")

    def run():
        if args.cmd == "step1":
            if not 0 < args.k <= 1 or args.batches < 1:
                raise common.UserError("--k must be in (0, 1] and --batches >= 1")
            text = format_step1(*step1(train_flags or ["--preset", "sandbox"], args.k, args.batches))
        elif args.cmd == "answers":
            text = format_answers(*answers(train_flags or ["--preset", "sandbox"], args.split))
        else:
            text = format_quintiles(*quintiles(args.runs, args.split), baseline=args.baseline)
        print(text)
        if args.out:
            common.atomic_write(args.out, text)

    common.run_cli(run, "diagnose.py")


if __name__ == "__main__":
    main(sys.argv[1:])
