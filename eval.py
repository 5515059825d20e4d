"""Evaluation: zero-shot benchmarks, held-out LM metrics, the paper-style table and figures.

    python eval.py RUN_DIR --suite paper              # HellaSwag, PIQA, ARC-E, LAMBADA, GSM8K, IFEval
    python eval.py RUN_DIR --suite lm                 # held-out loss / PPL / KL / top-1 / ECE
    python eval.py Qwen/Qwen3-1.7B --suite paper --split test --out out/qwen
    python eval.py --ifeval-responses responses.jsonl --out DIR
    python eval.py --compare runs/* --compare-out table.md
    python eval.py --plot budget.png --plot-kind budget runs/*
    python eval.py RUN_DIR --plot tokens.png --plot-kind entropy

A finished run (train.py's --out-dir) is RUN/config.json, RUN/summary.json and RUN/model/ (weights and
tokenizer); `eval.py RUN` loads RUN/model and writes RUN/eval.json (RUN/eval_validation.json for
--split validation, RUN/eval_full.json for --split full), merged with what is already there, and
IFEval's responses and per-prompt results under RUN/ifeval/ (RUN/ifeval_validation/, ...).

The paper's tables report the student q after distillation from the teacher p: "Acc" (the average of
the zero-shot benchmarks below), IFEval, held-out PPL and ECE, wall time and peak memory (Table 16);
Figures 2-3 sweep the position budget k and the sample budget l; Figure 6 colors a sequence's tokens
by the student entropy H(q_t) that the selection mask m_t is built from.

Log-likelihood multiple choice (lm-evaluation-harness conventions, zero-shot)
  Each choice c is scored as the summed log-probability of its continuation tokens given the context:
      ll(c) = sum_j log q(cont_j | context, cont_<j)
  Tokens: encode(context + continuation) and take what follows encode(context) as the continuation
  (trailing whitespace of the context moves to the continuation); no BOS/special tokens are added;
  an empty context is replaced by the EOS token. Inputs longer than the model's context are cut
  from the left.
      acc      = [argmax_c ll(c) == gold]
      acc_norm = [argmax_c ll(c) / len(c) == gold]   len(c) = characters of the choice text
  (the harness divides by the choice string *without* the leading ' ' delimiter). Ties go to the
  first choice (numpy argmax).
  HellaSwag: ctx = ctx_a + ' ' + ctx_b.capitalize(); query = activity_label + ': ' + ctx; query and
  endings are cleaned (strip, ' [title]' -> '. ', drop '[...]', '  ' -> ' '); continuation ' ' + ending.
  PIQA: 'Question: {goal}\\nAnswer:' + ' ' + sol{1,2}.   ARC-Easy: 'Question: {question}\\nAnswer:'
  + ' ' + choice text, gold = index of answerKey in choices.label.
LAMBADA (OpenAI version): context = text up to its last space, target = ' ' + last word.
  acc = every target token is the model's greedy (top-1) token under teacher forcing (the harness's
  is_greedy); ppl = exp(mean over examples of -sum log q(target)) (the harness's word perplexity);
  ECE: 15 equal-width bins (models.expected_calibration_error) with
      confidence = prod_j max_v q(v | context, target_<j)   correct = acc of that example.
  Why: confidence must be the probability of the event that `correct` measures. When the greedy
  completion is the target, the product is exactly the model's probability of its own top-1
  completion; for one-token targets it is the usual top-1 confidence. (Using only the first token's
  top-1 probability would score a confidence for one event against the correctness of another.)
GSM8K: prompt 'Question: {question}\\nAnswer:', greedy decoding until EOS, 'Question:' or
  max_new_tokens (256); extract_number takes the first number after the last '####' if there is
  one, else the last number in the text (commas and '$' dropped, trailing '.' ignored, '-'/'−'
  kept, '18.00' == '18'); acc = exact match with the number after '####' in the reference answer.
IFEval: ifeval.py implements the official instruction checkers (strict and loose, no nltk data, see
  its docstring); this file only generates the responses greedily (max_new_tokens 1024) and wires the
  CLI. Prompt-level strict/loose = fraction of prompts whose instructions are all followed.
Generation (GSM8K, IFEval) wraps the prompt in the tokenizer's chat template when it has one
  (--chat-template auto|on|off); multiple choice and LAMBADA never do (raw text, as the harness).

Acc (the paper's average) = mean of HellaSwag acc_norm, PIQA acc_norm, ARC-E acc_norm, LAMBADA acc
and GSM8K acc; it is '-' unless all five are present.

Data: `--data-dir DIR` reads one JSON-lines file per task, in the hub dataset's own schema and named
after the hub split it holds:
    DIR/hellaswag/validation.jsonl   Rowan/hellaswag           ind, activity_label, ctx_a, ctx_b, ctx,
                                                               endings[4], label ('0'..'3')
    DIR/piqa/validation.jsonl        ybisk/piqa (or baber/piqa) goal, sol1, sol2, label (0/1)
    DIR/arc_easy/validation.jsonl    allenai/ai2_arc ARC-Easy  id, question, choices{text,label}, answerKey
    DIR/arc_easy/test.jsonl
    DIR/lambada/test.jsonl           EleutherAI/lambada_openai text
    DIR/gsm8k/test.jsonl             openai/gsm8k (main)       question, answer ('... #### N')
    DIR/ifeval/input_data.jsonl      google/IFEval             key, prompt, instruction_id_list, kwargs
Without --data-dir, GSM8K and IFEval use ../shared/data/{gsm8k/test,ifeval/input_data}.jsonl when
present; everything else comes from the hub through `datasets.load_dataset`.
Splits (--split): the budget search uses `validation`, the reported tables `test`, and the two never
share an example. Only ARC-Easy has labelled validation and test splits on the hub; HellaSwag and PIQA
publish test labels nowhere, LAMBADA and GSM8K (and IFEval) have one evaluation split. For those, the
one labelled split is divided by position: validation = even rows, test = odd rows. `--split full`
scores the whole labelled split (HellaSwag/PIQA validation, ARC/LAMBADA/GSM8K test, all of IFEval):
the numbers that papers and the harness report.
Results at a glance: `--compare RUN ...` groups runs by config.json's run_name (the label without
the seed) and prints one markdown row per group: n seeds; held-out loss, PPL, KL(p || q), top-1
agreement and ECE of the distilled student (summary.json's student_after); Acc and IFEval prompt-level
strict/loose from eval.json ('-' where absent); supervised fraction of positions and of samples; wall
time; peak memory of student and teacher. Cells are mean ± sample std over seeds (0 for one seed).
`--plot F.png --plot-kind budget RUN ...` draws y (Acc where every run has it, else held-out loss)
against k and, for runs with a sample metric, against l, with Full KD and random selection as
reference lines (Figures 2-3); `--plot-kind entropy RUN` draws Figure 6 for the run's first held-out
sequence. matplotlib is optional and only imported for --plot.
Held-out LM metrics (--suite lm) come from models.heldout_metrics on data.load_splits' 'val' or
'test' packed sequences, rebuilt from the run's config.json (or --data/--seq-len/... for a model).
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cache

from models import expected_calibration_error, head_weight, heldout_metrics, load_model, trunk

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")


# -----------------------------------------------------------------------------
# files (every write is atomic: a temp file in the same directory, then os.replace)

def write_text(path, text):
    cache.atomic_write(path, text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return rows


# -----------------------------------------------------------------------------
# datasets

def _task_file(task, file_split, data_dir):
    """The local file that holds `task`'s hub split `file_split`, or None (then: the hub)."""
    name = "input_data" if task == "ifeval" else file_split
    shared = os.path.join(SHARED_DATA, task, f"{name}.jsonl")
    shared = shared if task in ("gsm8k", "ifeval") and os.path.isfile(shared) else None
    if data_dir is not None:
        path = os.path.join(data_dir, task, f"{name}.jsonl")
        if os.path.isfile(path):
            return path
        if shared:
            return shared
        # an explicit --data-dir never silently falls back to the network
        raise FileNotFoundError(f"--data-dir: {path} not found (layout: DIR/<task>/<split>.jsonl)")
    return shared


def _load_hub(task, file_split):
    from datasets import load_dataset
    errors = []
    for repo, config in HUB[task]:  # several ids: the original first, then a maintained mirror
        try:
            return [dict(r) for r in load_dataset(repo, config, split=file_split)]
        except Exception as e:  # noqa: BLE001 (try the next mirror, report all)
            errors.append(f"{repo}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise FileNotFoundError(f"{task}: no local file and the hub failed ({'; '.join(errors)}); "
                            "use --data-dir DIR with DIR/<task>/<split>.jsonl")


def load_docs(task, split="test", data_dir=None, limit=None):
    """Rows of `task` in the hub's schema for `split` in {validation, test, full} (see module doc)."""
    if task not in SPLITS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(SPLITS)}")
    if split not in SPLITS[task]:
        raise ValueError(f"--split must be one of {sorted(SPLITS[task])}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    file_split, part = SPLITS[task][split]
    path = _task_file(task, file_split, data_dir)
    rows = _part(read_jsonl(path) if path else _load_hub(task, file_split), part)
    return rows[:limit] if limit is not None else rows


def _part(rows, part):
    # even rows for validation, odd rows for test: disjoint by construction
    return rows if part == "all" else rows[(part == "odd")::2]


def _clean_hellaswag(text):
    # WikiHow-side artifacts of HellaSwag, removed as lm-evaluation-harness does
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _label(doc, key, task):
    v = doc.get(key)
    if v is None or v == "" or (isinstance(v, int) and v < 0):
        raise ValueError(f"{task}: example without a label ({key}={v!r}); the hub's test split of "
                         f"{task} is unlabelled, use its validation split")
    return int(v)


def hellaswag_example(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if "ctx_a" in doc else doc["ctx"]
    return {"context": _clean_hellaswag(doc["activity_label"] + ": " + ctx),
            "choices": [_clean_hellaswag(e) for e in doc["endings"]],
            "gold": _label(doc, "label", "hellaswag")}


def piqa_example(doc):
    return {"context": f"Question: {doc['goal']}\nAnswer:", "choices": [doc["sol1"], doc["sol2"]],
            "gold": _label(doc, "label", "piqa")}


def arc_example(doc):
    labels = list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise ValueError(f"arc_easy: answerKey {doc['answerKey']!r} not among choice labels {labels}")
    return {"context": f"Question: {doc['question']}\nAnswer:", "choices": list(doc["choices"]["text"]),
            "gold": labels.index(doc["answerKey"])}


def lambada_example(doc):
    text = doc["text"]
    if " " not in text.strip():
        raise ValueError(f"lambada: text without a space to split off the last word: {text[:60]!r}")
    context, word = text.rsplit(" ", 1)
    return {"context": context, "target": " " + word}


def gsm8k_example(doc):
    gold = extract_number(doc["answer"])
    if gold is None:
        raise ValueError(f"gsm8k: reference answer without a number: {doc['answer'][-60:]!r}")
    return {"question": doc["question"], "gold": gold}


# -----------------------------------------------------------------------------
# GSM8K answers

# an optional sign that is not glued to a preceding word or number ("10-5" is 10 and 5), an optional
# '$' (also before the sign: "$-3"), then digits with optional thousands commas and an optional decimal
# part; a '.' belongs to the number only when digits follow it, so a sentence's final period is left out.
_NUM = re.compile(r"(?:(?<![\w.])([-−]))?(?:\$([-−])?)?(?<![\d.])(\d[\d,]*(?:\.\d+)?)")


def _norm_number(m):
    s = m.group(3).replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")  # '18.00' -> '18', '0.50' -> '0.5'
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    neg = bool(m.group(1) or m.group(2)) and s != "0"  # '-0' is '0'
    return "-" + s if neg else s


def extract_number(text):
    """The answer number in `text` as a canonical string ('1234', '-7', '3.5'), or None.

    The first number after the last '####' (GSM8K's answer marker) if there is one, else the last
    number in the text.
    """
    if text is None:
        return None
    if "####" in text:
        m = _NUM.search(text.rsplit("####", 1)[1])
        if m:
            return _norm_number(m)
    ms = list(_NUM.finditer(text))
    return _norm_number(ms[-1]) if ms else None


# -----------------------------------------------------------------------------
# scoring primitives (any model with models.trunk/head_weight: HF *ForCausalLM or a test fake)

def _encode(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_pair(tokenizer, context, continuation):
    """(context_ids, continuation_ids) with the harness's split: continuation = tail of encode(whole)."""
    n = len(context) - len(context.rstrip())
    if n:  # "Answer: " + "x" -> "Answer:" + " x": the space belongs to the continuation's first token
        context, continuation = context[:-n], context[-n:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tokenizer.eos_token_id]  # something to condition the first continuation token on
    return ctx, cont


def _max_len(model):
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _vocab(model, tokenizer):
    # cut padded head rows (Qwen) so they never take probability mass, as models.heldout_metrics does
    return min(len(tokenizer), head_weight(model).shape[0])


@torch.no_grad()
def loglikelihood(model, requests, batch_size=16, vocab_size=None, chunk_size=1024, progress=True,
                  desc="loglikelihood"):
    """Score (context_ids, continuation_ids) requests.

    Returns one (ll, is_greedy, log_conf) per request: ll = sum_j log q(cont_j | ...), is_greedy = every
    cont_j is the top-1 token, log_conf = sum_j log max_v q(v | ...). Requests are sorted by length
    (less padding) and right-padded: with a causal mask, pads after a row's tokens change nothing
    before them, so no attention mask is needed. Logits exist only at continuation positions.
    """
    device = next(model.parameters()).device
    W = head_weight(model, vocab_size)  # (V, d)
    limit = _max_len(model)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out = [None] * len(requests)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[b:b + batch_size]
        rows = []
        for i in idx:
            ctx, cont = requests[i]
            inp = (list(ctx) + list(cont))[:-1]  # the last token is only ever a target
            if limit and len(inp) > limit:
                inp = inp[-limit:]  # keep the continuation and the context nearest to it
            if len(cont) > len(inp):
                raise ValueError(f"continuation of {len(cont)} tokens does not fit the model's context")
            rows.append(inp)
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)  # pad id 0: never attended by real tokens
        for r, inp in enumerate(rows):
            ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        h = trunk(model, ids.to(device))  # (B, T, d)
        rr, tt, tgt = [], [], []
        for r, i in enumerate(idx):
            n = len(requests[i][1])
            rr += [r] * n
            tt += range(len(rows[r]) - n, len(rows[r]))  # position t predicts token t+1
            tgt += requests[i][1]
        ll = torch.zeros(len(idx), dtype=torch.float64)
        lc = torch.zeros(len(idx), dtype=torch.float64)
        miss = torch.zeros(len(idx), dtype=torch.long)
        seg = torch.tensor(rr, dtype=torch.long)
        y = torch.tensor(tgt, dtype=torch.long, device=device)
        hs = h[torch.tensor(rr, dtype=torch.long, device=device), torch.tensor(tt, dtype=torch.long, device=device)]
        for c in range(0, len(tgt), chunk_size):
            lp = F.log_softmax((hs[c:c + chunk_size] @ W.T).float(), -1)  # (n, V) fp32
            yc = y[c:c + chunk_size]
            top, pred = lp.max(-1)
            s = seg[c:c + chunk_size]
            ll.index_add_(0, s, lp.gather(1, yc[:, None])[:, 0].double().cpu())
            lc.index_add_(0, s, top.double().cpu())
            miss.index_add_(0, s, (pred != yc).long().cpu())
        for r, i in enumerate(idx):
            out[i] = (float(ll[r]), bool(miss[r] == 0), float(lc[r]))
    return out


def format_prompt(tokenizer, text, chat="auto"):
    """`text` as a user turn of the tokenizer's chat template (chat: auto = when it has one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has:
        raise ValueError("--chat-template on: the tokenizer has no chat template")
    if chat == "off" or not has:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def _cut(text, stop):
    for s in stop:
        j = text.find(s)
        if j >= 0:
            text = text[:j]
    return text


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts, max_new_tokens=256, batch_size=8, stop=(), use_generate=None,
                    progress=True, desc="generate"):
    """Greedy completions of `prompts` (strings), cut before the first stop string.

    HF models go through `model.generate` (left padding + attention mask, KV cache, batched); other
    models (and use_generate=False) through a plain loop that recomputes the prefix at each step,
    which is the reference the fast path is tested against.
    """
    eos = tokenizer.eos_token_id
    use_generate = hasattr(model, "generate") if use_generate is None else use_generate
    device = next(model.parameters()).device
    enc = [_encode(tokenizer, p) or [eos] for p in prompts]
    out = [None] * len(prompts)
    if not use_generate:
        W = head_weight(model, _vocab(model, tokenizer))
        for i in tqdm(range(len(enc)), desc=desc, disable=not progress):
            ids, gen = list(enc[i]), []
            for _ in range(max_new_tokens):
                h = trunk(model, torch.tensor([ids + gen], device=device))[0, -1]  # (d,)
                nxt = int((h @ W.T).float().argmax())
                if nxt == eos:
                    break
                gen.append(nxt)
                if stop and any(s in tokenizer.decode(gen) for s in stop):
                    break
            out[i] = _cut(tokenizer.decode(gen, skip_special_tokens=True), stop)
        return out
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    kw = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[b:b + batch_size]
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every row's next token is at column T
            ids[r, T - len(enc[i]):] = torch.tensor(enc[i])
            mask[r, T - len(enc[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                             temperature=None, top_p=None, top_k=None, **kw)[:, T:]
        for r, i in enumerate(idx):
            g = gen[r].tolist()
            if eos in g:
                g = g[:g.index(eos)]
            out[i] = _cut(tokenizer.decode(g, skip_special_tokens=True), stop)
    return out


# -----------------------------------------------------------------------------
# benchmark scorers

def _argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)  # first index on ties, like numpy


def _nonempty(examples, what):
    if not examples:
        raise ValueError(f"{what}: no examples to score (empty data file or split)")


def score_multiple_choice(model, tokenizer, examples, batch_size=16, progress=True):
    """acc / acc_norm over examples {context, choices, gold} (conventions in the module doc)."""
    _nonempty(examples, "multiple choice")
    reqs = [encode_pair(tokenizer, ex["context"], " " + c) for ex in examples for c in ex["choices"]]
    res = loglikelihood(model, reqs, batch_size, _vocab(model, tokenizer), progress=progress, desc="choices")
    acc = acc_norm = 0
    j = 0
    for ex in examples:
        lls = [r[0] for r in res[j:j + len(ex["choices"])]]
        j += len(ex["choices"])
        acc += _argmax(lls) == ex["gold"]
        acc_norm += _argmax([ll / max(len(c), 1) for ll, c in zip(lls, ex["choices"])]) == ex["gold"]
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def score_lambada(model, tokenizer, examples, batch_size=16, progress=True):
    """LAMBADA last-word acc, word perplexity and ECE over examples {context, target}."""
    _nonempty(examples, "lambada")
    reqs = [encode_pair(tokenizer, ex["context"], ex["target"]) for ex in examples]
    res = loglikelihood(model, reqs, batch_size, _vocab(model, tokenizer), progress=progress, desc="lambada")
    correct = [r[1] for r in res]
    nll = -sum(r[0] for r in res) / len(res)
    conf = [math.exp(r[2]) for r in res]
    return {"acc": sum(correct) / len(res), "ppl": math.exp(min(nll, 700.0)),
            "ece": expected_calibration_error(conf, correct, n_bins=15), "n": len(res)}


def score_gsm8k(model, tokenizer, examples, batch_size=8, max_new_tokens=256, chat="auto", progress=True):
    """Exact match of the extracted final number over examples {question, gold}."""
    _nonempty(examples, "gsm8k")
    prompts = [format_prompt(tokenizer, GSM8K_PROMPT.format(question=ex["question"]), chat) for ex in examples]
    outs = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop=("Question:",),
                           progress=progress, desc="gsm8k")
    hits = sum(extract_number(o) == ex["gold"] for o, ex in zip(outs, examples))
    return {"acc": hits / len(examples), "n": len(examples)}


def _ifeval():
    try:
        import ifeval
    except ImportError as e:
        raise ImportError(f"IFEval scoring needs ifeval.py next to eval.py ({e})") from None
    return ifeval


def _ifeval_inputs_path(path=None, data_dir=None, out_dir=None):
    """--ifeval-inputs, else DIR/ifeval/input_data.jsonl, ../shared/data/ifeval/, else google/IFEval."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ifeval-inputs: {path} not found")
        return path
    local = _task_file("ifeval", "train", data_dir)
    if local:
        return local
    rows = [dict(r, kwargs=[{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]])
            for r in _load_hub("ifeval", "train")]  # the hub's Arrow schema fills unused kwargs with None
    path = os.path.join(out_dir or tempfile.mkdtemp(prefix="ifeval_"), "ifeval_input_data.jsonl")
    write_jsonl(path, rows)
    return path


def score_ifeval_responses(responses_path, inputs_path=None, out_dir=None, data_dir=None):
    """Score ready-made responses (jsonl: prompt, response) with ifeval.py; write DIR/ifeval_results_*."""
    ife = _ifeval()
    inputs = ife.load_inputs(_ifeval_inputs_path(inputs_path, data_dir, out_dir))
    strict, loose, summary = ife.score_responses(inputs, ife.load_responses(responses_path))
    if out_dir:
        ife.write_results(out_dir, strict, loose)
    n = len(strict)
    return {"prompt_strict": sum(bool(r["follow_all_instructions"]) for r in strict) / max(n, 1),
            "prompt_loose": sum(bool(r["follow_all_instructions"]) for r in loose) / max(n, 1),
            "inst_strict": summary.get("inst_level_strict_acc"), "inst_loose": summary.get("inst_level_loose_acc"),
            "n": n}


def score_ifeval(model, tokenizer, input_rows, out_dir=None, batch_size=8, max_new_tokens=1024, chat="auto",
                 progress=True):
    """Generate greedy responses to IFEval prompts (official input rows), then score them."""
    _nonempty(input_rows, "ifeval")
    prompts = [format_prompt(tokenizer, r["prompt"], chat) for r in input_rows]
    outs = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress, desc="ifeval")
    with tempfile.TemporaryDirectory() as tmp:
        d = out_dir or tmp
        inp = os.path.join(d, "ifeval_input_data.jsonl")  # exactly the prompts scored (a split's half)
        resp = os.path.join(d, "ifeval_responses.jsonl")
        write_jsonl(inp, input_rows)
        write_jsonl(resp, [{"prompt": r["prompt"], "response": o} for r, o in zip(input_rows, outs)])
        return score_ifeval_responses(resp, inp, out_dir)


def score_lm(model, tokenizer, split="test", teacher=None, batch_size=8, progress=True, **data_kwargs):
    """models.heldout_metrics on data.load_splits' held-out split ('val' for validation, else 'test')."""
    import data  # lazily: only --suite lm needs the corpus pipeline
    task, task_data = data_kwargs.pop("task", "lm"), data_kwargs.pop("task_data", "openai/gsm8k")
    if task == "gsm8k":  # a task-specific run: its held-out GSM8K answers, prompt masked as in training
        splits = data.pack_gsm8k(data.load_gsm8k_rows(task_data), tokenizer, data_kwargs.get("seq_len", 512),
                                 data_kwargs.get("tokens"), data_kwargs.get("seed", 0))
    else:
        splits = data.load_splits(tokenizer, **data_kwargs)
    packed = splits["val" if split == "validation" else "test"]
    batches = tqdm(packed.batches(batch_size), desc="lm", disable=not progress,
                   total=math.ceil(len(packed) / batch_size) if hasattr(packed, "__len__") else None)
    return heldout_metrics(model, batches, teacher=teacher, vocab_size=_vocab(model, tokenizer))


def paper_average(results):
    """The paper's Acc: mean of HellaSwag/PIQA/ARC-E acc_norm, LAMBADA acc, GSM8K acc; None if any is missing."""
    vals = []
    for task, metric in ACC_AVERAGE:
        v = (results or {}).get(task, {}).get(metric)
        if v is None:
            return None
        vals.append(v)
    return sum(vals) / len(vals)


def evaluate(model, tokenizer, tasks, split="test", data_dir=None, limit=None, batch_size=16,
             max_new_tokens=None, chat="auto", out_dir=None, ifeval_inputs=None, teacher=None,
             lm_kwargs=None, progress=True):
    """Run `tasks` (names in SCORERS, 'ifeval', 'lm'); returns {task: metrics}.

    Every task's data is loaded before any scoring, so a missing file fails in seconds, not hours.
    """
    # IFEval's per-prompt results go to OUT/ifeval/ (OUT/ifeval_validation/, ...): one folder per split
    ife_dir = os.path.join(out_dir, "ifeval" if split == "test" else f"ifeval_{split}") if out_dir else None
    inputs = {}
    for task in tasks:
        if task == "ifeval":
            rows = _part(read_jsonl(_ifeval_inputs_path(ifeval_inputs, data_dir, ife_dir)), SPLITS["ifeval"][split][1])
            inputs[task] = rows[:limit] if limit else rows
        elif task in SCORERS:
            inputs[task] = [EXAMPLES[task](d) for d in load_docs(task, split, data_dir, limit)]
        elif task != "lm":
            raise ValueError(f"unknown task {task!r}; choose from {sorted(SCORERS) + ['ifeval', 'lm']}")
    results = {}
    for task in tasks:
        if task == "lm":
            r = score_lm(model, tokenizer, split, teacher, batch_size, progress, **(lm_kwargs or {}))
        elif task == "ifeval":
            r = score_ifeval(model, tokenizer, inputs[task], ife_dir, batch_size, max_new_tokens or 1024, chat,
                             progress)
        else:
            kw = {"batch_size": batch_size, "progress": progress}
            if task == "gsm8k":
                kw.update(max_new_tokens=max_new_tokens or 256, chat=chat)
            r = SCORERS[task](model, tokenizer, inputs[task], **kw)
        r["split"] = split
        results[task] = r
        print(f"{task}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in r.items()), file=sys.stderr)
    return results


# -----------------------------------------------------------------------------
# runs and the paper-style table

def eval_file(run_dir, split="test"):
    return os.path.join(run_dir, "eval.json" if split == "test" else f"eval_{split}.json")


def load_run(run_dir, split="test"):
    """{dir, config, summary, eval} of a train.py output dir (eval = {} without an eval file)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    ev = eval_file(run_dir, split)
    return {"dir": run_dir, "config": read_json(os.path.join(run_dir, "config.json")),
            "summary": read_json(os.path.join(run_dir, "summary.json")),
            "eval": read_json(ev) if os.path.isfile(ev) else {}}


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _group(runs):
    """Runs grouped by config run_name (the label without the seed), in order of first appearance."""
    groups = {}
    for r in runs:
        name = r["config"].get("run_name") or r["summary"].get("run_name") or os.path.basename(
            os.path.normpath(r["dir"]))
        groups.setdefault(name, []).append(r)
    return groups


def _gib(nbytes):
    return None if nbytes is None else nbytes / 2 ** 30


def mean_std(vals):
    """(mean, sample std) of the non-None values; std = 0 for one value; None when there are none."""
    vals = [float(v) for v in vals if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def reference_runs(runs):
    """The table's reference rows, one entry per seed (runs of one seed share them): the undistilled
    student (summary student_before) and the teacher (summary teacher: loss, ppl, ece)."""
    before, teacher = {}, {}
    for r in runs:
        seed = r["config"].get("seed")
        if r["summary"].get("student_before") and seed not in before:
            before[seed] = {"config": {}, "eval": {}, "summary": {"student_after": r["summary"]["student_before"]}}
        if r["summary"].get("teacher") and seed not in teacher:
            teacher[seed] = {"config": {}, "eval": {}, "summary": {"student_after": r["summary"]["teacher"]}}
    return {name: list(rows.values()) for name, rows in
            (("student, no KD (reference)", before), ("teacher (reference)", teacher)) if rows}


def paired_columns(groups, baseline):
    """{header: Δ column} for loss and KL: per-seed differences to the `baseline` group (same seed =
    same data and held-out split, so the difference removes the split-to-split spread that
    dominates the plain std)."""
    if baseline not in groups:
        raise ValueError(f"--compare-baseline {baseline!r} is not a run name here; have {sorted(groups)}")
    base = {r["config"].get("seed"): r for r in groups[baseline]}
    cols = {}
    for header, fmt, get in COMPARE_COLUMNS:
        if header not in ("loss", "KL"):
            continue

        def diff(r, get=get):
            b = base.get(r["config"].get("seed"))
            v, w = get(r), get(b) if b is not None else None
            return None if v is None or w is None or not r["config"] else v - w
        cols[header] = (f"Δ{header} vs {baseline}", "+.4f", diff)
    return cols


def compare_runs(run_dirs, split="test", refs=True, baseline=None):
    """The paper-style markdown table: one row per run_name group, mean ± sample std over its seeds,
    then (refs) the undistilled student and the teacher. With `baseline` (a run name), also the
    per-seed differences of loss and KL to that group. Columns no row has are left out."""
    if not run_dirs:
        raise ValueError("--compare needs at least one run directory")
    runs = [load_run(d, split) for d in run_dirs]
    groups = _group(runs)
    paired = paired_columns(groups, baseline) if baseline else {}
    columns = [col for c in COMPARE_COLUMNS for col in (c, paired.get(c[0])) if col]  # Δ right after its column
    if refs:
        groups.update(reference_runs(runs))
    rows = []
    for name, group in groups.items():
        cells = [name, str(len(group))]
        for _, fmt, get in columns:
            ms = mean_std(get(r) for r in group)
            cells.append("-" if ms is None else f"{ms[0]:{fmt}} ± {ms[1]:{fmt.lstrip('+')}}")
        rows.append(cells)
    keep = [0, 1] + [j + 2 for j in range(len(columns)) if any(row[j + 2] != "-" for row in rows)]
    head = ["run", "n"] + [c[0] for c in columns]
    lines = ["| " + " | ".join(head[j] for j in keep) + " |", "|" + "|".join(["---"] + ["---:"] * (len(keep) - 1)) + "|"]
    lines += ["| " + " | ".join(row[j] for j in keep) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# figures

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig, path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    ext = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=ext)
    os.close(fd)
    try:
        fig.savefig(tmp, format=ext[1:], dpi=150, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _is_none(v):
    return v is None or str(v).lower() in ("none", "", "null")


def _frac(v):
    return None if v is None else float(v)


def _xy_series(points):
    """[(x, y)] -> [(x, mean, std, n)] sorted by x (seeds at the same x averaged)."""
    by_x = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    return [(x, *mean_std(ys), len(ys)) for x, ys in sorted(by_x.items())]


def budget_data(run_dirs, metric="auto", split="test"):
    """What the budget figure draws: per axis ('k', 'l') the sweep series and the reference lines.

    A run whose sample_metric is not 'none' varies l; every other run varies k. Full KD = policy 'full'
    or k = l = 1 without sample selection; random = policy/pos_metric 'random' (k axis) or sample_metric
    'random' (l axis). y = the benchmark Acc average (metric 'acc'), the held-out student loss
    ('loss') or its KL to the teacher ('kl'); 'auto' takes acc when every run has it, else loss.
    """
    runs = [load_run(d, split) for d in run_dirs]
    if not runs:
        raise ValueError("--plot-kind budget needs run directories")
    if metric == "auto":
        metric = "acc" if all(paper_average(r["eval"]) is not None for r in runs) else "loss"
    if metric not in ("acc", "loss", "kl"):
        raise ValueError(f"--plot-metric must be auto, acc, loss or kl, got {metric!r}")

    def y_of(r):
        y = paper_average(r["eval"]) if metric == "acc" else _get(
            r["summary"], "student_after", "kl_to_teacher" if metric == "kl" else "loss")
        if y is None:
            raise ValueError(f"{r['dir']}: no {metric} to plot")
        return float(y)

    out = {"metric": metric, "axes": {}}
    full, pts = [], {"k": {}, "l": {}}
    ref_random = {"k": [], "l": []}
    for r in runs:
        c = r["config"]
        k, l = _frac(c.get("k", 1.0)), _frac(c.get("l", 1.0))
        if _is_none(c.get("sample_metric")):
            if c.get("policy") == "full" or (k >= 1.0 and l >= 1.0):
                full.append(y_of(r))
            elif c.get("policy") == "random" or c.get("pos_metric") == "random":
                ref_random["k"].append((k, y_of(r)))
            else:
                pts["k"].setdefault(f"{c.get('pos_metric')} / {c.get('policy')}", []).append((k, y_of(r)))
        elif c.get("sample_metric") == "random":
            ref_random["l"].append((l, y_of(r)))
        else:
            pts["l"].setdefault(str(c.get("sample_metric")), []).append((l, y_of(r)))
    for ax in ("k", "l"):
        if pts[ax] or ref_random[ax]:
            out["axes"][ax] = {"series": {name: _xy_series(p) for name, p in pts[ax].items()},
                               "random": _xy_series(ref_random[ax]), "full": mean_std(full)}
    if not out["axes"]:
        raise ValueError("--plot-kind budget: no run varies k or l (only Full KD runs given)")
    return out


def plot_budget(run_dirs, path, metric="auto", split="test"):
    """Figures 2-3: y vs k (and vs l), Full KD and random as reference lines. Returns budget_data()."""
    plt = _pyplot()
    data = budget_data(run_dirs, metric, split)
    axes_keys = list(data["axes"])
    fig, axs = plt.subplots(1, len(axes_keys), figsize=(5.5 * len(axes_keys), 4), squeeze=False)
    ylabel = {"acc": "benchmark Acc (avg)", "loss": "held-out student loss",
              "kl": "held-out KL(teacher || student)"}[data["metric"]]
    for ax, key in zip(axs[0], axes_keys):
        d = data["axes"][key]
        for name, s in d["series"].items():
            ax.errorbar([p[0] for p in s], [p[1] for p in s], yerr=[p[2] for p in s], marker="o", capsize=3,
                        label=name)
        if d["full"] is not None:
            ax.axhline(d["full"][0], color="black", linestyle="--", label="Full KD")
        if len(d["random"]) == 1:
            ax.axhline(d["random"][0][1], color="gray", linestyle=":", label=f"random ({key}={d['random'][0][0]:g})")
        elif d["random"]:
            ax.plot([p[0] for p in d["random"]], [p[1] for p in d["random"]], color="gray", linestyle=":",
                    marker="x", label="random")
        ax.set_xlabel({"k": "k (fraction of positions supervised)", "l": "l (fraction of samples kept)"}[key])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_fig(fig, path)
    plt.close(fig)
    return data


def plot_entropy_tokens(tokens, entropy, selected, path, title=None, width=90):
    """Figure 6: tokens colored by student entropy H(q_t), selected positions (m_t = 1) outlined.

    tokens: list of T strings, entropy (T,), selected (T,) bool. Returns {'lines', 'outlined'} counted
    from the drawn boxes.
    """
    plt = _pyplot()
    from matplotlib import colors
    from matplotlib.cm import ScalarMappable
    H = torch.as_tensor(entropy, dtype=torch.float32).flatten()
    sel = torch.as_tensor(selected, dtype=torch.bool).flatten()
    if not (len(tokens) == H.numel() == sel.numel()):
        raise ValueError(f"tokens ({len(tokens)}), entropy ({H.numel()}) and selected ({sel.numel()}) differ in length")
    if not tokens:
        raise ValueError("plot_entropy_tokens: no tokens")
    shown = [t.replace("\n", "\\n").replace("\t", "\\t") or "∅" for t in tokens]
    lines, x = [[]], 0  # greedy line wrap in character units (monospace: one char = one unit)
    for i, s in enumerate(shown):
        if x + len(s) > width and lines[-1]:
            lines.append([])
            x = 0
        lines[-1].append((i, x))
        x += len(s) + 1
    fs = 9
    cw = 0.6 * fs / 72  # inches per monospace character
    fig = plt.figure(figsize=(width * cw + 0.6, 0.3 * len(lines) + 1.3))
    ax = fig.add_axes([0.02, 0.35 / (0.3 * len(lines) + 1.3) + 0.12, 0.96, 0.8 - 0.35 / (0.3 * len(lines) + 1.3)])
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines) - 0.5, -0.5)
    ax.axis("off")
    norm = colors.Normalize(vmin=0.0, vmax=max(float(H.max()), 1e-6))
    cmap = plt.get_cmap("YlOrRd")
    outlined = 0
    for row, items in enumerate(lines):
        for i, x in items:
            on = bool(sel[i])
            outlined += on
            dark = norm(float(H[i])) > 0.7  # white text on the darkest boxes stays readable
            box = dict(boxstyle="square,pad=0.15", facecolor=cmap(norm(float(H[i]))),
                       edgecolor="blue" if on else "none", linewidth=1.6 if on else 0.0)
            ax.text(x, row, shown[i], fontfamily="monospace", fontsize=fs, va="center", ha="left", parse_math=False,
                    color="white" if dark else "black", bbox=box)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal", fraction=0.08, pad=0.02)
    cb.set_label("student entropy H(q_t) (nats); outlined = selected (m_t = 1)")
    if title:
        ax.set_title(title, fontsize=10)
    _save_fig(fig, path)
    plt.close(fig)
    return {"lines": len(lines), "outlined": outlined}


@torch.no_grad()
def token_entropy(model, input_ids, vocab_size=None, chunk_size=1024):
    """H(q_t) = -sum_v q_t(v) log q_t(v) for every position of one sequence (T,) -> (T,), fp32."""
    device = next(model.parameters()).device
    h = trunk(model, torch.as_tensor(input_ids, dtype=torch.long, device=device)[None])[0]  # (T, d)
    W = head_weight(model, vocab_size)
    out = []
    for i in range(0, h.shape[0], chunk_size):
        lp = F.log_softmax((h[i:i + chunk_size] @ W.T).float(), -1)  # (n, V)
        out.append(-(lp.exp() * lp).sum(-1).cpu())
    return torch.cat(out)


def plot_entropy_run(run_dir, path, n_tokens=128, device="cpu", split="validation"):
    """Figure 6 for a run: its model on the first held-out sequence, top-k by entropy with the run's k."""
    cfg = read_json(os.path.join(run_dir, "config.json"))
    model, tok = load_model(os.path.join(run_dir, "model"), device, torch.float32)
    import data
    packed = data.load_splits(tok, **_data_kwargs(cfg))["val" if split == "validation" else "test"]
    if len(packed.input_ids) == 0:
        raise ValueError(f"{run_dir}: the held-out split is empty")
    T = min(n_tokens, packed.input_ids.shape[1])
    ids, tgt, valid = packed.input_ids[0, :T], packed.targets[0, :T], packed.valid[0, :T]
    H = token_entropy(model, ids, _vocab(model, tok))
    k = float(cfg.get("k", 1.0))
    n_sel = min(int(valid.sum()), max(1, math.ceil(k * int(valid.sum()))))
    sel = torch.zeros(T, dtype=torch.bool)
    sel[torch.topk(H.masked_fill(~valid, -1.0), n_sel).indices] = True  # top-k over valid positions only
    tokens = [tok.decode([int(t)]) for t in tgt]  # position t is scored on the token it predicts
    return plot_entropy_tokens(tokens, H, sel, path, title=f"{os.path.basename(os.path.normpath(run_dir))}: "
                                                          f"top-{k:g} by student entropy")


# -----------------------------------------------------------------------------
# command line

def _data_kwargs(cfg, args=None):
    """data.load_splits keyword arguments from a run's config.json, overridden by CLI flags."""
    kw = {k: cfg.get(k) for k in ("data", "seq_len", "tokens", "eval_tokens", "seed", "text_field", "task",
                                  "task_data")}
    kw["backend"] = cfg.get("tokenizer_backend")
    if args is not None:
        for k in ("data", "seq_len", "tokens", "eval_tokens", "seed"):
            if getattr(args, k, None) is not None:
                kw[k] = getattr(args, k)
    for k in ("tokens", "eval_tokens"):
        if kw.get(k) is not None:
            kw[k] = int(kw[k])
    return {k: v for k, v in kw.items() if v is not None}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("target", nargs="*", help="run dir (loads RUN/model), hub id, HF dir, .gguf or 'smollm2'; run dirs for --plot")
    a("--suite", choices=sorted(SUITES), default="paper", help="which tasks (overridden by --tasks)")
    a("--tasks", help="comma list of " + ",".join(list(SCORERS) + ["ifeval", "lm"]))
    a("--split", choices=["validation", "test", "full"], default="test",
      help="validation for the budget search, test for reported tables (disjoint); full = whole labelled split")
    a("--limit", type=int, help="examples per task")
    a("--data-dir", help="local files DIR/<task>/<split>.jsonl in the hub schema")
    a("--batch-size", type=int, default=16)
    a("--max-new-tokens", type=int, help="generation length (default 256 for GSM8K, 1024 for IFEval)")
    a("--chat-template", choices=["auto", "on", "off"], default="auto", help="wrap GSM8K/IFEval prompts")
    a("--device", help="default: cuda if available, else cpu")
    a("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    a("--out", help="output dir (eval.json, IFEval results); default: the run dir")
    a("--teacher", help="--suite lm: teacher for KL/top-1 (default: the run's; 'none' to skip)")
    a("--data", help="--suite lm: data.load_splits source (default: the run's)")
    a("--seq-len", type=int)
    a("--tokens", type=float)
    a("--eval-tokens", type=float)
    a("--seed", type=int)
    a("--ifeval-responses", metavar="FILE", help="score ready-made responses (jsonl: prompt, response); needs --out")
    a("--ifeval-inputs", metavar="FILE", help="official input_data.jsonl (default: ../shared/data/ifeval/ or hub)")
    a("--compare", nargs="+", metavar="RUN", help="print the paper-style table of these runs")
    a("--compare-out", metavar="FILE.md", help="also write the table here")
    a("--compare-baseline", metavar="RUN_NAME", help="add per-seed differences of loss and KL to this run name")
    a("--plot", metavar="FILE.png", help="draw a figure (needs matplotlib)")
    a("--plot-kind", choices=["budget", "entropy"], default="budget")
    a("--plot-metric", choices=["auto", "acc", "loss", "kl"], default="auto",
      help="budget: y axis (auto: benchmark Acc when every run has eval.json, else held-out loss)")
    a("--plot-tokens", type=int, default=128, help="entropy: tokens shown")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def _dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _is_run(path):
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, "model"))


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.ifeval_responses:
        if not args.out:
            raise ValueError("--ifeval-responses needs --out DIR")
        res = score_ifeval_responses(args.ifeval_responses, args.ifeval_inputs, args.out, args.data_dir)
        print(json.dumps(res))
        return res
    if args.compare:
        table = compare_runs(args.compare, args.split, baseline=args.compare_baseline)
        print(table, end="")
        if args.compare_out:
            write_text(args.compare_out, table)
        if not args.plot:
            return table
    if args.plot:
        runs = args.target or args.compare or []
        if args.plot_kind == "budget":
            return plot_budget(runs, args.plot, args.plot_metric, args.split)
        if len(runs) != 1 or not _is_run(runs[0]):
            raise ValueError("--plot-kind entropy needs exactly one run directory (with RUN/model)")
        return plot_entropy_run(runs[0], args.plot, args.plot_tokens, args.device or "cpu")
    if len(args.target) != 1:
        raise ValueError("give one run dir or model to evaluate (or --compare / --plot / --ifeval-responses)")
    target = args.target[0]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(args.dtype, device)
    run = _is_run(target)
    cfg = read_json(os.path.join(target, "config.json")) if run else {}
    tasks = args.tasks.split(",") if args.tasks else SUITES[args.suite]
    model, tok = load_model(os.path.join(target, "model") if run else target, device, dtype)
    teacher = None
    if "lm" in tasks:
        spec = args.teacher or cfg.get("teacher")
        if spec and spec != "none":
            teacher, _ = load_model(spec, device, dtype)
    out_dir = args.out or (target if run else None)
    results = evaluate(model, tok, tasks, args.split, args.data_dir, args.limit, args.batch_size,
                       args.max_new_tokens, args.chat_template, out_dir, args.ifeval_inputs, teacher,
                       _data_kwargs(cfg, args), progress=not args.no_progress)
    avg = paper_average(results)
    if out_dir:
        path = eval_file(out_dir, args.split)
        merged = read_json(path) if os.path.isfile(path) else {}
        merged.update(results)
        write_json(path, merged)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(results, indent=2))
    if avg is not None:
        print(f"Acc (paper average) = {avg:.4f}")
    return results


# -----------------------------------------------------------------------------
# registries

GSM8K_PROMPT = "Question: {question}\nAnswer:"

# --split role -> (the hub split that holds it, which rows): see the module docstring
SPLITS = {
    "hellaswag": {"validation": ("validation", "even"), "test": ("validation", "odd"), "full": ("validation", "all")},
    "piqa": {"validation": ("validation", "even"), "test": ("validation", "odd"), "full": ("validation", "all")},
    "arc_easy": {"validation": ("validation", "all"), "test": ("test", "all"), "full": ("test", "all")},
    "lambada": {"validation": ("test", "even"), "test": ("test", "odd"), "full": ("test", "all")},
    "gsm8k": {"validation": ("test", "even"), "test": ("test", "odd"), "full": ("test", "all")},
    "ifeval": {"validation": ("train", "even"), "test": ("train", "odd"), "full": ("train", "all")},
}

HUB = {  # (repo id, config) tried in order
    "hellaswag": [("Rowan/hellaswag", None)],
    "piqa": [("ybisk/piqa", None), ("baber/piqa", None)],
    "arc_easy": [("allenai/ai2_arc", "ARC-Easy")],
    "lambada": [("EleutherAI/lambada_openai", "default")],
    "gsm8k": [("openai/gsm8k", "main")],
    "ifeval": [("google/IFEval", None)],
}

EXAMPLES = {  # hub row -> scorer example
    "hellaswag": hellaswag_example,
    "piqa": piqa_example,
    "arc_easy": arc_example,
    "lambada": lambada_example,
    "gsm8k": gsm8k_example,
}

SCORERS = {
    "hellaswag": score_multiple_choice,
    "piqa": score_multiple_choice,
    "arc_easy": score_multiple_choice,
    "lambada": score_lambada,
    "gsm8k": score_gsm8k,
}

ACC_AVERAGE = [("hellaswag", "acc_norm"), ("piqa", "acc_norm"), ("arc_easy", "acc_norm"),
               ("lambada", "acc"), ("gsm8k", "acc")]

SUITES = {
    "paper": ["hellaswag", "piqa", "arc_easy", "lambada", "gsm8k", "ifeval"],
    "lm": ["lm"],
    "all": ["lm", "hellaswag", "piqa", "arc_easy", "lambada", "gsm8k", "ifeval"],
}

COMPARE_COLUMNS = [  # (header, format, run -> value or None); summary = train.py's summary.json
    ("loss", ".4f", lambda r: _get(r["summary"], "student_after", "loss")),
    ("PPL", ".2f", lambda r: _get(r["summary"], "student_after", "ppl")),
    ("KL", ".4f", lambda r: _get(r["summary"], "student_after", "kl_to_teacher")),
    ("top-1", ".4f", lambda r: _get(r["summary"], "student_after", "top1_agree")),
    ("ECE", ".4f", lambda r: _get(r["summary"], "student_after", "ece")),
    ("Acc", ".4f", lambda r: paper_average(r["eval"])),
    ("IFEval S", ".4f", lambda r: _get(r["eval"], "ifeval", "prompt_strict")),
    ("IFEval L", ".4f", lambda r: _get(r["eval"], "ifeval", "prompt_loose")),
    ("sup. pos", ".3f", lambda r: _get(r["summary"], "sup_frac_positions")),
    ("sup. samples", ".3f", lambda r: _get(r["summary"], "sup_frac_samples")),
    ("wall (s)", ".1f", lambda r: _get(r["summary"], "wall_time_s")),
    ("train (s)", ".1f", lambda r: _get(r["summary"], "wall_time_split", "train_s")),
    ("mem S (GiB)", ".2f", lambda r: _gib(_get(r["summary"], "peak_mem_bytes", "student"))),
    ("mem T (GiB)", ".2f", lambda r: _gib(_get(r["summary"], "peak_mem_bytes", "teacher"))),
]

if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"eval.py: error: {e}")
