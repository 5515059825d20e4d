"""The sandbox's downstream suite: benchmarks of the paper's kinds, built from stdlib files neither model saw.

The paper's evidence is downstream accuracy (HellaSwag, PIQA, ARC-E, GSM8K, LAMBADA), never held-out KL
on the distillation text. The sandbox pair (sandbox.py) knows only Python code, so its suite is made of
code, one benchmark file in the manner of build-nanogpt's hellaswag.py. Every task is multiple choice by
log-likelihood (eval.score_multiple_choice: acc and length-normalised acc_norm, lm-evaluation-harness's
definitions) or LAMBADA-style (eval.score_lambada: greedy acc and word perplexity).

The suite (SUITE: accepted for the sandbox pair, see the numbers below; suite_acc is their mean):
  next_indent  the true next line at its indentation against the same line 4 spaces left and right
               (3 choices; acc: every choice holds the same text, so raw log-likelihood compares them).
  line_end     the true end of a line (the brackets it closes, a colon, a comma) against every other
               common ending one edit away, each followed by the next line's indentation (4-12 choices;
               acc_norm, the paper's metric for choice tasks).
Candidates (TASKS; scored with eval.py --tasks, rejected for this pair: the teacher does not beat the
student on them, see below; a stronger pair may pass them):
  next_line    HellaSwag-style: the true next line against 3 lines of the same file with the same
               indentation and a similar length, none in the context, each unique in the file (acc_norm).
  pick_name    LAMBADA as a choice: the identifier after ' ' against 3 other identifiers of the context.
  last_word    LAMBADA-style: the identifier after ' ', which also occurs in the context (acc, word PPL).
  swap_name    PIQA-style: the true next line against it with one identifier swapped for another of the
               file of similar length (acc_norm).
  line_order   PIQA-style: two consecutive lines of one indentation against the two swapped (acc).

Text. Only the sandbox's `probe` part (sandbox.part_of: 5% of the stdlib's .py files by a hash of the
path), read from the build's corpus/probe.jsonl: the pair CE-pretrains on `pretrain` and distils on `kd`,
so no model has seen a suite example. Each file goes by a hash of its path to `validation` (choosing
lr and budgets) or `test` (the tables): the parts share no file. Which positions become examples, the
distractors and the gold's place are hashes of (task, file, position) too (common.seed_from): the same
files give the same examples on every machine, with no seed and no clock.

Window. The pair was trained on seq_len-token sequences (128 at full scale, read from the build's
pretraining configs); every example's context + longest continuation fits in that many tokens of the
sandbox tokenizer, its context cut at a line start. sandbox.py's probe.jsonl contexts (400 characters)
are 46-188 tokens, median 111: 78 of its 300 run past the window (`python suite.py` counts them).

Acceptance (`python suite.py --accept`): a task counts in the headline only if
  (a) the teacher beats the undistilled student by >= 5 points, with a paired bootstrap 95% interval
      (examples resampled, 2,000 draws, fixed by hash) that excludes 0;
  (b) the teacher scores <= 85% (the task is not saturated);
  (c) Full KD moves the student toward the teacher: its accuracy rises (and for last_word its word
      NLL falls, i.e. word PPL moves toward the teacher's).

    python suite.py                                   # examples per task and part; token counts
    python suite.py --write out/suite/examples        # also the examples, one JSONL per task and part
    python eval.py RUN --suite sandbox                # a run's saved model: RUN/eval.json, suite acc
    R=~/.cache/nano-sekd/sandbox-v1; T=next_line,pick_name,last_word,swap_name,next_indent,line_order,line_end
    python eval.py $R/teacher --tasks $T --split validation --out out/suite/teacher    # and $R/student
    python train.py --preset sandbox --k 1.0 --out-dir out/suite_fullkd && python eval.py out/suite_fullkd --tasks $T
    python suite.py --accept out/suite/teacher out/suite/student out/suite_fullkd --split validation

Reference numbers (2026-12-06, AMD EPYC, 2 cores; the full-scale pair of `python sandbox.py`; Full KD
= the commands above: --preset sandbox, lr 3e-3, seed 0). Accuracy in %, differences with paired
bootstrap 95% intervals, n = 500 an example (485 for line_end validation):
    task         part  teacher  student  Full KD  teacher - student     Full KD - student
    next_indent  val   70.6     55.2     60.0     +15.4 [+11.4, +19.6]  +4.8 [+1.6, +8.0]    accepted
                 test  65.8     50.0     57.8     +15.8 [+11.4, +20.6]  +7.8 [+4.0, +11.8]   accepted
    line_end     val   80.4     63.7     67.6     +16.7 [+13.2, +20.4]  +3.9 [+1.2, +6.6]    accepted
                 test  78.4     56.4     69.0     +22.0 [+18.0, +26.0]  +12.6 [+9.4, +15.8]  accepted
    suite_acc    val   75.5     59.5     63.8
                 test  72.1     53.2     63.4
    next_line    val   33.0     30.4     28.2     +2.6 [+0.0, +5.2]     -2.2 [-4.8, +0.4]    (a), (c) fail
                 test  26.6     27.6     27.8     -1.0 [-3.2, +1.0]     +0.2 [-1.4, +2.0]    (a) fails
    pick_name    val   48.0     48.0     43.0     +0.0 [-1.8, +1.8]     -5.0 [-7.4, -2.8]    (a), (c) fail
                 test  33.8     33.2     32.6     +0.6 [-1.6, +2.8]     -0.6 [-2.6, +1.4]    (a), (c) fail
    last_word    val   12.0     11.8      0.0     +0.2 [+0.0, +0.6]     -11.8 [-14.8, -9.0]  (a), (c) fail
                 test   0.2      0.0      0.2     +0.2 [+0.0, +0.6]     +0.2 [+0.0, +0.6]    (a) fails
      word PPL: val 4.9e4 / 7.3e4 / 2.4e5, test 1.8e5 / 2.8e5 / 2.3e5 (teacher / student / Full KD)
    swap_name    val   71.6     69.4     69.4     +2.2 [+0.0, +4.4]     +0.0 [-2.0, +1.8]    (a), (c) fail
                 test  65.6     64.0     64.8     +1.6 [-0.6, +4.0]     +0.8 [-1.2, +2.8]    (a) fails
    line_order   val   51.4     51.0     45.6     +0.4 [-5.2, +5.8]     -5.4 [-10.0, -0.8]   (a), (c) fail
                 test  57.6     54.6     53.8     +3.0 [-2.0, +7.8]     -0.8 [-5.2, +3.4]    (a), (c) fail
Why structure and not names: on the validation files' text (300 windows of 128 tokens) the teacher's
top-1 beats the student's by 15 points on punctuation tokens (46.9 vs 31.9) and 13 on newline+indent
tokens (58.5 vs 45.3), but by 1 on identifier tokens (12.8 vs 11.9): in this pair, the tasks that turn
on names sit at the floor for both models. The two accepted tasks were shaped on the validation part
(next_indent first; line_end with 3 distractors had the teacher at 90%, above (b)); test confirms them.
Selection (RandomPos, SE-KD) on the suite over five learning rates: docs/results.md, "The step size".
"""
import bisect
import builtins
import functools
import hashlib
import json
import keyword
import math
import os
import re
import statistics

from common import (ArgumentParser, UserError, atomic_write, generator, read_json, read_jsonl, run_cli, seed_from,
                    writable_dir_problem)

SPLITS = ("validation", "test")
N_PER_SPLIT = 500  # examples per task and part: a 5-point paired difference resolves at this size
PER_FILE = 100  # at most this many examples of one file per task and part: no file dominates a task
CHOICES = 4  # next_line and pick_name: the gold and 3 distractors (HellaSwag's 4)
MIN_CONTEXT = 0.25  # the context fills at least this share of the window
THRESHOLDS = dict(gap=0.05, ceiling=0.85)  # acceptance (a) and (b)
BOOTSTRAP = 2000

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NAME = re.compile(r"(?<= )[A-Za-z_][A-Za-z0-9_]{3,}(?![A-Za-z0-9_])")  # >= 4 characters after a space
ENDINGS = (")", "):", ",", ":", "(", "]", "),", "))", "])", "}", "[", "{")  # Python lines end so most often
# names a model predicts from syntax, not from its context: not LAMBADA-style targets
COMMON = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | {"self", "cls"}


# -----------------------------------------------------------------------------
# the text: the sandbox's probe part, two disjoint parts by file

def split_of(relpath):
    """'validation' or 'test' for a probe file, by a hash of its path."""
    return SPLITS[int(hashlib.sha256(f"suite:{relpath}".encode()).hexdigest()[:8], 16) % 2]


def probe_files(root):
    """[(relpath, text)] of the build's probe part, in the corpus's (sorted) order."""
    import sandbox
    path = os.path.join(root, "corpus", "probe.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"the sandbox pair is not built in {root} (no corpus/probe.jsonl): run python sandbox.py")
    rows = read_jsonl(path, "the sandbox's probe corpus")
    bad = [r["id"] for r in rows if sandbox.part_of(r["id"]) != "probe"]
    if bad:  # a suite example from text a model trained on would measure memory, not skill
        raise UserError(f"{path}: {bad[0]} is not a probe-part file; rebuild the sandbox (python sandbox.py)")
    return [(r["id"], r["text"]) for r in rows]


def window(root):
    """The sequence length both models were pretrained on (the window they know)."""
    lens = []
    for role in ("teacher", "student"):
        path = os.path.join(root, f"pretrain-{role}", "config.json")
        if not os.path.isfile(path):
            raise UserError(f"the sandbox pair is not built in {root} (no {path}): run python sandbox.py")
        lens.append(int(read_json(path)["seq_len"]))
    return min(lens)


def load_tokenizer(root):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))


def encoder(tok):
    """str -> token ids as eval.py encodes them (no special tokens)."""
    return lambda text: tok.encode(text, add_special_tokens=False)


# -----------------------------------------------------------------------------
# building blocks

def line_starts(text):
    """Offsets where the lines of `text` start (0 and after each newline)."""
    return [0] + [m.end() for m in re.finditer("\n", text)]


def fit_context(text, starts, end, tail, encode, win, min_tokens):
    """The longest text[start:end] with `start` a line start (from `starts`) that leaves room for `tail`
    (what the scorer appends: the longest continuation) in `win` tokens; None when fewer than `min_tokens`
    tokens of context fit. The scorer feeds context + continuation[:-1], so len(encode(context + tail))
    <= win keeps every position inside the window the models were trained on."""
    hi = bisect.bisect_left(starts, end) - 1  # the last line start before `end`
    lo = bisect.bisect_left(starts, end - 16 * win)  # no token is longer than 16 characters here
    best = None
    while lo <= hi:  # the earliest start that fits: fewer tokens as the start moves right
        mid = (lo + hi) // 2
        if len(encode(text[starts[mid]:end] + tail)) <= win:
            best, hi = text[starts[mid]:end], mid - 1
        else:
            lo = mid + 1
    return best if best is not None and len(encode(best)) >= min_tokens else None


def _pick(items, n, *key):
    """The first n of `items` in an order fixed by a hash of `key` and each item."""
    return sorted(items, key=lambda it: seed_from(*key, it))[:n]


def _place(gold, others, *key):
    """choices with the gold at a hashed position; (choices, gold index)."""
    g = seed_from(*key, "gold") % (len(others) + 1)
    return others[:g] + [gold] + others[g:], g


def _choice_example(context, gold, others, key, encode, win):
    """{context, choices, gold}: the gold among `others` at a place hashed from `key`; None when a choice
    does not fit the window after the context."""
    choices, g = _place(gold, others, *key)
    if not _fits(encode, win, context, [" " + c for c in choices]):
        return None
    return {"context": context, "choices": choices, "gold": g}


def _names(text):
    return {m.group() for m in IDENT.finditer(text) if len(m.group()) >= 4 and m.group() not in COMMON}


def _fits(encode, win, context, continuations):
    return all(len(encode(context + c)) <= win for c in continuations)


# -----------------------------------------------------------------------------
# the tasks: a builder lists a file's candidate positions cheaply, as (key, make); make() is the example or
# None (it tokenizes, so build_examples calls it only until a file has enough examples)

def code_line(line):
    """(indent, body) of a line that can be a gold or a distractor: indented by spaces, code (not a
    comment), 12-80 characters; None otherwise."""
    body = line.lstrip(" ")
    indent = line[:len(line) - len(body)]
    ok = indent and not body[:1].isspace() and 12 <= len(body) <= 80 and not body.startswith("#")
    return (indent, body) if ok else None


def _next_line_sites(rel, text, encode, win, task):
    """(key, make) for lines with >= 3 distractor lines: make() -> (context, gold body, distractors).
    The context ends with the newline and the indentation less one space: the scorer's ' ' + choice
    completes the line exactly as the file has it."""
    lines, starts = text.split("\n"), line_starts(text)
    counts = {}
    for line in lines:
        counts[line.strip()] = counts.get(line.strip(), 0) + 1
    by_indent = {}
    for i, line in enumerate(lines):
        if code_line(line) and counts[line.strip()] == 1:  # unique: a distractor never equals the gold
            by_indent.setdefault(code_line(line)[0], []).append(i)
    for indent, idx in by_indent.items():
        for i in idx:
            body = lines[i][len(indent):]
            similar = [lines[j][len(indent):] for j in idx
                       if j != i and abs(len(lines[j]) - len(lines[i])) <= max(4, len(body) // 4)]
            if len(similar) < CHOICES - 1:
                continue

            def make(i=i, indent=indent, body=body, similar=similar):
                ctx = fit_context(text, starts, starts[i], indent + max(similar + [body], key=len), encode, win,
                                  int(win * MIN_CONTEXT))
                if ctx is None:
                    return None
                seen = {ln.strip() for ln in ctx.split("\n")}
                others = [s for s in similar if s.strip() not in seen]  # never a line the context shows
                return (ctx + indent[:-1], body, others) if len(others) >= CHOICES - 1 else None
            yield (task, rel, i), make


def _from_sites(sites, build):
    """(key, make) per (key, site) of a site finder, where make() is build(key, *site()), or None when the
    site found nothing: the tasks that share a finder differ only in what they build from its finds."""
    for key, site in sites:
        def make(key=key, site=site):
            found = site()
            return None if found is None else build(key, *found)
        yield key, make


def next_line(rel, text, encode, win):
    """HellaSwag-style: {context, choices, gold}: the true next line and 3 of its distractors."""
    def build(key, context, body, others):
        return _choice_example(context, body, _pick(others, CHOICES - 1, *key), key, encode, win)
    return _from_sites(_next_line_sites(rel, text, encode, win, "next_line"), build)


def swap_name(rel, text, encode, win):
    """PIQA-style: the true next line against the same line with one name swapped for another name of
    the file of similar length (never one the line already holds)."""
    names = sorted(_names(text))
    lines, starts = text.split("\n"), line_starts(text)
    for i, line in enumerate(lines):
        if not code_line(line):
            continue
        indent, body = code_line(line)
        spans = [m for m in IDENT.finditer(body) if len(m.group()) >= 4 and m.group() not in COMMON]
        if not spans:
            continue

        def make(i=i, indent=indent, body=body, spans=spans):
            key = ("swap_name", rel, i)
            m = spans[seed_from(*key, "span") % len(spans)]
            own = set(IDENT.findall(body))
            subs = [n for n in names if n not in own and abs(len(n) - len(m.group())) <= 2]
            if not subs:
                return None
            swapped = body[:m.start()] + _pick(subs, 1, *key)[0] + body[m.end():]
            ctx = fit_context(text, starts, starts[i], indent + max(body, swapped, key=len), encode, win,
                              int(win * MIN_CONTEXT))
            if ctx is None:
                return None
            return _choice_example(ctx + indent[:-1], body, [swapped], key, encode, win)
        yield ("swap_name", rel, i), make


def next_indent(rel, text, encode, win):
    """The true next line at its indentation against the same line 4 spaces left and 4 spaces right:
    where a block opens and closes is the code's structure. Lines indented >= 8 spaces, so every choice
    keeps >= 4 (the scorer's ' ' starts it)."""
    lines, starts = text.split("\n"), line_starts(text)
    for i, line in enumerate(lines):
        if not code_line(line) or len(code_line(line)[0]) < 8:
            continue
        indent, body = code_line(line)

        def make(i=i, indent=indent, body=body):
            key = ("next_indent", rel, i)
            ctx = fit_context(text, starts, starts[i], indent + "    " + body, encode, win, int(win * MIN_CONTEXT))
            if ctx is None:
                return None
            return _choice_example(ctx, indent[1:] + body, [indent[5:] + body, indent[1:] + "    " + body], key,
                                   encode, win)
        yield ("next_indent", rel, i), make


def line_order(rel, text, encode, win):
    """PIQA-style: two consecutive lines of one indentation in the file's order against the two swapped."""
    lines, starts = text.split("\n"), line_starts(text)
    for i in range(len(lines) - 1):
        first, second = code_line(lines[i]), code_line(lines[i + 1])
        if not first or not second or first[0] != second[0] or first[1] == second[1]:
            continue
        indent = first[0]

        def make(i=i, indent=indent, a=first[1], b=second[1]):
            key = ("line_order", rel, i)
            right, swapped = a + "\n" + indent + b, b + "\n" + indent + a
            ctx = fit_context(text, starts, starts[i], indent + right, encode, win, int(win * MIN_CONTEXT))
            if ctx is None:
                return None
            return _choice_example(ctx + indent[:-1], right, [swapped], key, encode, win)
        yield ("line_order", rel, i), make


def _one_edit(a, b):
    """True when one insertion, deletion or substitution turns a into b."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:j] + long_[j + 1:] == short for j in range(len(long_)))


def line_end(rel, text, encode, win):
    """The true end of a line (the brackets it closes, a colon, a comma) against every other of the common
    ENDINGS one edit away (a bracket or colon more, less or different: 4 to 12 choices), each followed by
    the newline and the next line's indentation less one space (as BPE splits it before the next word):
    which brackets are open and whether a block starts."""
    lines, starts = text.split("\n"), line_starts(text)
    for i in range(len(lines) - 1):
        if not code_line(lines[i]) or not lines[i + 1].strip():
            continue
        indent, body = code_line(lines[i])
        m = re.search(r"[)\]}:,(\[{]+$", body)
        if not m or m.group() not in ENDINGS or m.start() < 4:
            continue
        after = "\n" + lines[i + 1][:len(lines[i + 1]) - len(lines[i + 1].lstrip(" ")) - 1]

        def make(i=i, indent=indent, head=body[:m.start()], end=m.group(), after=after):
            key = ("line_end", rel, i)
            near = [e for e in ENDINGS if e != end and _one_edit(e, end)]  # a bracket or colon more, less or other
            if len(near) < CHOICES - 1:
                return None
            others = [head + e + after for e in _pick(near, len(near), *key)]  # all: 3 were too easy
            longest = max(_place(head + end + after, others, *key)[0], key=len)  # in the choices' order
            ctx = fit_context(text, starts, starts[i], indent + longest, encode, win, int(win * MIN_CONTEXT))
            if ctx is None:
                return None
            return _choice_example(ctx + indent[:-1], head + end + after, others, key, encode, win)
        yield ("line_end", rel, i), make


def _name_sites(rel, text, encode, win, task):
    """(key, make) for names after a space that occur earlier in the file; make() -> (context, word) when
    the word also occurs in its fitted context (LAMBADA: the target is carried over from the context)."""
    starts = line_starts(text)
    for m in NAME.finditer(text):
        word = m.group()
        if word in COMMON or text.find(word, max(0, m.start() - 16 * win), m.start() - 1) < 0:
            continue

        def make(end=m.start() - 1, word=word):  # the context stops before the space: target ' ' + word
            ctx = fit_context(text, starts, end, " " + word, encode, win, int(win * MIN_CONTEXT))
            if ctx is None or not re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", ctx):
                return None
            return ctx, word
        yield (task, rel, m.start()), make


def last_word(rel, text, encode, win):
    """LAMBADA-style: {context, target = ' ' + word}."""
    return _from_sites(_name_sites(rel, text, encode, win, "last_word"),
                       lambda key, ctx, word: {"context": ctx, "target": " " + word})


def pick_name(rel, text, encode, win):
    """The LAMBADA target among 3 other names of its context: {context, choices, gold}."""
    def build(key, ctx, word):
        others = sorted(n for n in _names(ctx) if n != word)
        if len(others) < CHOICES - 1:
            return None
        return _choice_example(ctx, word, _pick(others, CHOICES - 1, *key), key, encode, win)
    return _from_sites(_name_sites(rel, text, encode, win, "pick_name"), build)


# -----------------------------------------------------------------------------
# a task's examples

def build_examples(task, split, files, encode, win, n=N_PER_SPLIT, per_file=PER_FILE):
    """The examples of `task` in `split` from `files` [(relpath, text)]: a file's candidate positions in an
    order fixed by a hash of each, the first `per_file` that make an example, then the first `n` of all
    in hash order. Each example names its source (file:position) under "id"."""
    make = TASKS[task]["build"]
    pool = []
    for rel, text in files:
        if split_of(rel) != split:
            continue
        mine = 0
        for h, key, site in sorted(((seed_from(*key), key, site) for key, site in make(rel, text, encode, win)),
                                   key=lambda x: x[0]):
            ex = site()
            if ex is not None:
                pool.append((h, key, ex))
                mine += 1
                if mine == per_file:
                    break
    pool.sort(key=lambda x: x[0])
    return [dict(ex, id=f"{key[1]}:{key[2]}") for _, key, ex in pool[:n]]


def examples(task, split="test", root=None, limit=None):
    """`task`'s examples in `split` from the sandbox built in `root` (default: sandbox.default_root())."""
    import sandbox
    if task not in TASKS:
        raise UserError(f"unknown suite task {task!r}; choose from {sorted(TASKS)}")
    if split not in SPLITS:
        raise UserError(f"--split {split}: the suite has {' and '.join(SPLITS)}")
    out = _built(task, split, os.path.abspath(root or sandbox.default_root()))
    if not out:
        raise UserError(f"suite task {task} ({split}): no example in {root or sandbox.default_root()}'s probe files")
    return list(out[:limit] if limit else out)


@functools.lru_cache(maxsize=None)
def _built(task, split, root):
    """build_examples once per process (a study scores every run on the same examples; a built pair's
    files never change: sandbox.py writes a new directory for a new recipe)."""
    return tuple(build_examples(task, split, probe_files(root), encoder(load_tokenizer(root)), window(root)))


# -----------------------------------------------------------------------------
# acceptance: teacher vs student, ceiling, Full KD's direction

def per_example(task, rows):
    """(correct, nll) per example from eval.py's rows: correct = the task's metric for that example (0/1),
    nll = -log q(target) for last_word (None for the choice tasks)."""
    metric = TASKS[task]["metric"]
    if TASKS[task]["kind"] == "last_word":
        return [float(r["is_greedy"]) for r in rows], [-r["loglikelihood"] for r in rows]
    pred = "pred_norm" if metric == "acc_norm" else "pred"
    return [float(r[pred] == r["gold"]) for r in rows], None


def paired_bootstrap(a, b, n_boot=BOOTSTRAP, key="suite"):
    """mean(a - b) and its percentile 95% interval from `n_boot` resamples of the examples (the same
    resample for a and b: paired). The draws are fixed by a hash of `key`."""
    import torch
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # (n,)
    idx = torch.randint(len(d), (n_boot, len(d)), generator=generator("bootstrap", key))  # (B, n)
    means = d[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(d.mean()), "lo": lo, "hi": hi}


def verdict(task, teacher, student, kd=None):
    """The three acceptance numbers of one task from (correct, nll) pairs (per_example); kd may be None
    (not measured: verdict (c) and `accepted` are None)."""
    (tc, tn), (sc, sn) = teacher, student
    if len(tc) != len(sc) or (kd is not None and len(kd[0]) != len(tc)):
        raise UserError(f"suite task {task}: the runs were scored on different examples "
                        f"({len(tc)}, {len(sc)}{'' if kd is None else f', {len(kd[0])}'}); score all on one split")
    gap = paired_bootstrap(tc, sc, key=(task, "gap"))
    out = {"task": task, "metric": TASKS[task]["metric"], "n": len(tc), "teacher": statistics.fmean(tc),
           "student": statistics.fmean(sc), "gap": gap,
           "gap_ok": gap["mean"] >= THRESHOLDS["gap"] and gap["lo"] > 0,
           "ceiling_ok": statistics.fmean(tc) <= THRESHOLDS["ceiling"], "kd": None, "kd_move": None,
           "kd_ok": None, "accepted": None}
    if tn is not None:
        out.update(teacher_ppl=math.exp(statistics.fmean(tn)), student_ppl=math.exp(statistics.fmean(sn)))
    if kd is not None:
        kc, kn = kd
        move = paired_bootstrap(kc, sc, key=(task, "kd"))  # toward the teacher: the sign of the gap
        ok = move["mean"] * (out["teacher"] - out["student"]) > 0
        out.update(kd=statistics.fmean(kc), kd_move=move)
        if kn is not None:
            out["kd_ppl"] = math.exp(statistics.fmean(kn))
            out["kd_nll_move"] = paired_bootstrap(kn, sn, key=(task, "kd_nll"))
            ok = ok and out["kd_nll_move"]["mean"] * (statistics.fmean(tn) - statistics.fmean(sn)) > 0
        out["kd_ok"] = ok
        out["accepted"] = out["gap_ok"] and out["ceiling_ok"] and ok
    return out


def read_rows(run_dir, task, split="test"):
    """eval.py's per-example rows of `task` under `run_dir` (its --out)."""
    sub = "eval_examples" if split == "test" else f"eval_examples_{split}"
    path = os.path.join(run_dir, sub, f"{task}.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"--accept: {path} not found: score it first (python eval.py {run_dir} --suite sandbox "
                        f"--tasks {task} --split {split})")
    return read_jsonl(path, "--accept")


def acceptance(teacher_dir, student_dir, kd_dir=None, split="validation", tasks=None):
    """verdict() of each task, read from the eval.py outputs of the three models."""
    out = []
    for task in tasks or TASKS:
        rows = [read_rows(d, task, split) for d in (teacher_dir, student_dir)]
        kd = per_example(task, read_rows(kd_dir, task, split)) if kd_dir else None
        out.append(verdict(task, per_example(task, rows[0]), per_example(task, rows[1]), kd))
    return out


def _pm(st, scale=100.0, fmt="+.1f"):
    return f"{st['mean'] * scale:{fmt}} [{st['lo'] * scale:{fmt}}, {st['hi'] * scale:{fmt}}]"


def format_acceptance(verdicts):
    """The acceptance table (markdown; accuracies in %) and the headline suite_acc of the accepted tasks."""
    yes = {True: "yes", False: "NO", None: "-"}
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = ["| task | metric | n | teacher | student | T - S [95%] | (a) | (b) T <= 85 | Full KD | KD - S [95%] "
             "| (c) | word PPL T / S / KD | accepted |", "|---|---|---:|" + "---:|" * 10]
    for v in verdicts:
        ppl = "-"
        if "teacher_ppl" in v:
            ppl = " / ".join(f"{v[k]:.4g}" if k in v else "-" for k in ("teacher_ppl", "student_ppl", "kd_ppl"))
        move = "-" if v["kd_move"] is None else _pm(v["kd_move"])
        lines.append(f"| {v['task']} | {v['metric']} | {v['n']} | {pct(v['teacher'])} | {pct(v['student'])} "
                     f"| {_pm(v['gap'])} | {yes[v['gap_ok']]} | {yes[v['ceiling_ok']]} | {pct(v['kd'])} | {move} "
                     f"| {yes[v['kd_ok']]} | {ppl} | {yes[v['accepted']]} |")
    accepted = [v for v in verdicts if v["accepted"]]
    for who in ("teacher", "student", "kd"):
        if accepted:
            lines.append(f"suite_acc ({who}, {len(accepted)} accepted tasks) = "
                         f"{pct(statistics.fmean(v[who] for v in accepted))}")
    return "\n".join(lines) + "\n"


def suite_acc(results, tasks=None):
    """The headline: mean of SUITE's metrics in eval.py's results ({task: metrics}); None if any is missing."""
    values = [(results or {}).get(t, {}).get(TASKS[t]["metric"]) for t in (tasks or SUITE)]
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


# -----------------------------------------------------------------------------
# the existing probe's contexts, in tokens

def token_counts(path, encode):
    """Tokens of each probe.jsonl context (its text up to the last space): what the model must read."""
    return [len(encode(r["text"].rsplit(" ", 1)[0])) for r in read_jsonl(path, "probe.jsonl")]


def describe(root, write=None, log=print):
    """Examples per task and part, their token lengths, and the probe.jsonl contexts' token counts."""
    import sandbox
    win, files, tok = window(root), probe_files(root), load_tokenizer(root)
    encode = encoder(tok)
    log(f"window {win} tokens; probe part: {len(files)} files "
        + ", ".join(f"{s} {sum(split_of(r) == s for r, _ in files)}" for s in SPLITS))
    for task in TASKS:
        for split in SPLITS:
            exs = build_examples(task, split, files, encode, win)
            n_tok = [max(len(encode(ex["context"] + (" " + c if "choices" in ex else c)))
                         for c in ex.get("choices", [ex.get("target")])) for ex in exs]
            log(f"{task} {split}: {len(exs)} examples from {len({e['id'].rsplit(':', 1)[0] for e in exs})} files, "
                f"tokens median {statistics.median(n_tok) if n_tok else 0:.0f}, max {max(n_tok, default=0)}")
            if write:
                atomic_write(os.path.join(write, f"{task}.{split}.jsonl"), "".join(json.dumps(e) + "\n" for e in exs))
    probe = sandbox.paths(root)["probe"]
    if os.path.isfile(probe):
        n = token_counts(probe, encode)
        log(f"probe.jsonl: {len(n)} contexts, tokens min {min(n)}, median {statistics.median(n):.0f}, "
            f"max {max(n)}; {sum(x > win for x in n)} of {len(n)} exceed the {win}-token window")


TASKS = {  # kind: which eval.py scorer ('choice': score_multiple_choice, 'last_word': score_lambada)
    "next_line": dict(build=next_line, kind="choice", metric="acc_norm"),
    "pick_name": dict(build=pick_name, kind="choice", metric="acc_norm"),
    "last_word": dict(build=last_word, kind="last_word", metric="acc"),
    "swap_name": dict(build=swap_name, kind="choice", metric="acc_norm"),
    # one line's text in every choice: raw ll compares them (acc_norm would favour the longer indentation)
    "next_indent": dict(build=next_indent, kind="choice", metric="acc"),
    "line_order": dict(build=line_order, kind="choice", metric="acc"),
    "line_end": dict(build=line_end, kind="choice", metric="acc_norm"),
}
SUITE = ("next_indent", "line_end")  # the tasks accepted for the sandbox pair: suite_acc averages these


def main(argv=None):
    import sandbox
    ap = ArgumentParser(prog="suite.py", description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="the sandbox build (default ~/.cache/nano-sekd/sandbox-v1)")
    ap.add_argument("--write", metavar="DIR", help="also write each task's examples to DIR/<task>.<split>.jsonl")
    ap.add_argument("--accept", nargs="+", metavar="DIR",
                    help="TEACHER STUDENT [FULL_KD]: eval.py --suite sandbox outputs; print the acceptance table")
    ap.add_argument("--split", choices=SPLITS, default="validation", help="--accept: which part was scored")
    ap.add_argument("--tasks", help="--accept: comma list (default: every task, accepted or candidate)")
    args = ap.parse_args(argv)
    if args.accept:
        if len(args.accept) not in (2, 3):
            raise UserError("--accept takes TEACHER STUDENT [FULL_KD] (eval.py output dirs)")
        tasks = args.tasks.split(",") if args.tasks else list(TASKS)
        if set(tasks) - set(TASKS):
            raise UserError(f"--tasks: unknown task {sorted(set(tasks) - set(TASKS))[0]!r}; choose from {list(TASKS)}")
        print(format_acceptance(acceptance(*args.accept, split=args.split, tasks=tasks)), end="")
        return
    if args.write and writable_dir_problem(args.write):
        raise UserError(f"--write {args.write!r} {writable_dir_problem(args.write)}")
    describe(args.root or sandbox.default_root(), args.write)


if __name__ == "__main__":
    run_cli(main, "suite.py")
