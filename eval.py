"""Evaluation: the paper's zero-/few-shot benchmarks, held-out LM metrics and IFEval, for one model.

    python eval.py RUN_DIR --suite paper              # HellaSwag, PIQA, ARC-E, LAMBADA, GSM8K, IFEval
    python eval.py RUN_DIR --suite paper --split validation   # the selection split (no LAMBADA/IFEval)
    python eval.py RUN_DIR --suite lm                 # held-out loss / PPL / KL / top-1 / ECE
    python eval.py RUN_DIR --suite sandbox            # the sandbox's downstream suite (suite.py), suite acc
    python eval.py Qwen/Qwen3-1.7B --suite paper --out out/qwen
    python eval.py RUN_DIR --suite paper --backend lm-eval    # the same tasks through lm-evaluation-harness
    python eval.py --ifeval-responses responses.jsonl --out DIR
Tables and figures: report.py (`python eval.py --compare/--plot ...` is handed over to it).

A finished run (train.py's --out-dir) is RUN/config.json, RUN/summary.json and RUN/model/ (a standard
save_pretrained folder); `eval.py RUN` loads RUN/model and writes RUN/eval.json (RUN/eval_validation.json
for --split validation), merged with what is there, the per-example outputs of every task under
RUN/eval_examples/ (RUN/eval_examples_validation/), and IFEval's responses and per-prompt verdicts under
RUN/ifeval/.

Splits (--split). The paper selects its budgets on validation splits of ARC-E, GSM8K, HellaSwag and
PIQA and reports test; the two never share an example:
    task        --split test (reported; = the harness)    --split validation (selection)
    hellaswag   hub validation (test labels unpublished)   hub train
    piqa        hub validation (test labels unpublished)   hub train
    arc_easy    hub test                                   hub validation
    gsm8k       hub test                                   hub train minus its first 8 rows (the shots)
    lambada     hub test (OpenAI version), all 5,153       none: not a selection task
    ifeval      all 541 prompts (540 in ../shared)         none: not a selection task

Multiple choice (lm-evaluation-harness conventions, zero-shot): each choice c is scored by
    ll(c) = sum_j log q(cont_j | context, cont_<j)
  with continuation = the tail of encode(context + continuation) after encode(context) (a context's
  trailing whitespace moves to the continuation; no special tokens; an empty context becomes EOS;
  inputs longer than the model's context are cut from the left).
      acc      = [argmax_c ll(c) == gold]
      acc_norm = [argmax_c ll(c) / len(c) == gold]   len(c) = characters of the choice text
  Ties go to the first choice. HellaSwag: query = activity_label + ': ' + ctx_a + ' ' +
  ctx_b.capitalize(), query and endings cleaned as the harness does; PIQA: 'Question: {goal}\\nAnswer:';
  ARC-Easy: 'Question: {question}\\nAnswer:', gold = index of answerKey in choices.label.
LAMBADA (OpenAI version): context = text up to its last space, target = ' ' + last word.
  acc = every target token is the greedy token under teacher forcing (the harness's is_greedy);
  ppl = exp(mean over examples of -ll(target)) (the harness's perplexity).
GSM8K (the harness's gsm8k task): prompt = N shots 'Question: {q}\\nAnswer: {a}' joined by '\\n\\n',
  then '\\n\\nQuestion: {question}\\nAnswer:'; greedy until 'Question:', '</s>', '<|im_end|>', an end
  token or 256 new tokens. Two answers, both reported, both compared after the harness's exact-match
  normalisation (drop ',' and '$', cut everything up to the last '#### ', drop one trailing '.',
  lower case) with the reference answer normalised the same way:
      strict_match      the first '#### (-?[0-9.,]+)' of the generation ('[invalid]' without one)
      flexible_extract  the last match of '(-?[$0-9.,]{2,})|(-?[0-9]+)' in the generation
  Shots: --gsm8k-shots N (default 5, the harness's) from the first N rows of the train split; the
  harness draws its 5 per example at random (seed 1234), so prompts differ, not the protocol.
IFEval: ifeval.py implements the official checkers; this file generates the responses greedily
  (max_new_tokens 1280, the harness's) and wires the CLI.
Prompts: generation (GSM8K, IFEval) uses the raw prompt, as the harness and the authors' code do;
  --chat-template wraps it in the tokenizer's chat template as one user turn, with
  enable_thinking=False (Qwen3 then never opens a <think> block). Generation stops at every end token
  the model's generation config lists, plus the tokenizer's EOS.

Acc (the paper's average; report.paper_average) = mean of HellaSwag acc_norm, PIQA acc_norm, ARC-E
  acc_norm, LAMBADA acc and GSM8K strict_match; '-' unless all five are present. acc_norm for the three
  choice tasks because the harness's length normalisation is what papers report for them (raw acc
  favours short endings); LAMBADA has one target (no normalisation); GSM8K strict_match because it
  credits only the model's own '#### N' answer, never a number that happens to end a rambling
  continuation.
ECE, under explicit names (15 equal-width bins, heldout.expected_calibration_error):
  ece_greedy_word (LAMBADA; the table's 'LAMBADA ECE'): confidence = prod_j max_v q(v | ...) along the
    target, correct = acc: the probability of the model's own greedy completion, scored against
    whether that completion is the target (for one-token targets the usual top-1 confidence).
  ece_choice_softmax (HellaSwag, PIQA, ARC-E; averaged as the table's 'ECE choices'): confidence =
    max_c softmax(ll(c)), correct = acc: what the authors' evaluation code averages.
  The held-out text's token-level ECE (summary.json, report.py's 'held-out ECE') is a third number.

Harness route: RUN/model is a save_pretrained folder, so lm-evaluation-harness scores it directly:
    lm_eval --model hf --model_args pretrained=RUN/model,dtype=bfloat16 \\
        --tasks hellaswag,piqa,arc_easy,lambada_openai,gsm8k,ifeval --batch_size 16 --output_path RUN/lm_eval
  (gsm8k runs 5-shot by its task file, the others zero-shot). `--backend lm-eval` runs exactly that from
  Python (pip install lm-eval; optional, never needed offline) and stores the numbers in eval.json under
  the names above.

The sandbox suite (--suite sandbox; suite.py says what each task is): examples built from the sandbox's
held-out stdlib files (~/.cache/nano-sekd/sandbox-v1, or $NANO_SEKD_HOME/sandbox-v1), its own validation
and test parts, scored by score_multiple_choice or score_lambada above; suite acc = suite.suite_acc.

Data: `--data-dir DIR` reads DIR/<task>/<hub split>.jsonl in the hub dataset's schema (Rowan/hellaswag,
ybisk/piqa, allenai/ai2_arc ARC-Easy, EleutherAI/lambada_openai, openai/gsm8k main, google/IFEval
'input_data'); GSM8K and IFEval fall back to ../shared/data/ when present, everything else to the hub.
Held-out LM metrics (--suite lm) are heldout.heldout_metrics on the run's held-out split of its training
text (data.load_splits(..., splits=('val',)): only held-out text is tokenized), rebuilt from config.json.
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile

import torch
from tqdm import tqdm

import report  # the run's data flags and the paper's averages, read as the tables read them
import suite  # the sandbox's downstream tasks
from common import (ArgumentParser, UserError, atomic_json, atomic_write, read_json, read_jsonl, row_chunks, run_cli,
                    writable_dir_problem)
from fused_head import matmul_weight
from heldout import expected_calibration_error, heldout_metrics
from models import head_weight, load_model, trunk

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
GSM8K_SHOT_POOL = 8  # the first rows of GSM8K train: shots only, never a validation example


# -----------------------------------------------------------------------------
# files

def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -----------------------------------------------------------------------------
# datasets

def _task_file(task, hub_split, data_dir):
    """The local file that holds `task`'s `hub_split`, or None (then: the hub)."""
    name = "input_data" if task == "ifeval" else hub_split
    shared = os.path.join(SHARED_DATA, task, f"{name}.jsonl")
    shared = shared if task in ("gsm8k", "ifeval") and os.path.isfile(shared) else None
    if data_dir is not None:
        path = os.path.join(data_dir, task, f"{name}.jsonl")
        if os.path.isfile(path):
            return path
        if shared:
            return shared
        # an explicit --data-dir never silently falls back to the network
        raise UserError(f"--data-dir: {path} not found (layout: DIR/<task>/<hub split>.jsonl)")
    return shared


def _load_hub(task, hub_split):
    from datasets import load_dataset
    errors = []
    for repo, config in HUB[task]:  # several ids: the original first, then a maintained mirror
        try:
            return [dict(r) for r in load_dataset(repo, config, split=hub_split)]
        except Exception as e:  # noqa: BLE001 (try the next mirror, report all)
            errors.append(f"{repo}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise UserError(f"{task}: no local file and the hub failed ({'; '.join(errors)}); "
                    "use --data-dir DIR with DIR/<task>/<hub split>.jsonl")


def has_split(task, split):
    return split in SPLITS[task]


def load_rows(task, hub_split, data_dir=None):
    path = _task_file(task, hub_split, data_dir)
    return read_jsonl(path) if path else _load_hub(task, hub_split)


def load_docs(task, split="test", data_dir=None, limit=None):
    """Rows of `task` in the hub's schema for `split` in {validation, test} (table in the module doc)."""
    if task not in SPLITS:
        raise UserError(f"unknown task {task!r}; choose from {sorted(SPLITS)}")
    if not has_split(task, split):
        raise UserError(f"--split {split}: {task} has no {split} split (the paper selects on "
                        f"{', '.join(t for t in SPLITS if has_split(t, 'validation'))})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    hub_split, first_row = SPLITS[task][split]
    rows = load_rows(task, hub_split, data_dir)[first_row:]
    return rows[:limit] if limit is not None else rows


def _clean_hellaswag(text):
    # WikiHow-side artifacts of HellaSwag, removed as lm-evaluation-harness does
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _label(doc, key, task):
    v = doc.get(key)
    if v is None or v == "" or (isinstance(v, int) and v < 0):
        raise UserError(f"{task}: example without a label ({key}={v!r}); the hub's test split of "
                        f"{task} is unlabelled")
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
        raise UserError(f"arc_easy: answerKey {doc['answerKey']!r} not among choice labels {labels}")
    return {"context": f"Question: {doc['question']}\nAnswer:", "choices": list(doc["choices"]["text"]),
            "gold": labels.index(doc["answerKey"])}


def lambada_example(doc):
    text = doc["text"]
    if " " not in text.strip():
        raise UserError(f"lambada: text without a space to split off the last word: {text[:60]!r}")
    context, word = text.rsplit(" ", 1)
    return {"context": context, "target": " " + word}



def load_probe(path):
    """train.py --probe's examples: LAMBADA-style rows {"text": context + " " + the word to predict}."""
    rows = read_jsonl(path, "--probe")
    if not rows or not all(isinstance(row.get("text"), str) for row in rows):
        raise UserError(f"--probe {path}: need one or more rows, each with a string field 'text'")
    return [lambada_example(row) for row in rows]

def gsm8k_example(doc):
    if "####" not in doc["answer"]:
        raise UserError(f"gsm8k: reference answer without '####': {doc['answer'][-60:]!r}")
    return {"question": doc["question"], "answer": doc["answer"]}


# -----------------------------------------------------------------------------
# GSM8K answers, as lm-evaluation-harness's gsm8k task filters and compares them

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]  # the task's regexes_to_ignore, in order
INVALID = "[invalid]"


def strict_match(text):
    """The harness's strict-match filter: the first '#### N' of the text."""
    found = GSM8K_STRICT.findall(text)
    return found[0].strip() if found else INVALID


def flexible_extract(text):
    """The harness's flexible-extract filter: the last number-like match of the text."""
    found = GSM8K_FLEXIBLE.findall(text)
    if not found:
        return INVALID
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else INVALID


def gsm8k_normalise(text):
    """The harness's exact_match normalisation (regexes_to_ignore, then ignore_case)."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_correct(extracted, reference_answer):
    return gsm8k_normalise(extracted) == gsm8k_normalise(reference_answer)


def gsm8k_prompt(question, shots):
    """The harness's few-shot context: shots ({question, answer}) then the question."""
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    return "\n\n".join(parts + [f"Question: {question}\nAnswer:"])


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


def vocab_size(model, tokenizer):
    # cut padded head rows (Qwen) so they never take probability mass, as heldout.heldout_metrics does
    return min(len(tokenizer), head_weight(model).shape[0])


@torch.no_grad()
def loglikelihood(model, requests, batch_size=16, vocab=None, chunk_size=1024, progress=True,
                  desc="loglikelihood"):
    """Score (context_ids, continuation_ids) requests.

    Returns one (ll, is_greedy, log_conf) per request: ll = sum_j log q(cont_j | ...), is_greedy = every
    cont_j is the top-1 token, log_conf = sum_j log max_v q(v | ...). Requests are sorted by length
    (less padding) and right-padded: with a causal mask, pads after a row's tokens change nothing
    before them, so no attention mask is needed. Logits exist only at continuation positions.
    """
    device = next(model.parameters()).device
    W = matmul_weight(head_weight(model, vocab))  # (V, d), cast once under autocast
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
                raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's context")
            rows.append(inp)
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)  # pad id 0: never attended by real tokens
        for r, inp in enumerate(rows):
            ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        hidden = trunk(model, ids.to(device))  # (B, T, d)
        row_of, pos_of, targets = [], [], []
        for r, i in enumerate(idx):
            n = len(requests[i][1])
            row_of += [r] * n
            pos_of += range(len(rows[r]) - n, len(rows[r]))  # position t predicts token t+1
            targets += requests[i][1]
        ll = torch.zeros(len(idx), dtype=torch.float64)
        log_conf = torch.zeros(len(idx), dtype=torch.float64)
        misses = torch.zeros(len(idx), dtype=torch.long)
        segment = torch.tensor(row_of, dtype=torch.long)
        y = torch.tensor(targets, dtype=torch.long, device=device)
        h = hidden[segment.to(device), torch.tensor(pos_of, dtype=torch.long, device=device)]  # (N, d)
        for c0, c1 in row_chunks(len(targets), chunk_size):
            lp = torch.log_softmax((h[c0:c1] @ W.T).float(), -1)  # (n, V) fp32
            yc, seg = y[c0:c1], segment[c0:c1]
            top, pred = lp.max(-1)
            ll.index_add_(0, seg, lp.gather(1, yc[:, None])[:, 0].double().cpu())
            log_conf.index_add_(0, seg, top.double().cpu())
            misses.index_add_(0, seg, (pred != yc).long().cpu())
        for r, i in enumerate(idx):
            out[i] = (float(ll[r]), bool(misses[r] == 0), float(log_conf[r]))
    return out


def format_prompt(tokenizer, text, chat_template=False):
    """The raw prompt, or (chat_template) `text` as one user turn with thinking disabled."""
    if not chat_template:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template: the tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def end_token_ids(model, tokenizer):
    """Every id that ends a generation: the tokenizer's EOS and the generation config's eos_token_id(s)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def _cut(text, stop):
    for s in stop:
        j = text.find(s)
        if j >= 0:
            text = text[:j]
    return text


def _until_end(ids, ends):
    for j, t in enumerate(ids):
        if t in ends:
            return ids[:j]
    return ids


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts, max_new_tokens=256, batch_size=8, stop=(), use_generate=None,
                    progress=True, desc="generate"):
    """Greedy completions of `prompts` (strings), ended by any end_token_ids and cut before the first
    stop string. HF models go through `model.generate` (left padding + attention mask, KV cache,
    batched); other models (and use_generate=False) through a plain loop that recomputes the prefix at
    each step, the reference the fast path is tested against."""
    ends = end_token_ids(model, tokenizer)
    use_generate = hasattr(model, "generate") if use_generate is None else use_generate
    device = next(model.parameters()).device
    encoded = [_encode(tokenizer, p) or [ends[0]] for p in prompts]
    out = [None] * len(prompts)
    if not use_generate:
        W = head_weight(model, vocab_size(model, tokenizer))
        for i in tqdm(range(len(encoded)), desc=desc, disable=not progress):
            generated = []
            for _ in range(max_new_tokens):
                h = trunk(model, torch.tensor([encoded[i] + generated], device=device))[0, -1]  # (d,)
                nxt = int((h @ W.T).float().argmax())
                if nxt in ends:
                    break
                generated.append(nxt)
                if stop and any(s in tokenizer.decode(generated) for s in stop):
                    break
            out[i] = _cut(tokenizer.decode(generated, skip_special_tokens=True), stop)
        return out
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stop_kw = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        idx = order[b:b + batch_size]
        T = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every row's next token is at column T
            ids[r, T - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, T - len(encoded[i]):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=ends,
                                   temperature=None, top_p=None, top_k=None, **stop_kw)[:, T:]
        for r, i in enumerate(idx):
            text = tokenizer.decode(_until_end(generated[r].tolist(), ends), skip_special_tokens=True)
            out[i] = _cut(text, stop)
    return out


# -----------------------------------------------------------------------------
# benchmark scorers: each returns (metrics, per-example rows)

def _argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)  # first index on ties, like numpy


def _nonempty(examples, what):
    if not examples:
        raise UserError(f"{what}: no examples to score (empty data file or split)")


def score_multiple_choice(model, tokenizer, examples, batch_size=16, progress=True):
    """acc, acc_norm and ece_choice_softmax over examples {context, choices, gold} (module doc)."""
    _nonempty(examples, "multiple choice")
    requests = [encode_pair(tokenizer, ex["context"], " " + c) for ex in examples for c in ex["choices"]]
    scored = loglikelihood(model, requests, batch_size, vocab_size(model, tokenizer), progress=progress,
                           desc="choices")
    rows, j = [], 0
    for i, ex in enumerate(examples):
        lls = [s[0] for s in scored[j:j + len(ex["choices"])]]
        j += len(ex["choices"])
        probs = torch.tensor(lls, dtype=torch.float64).softmax(0)
        rows.append({"index": i, "gold": ex["gold"], "choice_loglikelihoods": lls,
                     "choice_chars": [len(c) for c in ex["choices"]], "pred": _argmax(lls),
                     "pred_norm": _argmax([ll / max(len(c), 1) for ll, c in zip(lls, ex["choices"])]),
                     "choice_softmax_max": float(probs.max())})
    n = len(rows)
    acc = [r["pred"] == r["gold"] for r in rows]
    metrics = {"acc": sum(acc) / n, "acc_norm": sum(r["pred_norm"] == r["gold"] for r in rows) / n,
               "ece_choice_softmax": expected_calibration_error([r["choice_softmax_max"] for r in rows], acc),
               "n": n}
    return metrics, rows


def score_lambada(model, tokenizer, examples, batch_size=16, progress=True):
    """LAMBADA last-word acc, perplexity and ece_greedy_word over examples {context, target}."""
    _nonempty(examples, "lambada")
    requests = [encode_pair(tokenizer, ex["context"], ex["target"]) for ex in examples]
    scored = loglikelihood(model, requests, batch_size, vocab_size(model, tokenizer), progress=progress,
                           desc="lambada")
    rows = [{"index": i, "target": ex["target"], "loglikelihood": ll, "is_greedy": greedy,
             "greedy_confidence": math.exp(log_conf)}
            for i, (ex, (ll, greedy, log_conf)) in enumerate(zip(examples, scored))]
    n = len(rows)
    correct = [r["is_greedy"] for r in rows]
    nll = -sum(r["loglikelihood"] for r in rows) / n
    metrics = {"acc": sum(correct) / n, "ppl": math.exp(min(nll, 700.0)),
               "ece_greedy_word": expected_calibration_error([r["greedy_confidence"] for r in rows], correct),
               "n": n}
    return metrics, rows


def score_gsm8k(model, tokenizer, examples, shots=(), batch_size=8, max_new_tokens=256, chat_template=False,
                progress=True):
    """strict_match and flexible_extract over examples {question, answer} with `shots` in the prompt."""
    _nonempty(examples, "gsm8k")
    prompts = [format_prompt(tokenizer, gsm8k_prompt(ex["question"], shots), chat_template)
               for ex in examples]
    generations = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop=GSM8K_STOP,
                                  progress=progress, desc="gsm8k")
    rows = []
    for i, (ex, text) in enumerate(zip(examples, generations)):
        strict, flexible = strict_match(text), flexible_extract(text)
        rows.append({"index": i, "question": ex["question"], "answer": ex["answer"], "generation": text,
                     "strict_match": strict, "strict_correct": gsm8k_correct(strict, ex["answer"]),
                     "flexible_extract": flexible, "flexible_correct": gsm8k_correct(flexible, ex["answer"])})
    n = len(rows)
    metrics = {"strict_match": sum(r["strict_correct"] for r in rows) / n,
               "flexible_extract": sum(r["flexible_correct"] for r in rows) / n, "shots": len(shots), "n": n}
    return metrics, rows


def _ifeval():
    try:
        import ifeval
    except ImportError as e:
        raise UserError(f"IFEval scoring needs ifeval.py next to eval.py ({e})") from None
    return ifeval


def ifeval_inputs_path(path=None, data_dir=None, out_dir=None):
    """--ifeval-inputs, else DIR/ifeval/input_data.jsonl, ../shared/data/ifeval/, else google/IFEval."""
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"--ifeval-inputs: {path} not found")
        return path
    local = _task_file("ifeval", "train", data_dir)
    if local:
        return local
    rows = [dict(r, kwargs=[{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]])
            for r in _load_hub("ifeval", "train")]  # the hub's Arrow schema fills unused kwargs with None
    path = os.path.join(out_dir or tempfile.mkdtemp(prefix="ifeval_"), "ifeval_input_data.jsonl")
    write_jsonl(path, rows)
    return path


def _ifeval_read(load, path, flag):
    """ifeval.py's reader `load` of `path`; its errors (they name the file and the row) as one UserError
    naming `flag` too."""
    try:
        return load(path)
    except (OSError, ValueError, UserError) as e:
        raise UserError(f"{flag}: {e}") from None


def score_ifeval_responses(responses_path, inputs_path=None, out_dir=None, data_dir=None):
    """Score ready-made responses (jsonl: prompt, response) with ifeval.py; write DIR/ifeval_results_*."""
    ife = _ifeval()
    inputs = _ifeval_read(ife.load_inputs, ifeval_inputs_path(inputs_path, data_dir, out_dir), "--ifeval-inputs")
    responses = _ifeval_read(ife.load_responses, responses_path, "--ifeval-responses")
    strict, loose, summary = ife.score_responses(inputs, responses)
    if out_dir:
        ife.write_results(out_dir, strict, loose)
    n = len(strict)
    return {"prompt_strict": sum(bool(r["follow_all_instructions"]) for r in strict) / max(n, 1),
            "prompt_loose": sum(bool(r["follow_all_instructions"]) for r in loose) / max(n, 1),
            "inst_strict": summary.get("inst_level_strict_acc"),
            "inst_loose": summary.get("inst_level_loose_acc"),
            "n": n}


def score_ifeval(model, tokenizer, input_rows, out_dir=None, batch_size=8, max_new_tokens=1280,
                 chat_template=False, progress=True):
    """Generate greedy responses to IFEval prompts (official input rows), then score them. The
    per-prompt verdicts (ifeval_results_*.jsonl) and responses are the per-example outputs."""
    _nonempty(input_rows, "ifeval")
    prompts = [format_prompt(tokenizer, r["prompt"], chat_template) for r in input_rows]
    responses = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress,
                                desc="ifeval")
    with tempfile.TemporaryDirectory() as tmp:
        d = out_dir or tmp
        inputs_path = os.path.join(d, "ifeval_input_data.jsonl")  # exactly the prompts scored
        responses_path = os.path.join(d, "ifeval_responses.jsonl")
        write_jsonl(inputs_path, input_rows)
        write_jsonl(responses_path, [{"prompt": r["prompt"], "response": o}
                                     for r, o in zip(input_rows, responses)])
        return score_ifeval_responses(responses_path, inputs_path, out_dir)


def score_lm(model, tokenizer, split="test", teacher=None, batch_size=8, progress=True, **data_kwargs):
    """heldout.heldout_metrics on the held-out split of the training text ('val' for validation, else
    'test'); only that split is tokenized (data.load_splits(..., splits=(name,)))."""
    import data  # lazily: only --suite lm needs the corpus pipeline
    name = "val" if split == "validation" else "test"
    task, task_data = data_kwargs.pop("task", "lm"), data_kwargs.pop("task_data", "openai/gsm8k")
    if task == "gsm8k":  # a task-specific run: its held-out GSM8K answers, prompt masked as in training
        packed = data.pack_gsm8k(data.load_gsm8k_rows(task_data), tokenizer, data_kwargs.get("seq_len", 512),
                                 data_kwargs.get("tokens"), data_kwargs.get("seed", 0))[name]
    else:
        packed = data.load_splits(tokenizer, splits=(name,), **data_kwargs)[name]
    batches = tqdm(packed.batches(batch_size), desc="lm", disable=not progress,
                   total=math.ceil(len(packed) / batch_size) if hasattr(packed, "__len__") else None)
    return heldout_metrics(model, batches, teacher=teacher, vocab_size=vocab_size(model, tokenizer))


# -----------------------------------------------------------------------------
# running tasks

def examples_dir(out_dir, split):
    return os.path.join(out_dir, "eval_examples" if split == "test" else f"eval_examples_{split}")


def evaluate(model, tokenizer, tasks, split="test", data_dir=None, limit=None, batch_size=16,
             max_new_tokens=None, chat_template=False, out_dir=None, ifeval_inputs=None, teacher=None,
             lm_kwargs=None, gsm8k_shots=5, progress=True, prepared=None):
    """Run `tasks` (names in SCORERS, 'ifeval', 'lm'); returns {task: metrics}; with `out_dir`, also
    writes every task's per-example rows to examples_dir(out_dir, split)/<task>.jsonl.

    Every task's data is loaded before any scoring (`prepared`: load_inputs' result, when the caller
    loaded it before the model), so a missing file fails in seconds, not hours.
    """
    ifeval_dir = _ifeval_dir(out_dir, split)
    inputs, shots = prepared or load_inputs(tasks, split, data_dir, limit, ifeval_inputs, out_dir, gsm8k_shots)
    results = {}
    for task in tasks:
        rows = None
        if task == "lm":
            metrics = score_lm(model, tokenizer, split, teacher, batch_size, progress, **(lm_kwargs or {}))
        elif task == "ifeval":
            metrics = score_ifeval(model, tokenizer, inputs[task], ifeval_dir, batch_size,
                                   max_new_tokens or 1280, chat_template, progress)
        elif task == "gsm8k":
            metrics, rows = score_gsm8k(model, tokenizer, inputs[task], shots, batch_size,
                                        max_new_tokens or 256, chat_template, progress)
        else:
            metrics, rows = SCORERS[task](model, tokenizer, inputs[task], batch_size=batch_size,
                                          progress=progress)
        if out_dir and rows is not None:
            write_jsonl(os.path.join(examples_dir(out_dir, split), f"{task}.jsonl"), rows)
        metrics["split"] = split
        results[task] = metrics
        print(f"{task}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in metrics.items()), file=sys.stderr)
    return results


def score_parts(model, tokenizer, tasks, out_dir, splits=("validation", "test"), batch_size=64):
    """`tasks` on each of `splits`, written as `eval.py RUN --split S` writes them (report.eval_file and the
    per-example rows under out_dir): {split: {task: metrics}}. train.py --suite calls it after training."""
    out = {}
    for split in splits:
        out[split] = evaluate(model, tokenizer, list(tasks), split, out_dir=out_dir, batch_size=batch_size,
                              progress=False)
        atomic_json(report.eval_file(out_dir, split), out[split])
    return out


def _ifeval_dir(out_dir, split):
    """IFEval's responses and verdicts: OUT/ifeval/ (OUT/ifeval_validation/ ...); None without OUT."""
    return os.path.join(out_dir, "ifeval" if split == "test" else f"ifeval_{split}") if out_dir else None


def check_tasks(tasks):
    """A UserError naming --tasks for a task name that is not one."""
    unknown = [t for t in tasks if t != "lm" and t not in SPLITS]
    if unknown or not tasks:
        raise UserError(f"--tasks: unknown task {(unknown or [''])[0]!r}; choose from {sorted(SPLITS) + ['lm']}")


def load_inputs(tasks, split="test", data_dir=None, limit=None, ifeval_inputs=None, out_dir=None, gsm8k_shots=5):
    """Every benchmark task's examples and GSM8K's shots, ({task: examples}, shots), loaded before any
    model so a missing or bad file fails in seconds ('lm' reads its text later: see check_lm_data)."""
    check_tasks(tasks)
    inputs = {}
    for task in tasks:
        if task == "lm":
            continue
        if task == "ifeval":
            if not has_split("ifeval", split):
                load_docs("ifeval", split)  # raises the --split error
            rows = read_jsonl(ifeval_inputs_path(ifeval_inputs, data_dir, _ifeval_dir(out_dir, split)))
            inputs[task] = rows[:limit] if limit else rows
        elif task in suite.TASKS:  # built from the sandbox's held-out files, never the hub
            inputs[task] = suite.examples(task, split, limit=limit)
        else:
            inputs[task] = [EXAMPLES[task](d) for d in load_docs(task, split, data_dir, limit)]
    shots = []
    if "gsm8k" in tasks:
        if not 0 <= gsm8k_shots <= GSM8K_SHOT_POOL:
            raise UserError(f"--gsm8k-shots must be in 0..{GSM8K_SHOT_POOL}, got {gsm8k_shots}")
        shots = [gsm8k_example(d) for d in load_rows("gsm8k", "train", data_dir)[:gsm8k_shots]]
    return inputs, shots


def check_lm_data(kwargs):
    """--suite lm's text source (the run's --data or --task-data), checked before any model loads; prints
    one warning line for a file that does not look like text."""
    import data
    if kwargs.get("task") == "gsm8k":
        return data.check_task_data(kwargs.get("task_data", "openai/gsm8k"))
    for note in data.check_source(kwargs.get("data"), kwargs.get("text_field", "text")):
        print(f"eval.py: warning: {note}", file=sys.stderr)


def evaluate_lm_eval(model_path, tasks, limit=None, batch_size=16, device="cpu", dtype="auto", gsm8k_shots=5):
    """The same tasks through lm-evaluation-harness's HFLM (--backend lm-eval), under our names."""
    try:
        import lm_eval
    except ImportError:
        raise UserError("--backend lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    results = {}
    for task in tasks:
        if task not in HARNESS:
            raise UserError(f"--backend lm-eval: no harness task for {task!r}")
        name, mapping = HARNESS[task]
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path},dtype={dtype}",
                                      tasks=[name], num_fewshot=gsm8k_shots if task == "gsm8k" else None,
                                      limit=limit, batch_size=batch_size, device=device)["results"][name]
        results[task] = {ours: out.get(theirs) for ours, theirs in mapping.items()}
        results[task].update(split="test", backend="lm-eval")
    return results


# -----------------------------------------------------------------------------
# command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, the epilog's lines kept as written."""


def get_parser():
    p = ArgumentParser(
        prog="eval.py", description=__doc__.split("\n")[0], allow_abbrev=False, formatter_class=HelpFormatter,
        epilog="tables and figures moved to report.py; these are handed over to it:\n"
               "  eval.py --compare RUN... [--compare-baseline NAME] [--compare-out F.md]\n"
               "  eval.py --plot F.png [--plot-kind budget|entropy] [--plot-metric M] RUN...")
    a = p.add_argument
    a("target", nargs="?", help="run dir (loads RUN/model), hub id, HF dir, .gguf or 'smollm2'")
    a("--suite", choices=sorted(SUITES), default="paper", help="which tasks (overridden by --tasks)")
    a("--tasks", help="comma list of " + ",".join(list(SPLITS) + ["lm"]))
    a("--split", choices=["validation", "test"], default="test",
      help="test: the reported numbers; validation: the budget search (disjoint; table in the doc)")
    a("--limit", type=int, help="examples per task")
    a("--data-dir", help="local files DIR/<task>/<hub split>.jsonl in the hub schema")
    a("--batch-size", type=int, default=16)
    a("--max-new-tokens", type=int, help="generation length (default 256 for GSM8K, 1280 for IFEval)")
    a("--gsm8k-shots", type=int, default=5, help="GSM8K shots from the train split (the harness's 5)")
    a("--chat-template", action="store_true", help="wrap GSM8K/IFEval prompts in the chat template")
    a("--backend", choices=["ours", "lm-eval"], default="ours", help="lm-eval: lm-evaluation-harness's HFLM")
    a("--student-device", help="the evaluated model's device (default: cuda if available, else cpu)")
    a("--teacher-device", help="--suite lm: the teacher's device (default: the student's)")
    a("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="auto: bf16 on GPU, fp32 on CPU")
    a("--out", help="output dir (eval.json, per-example outputs, IFEval results); default: the run dir")
    a("--teacher", help="--suite lm: teacher for KL/top-1 (default: the run's; 'none' to skip)")
    a("--data", help="--suite lm: data.load_splits source (default: the run's)")
    a("--seq-len", type=int)
    a("--tokens", type=float)
    a("--eval-tokens", type=float)
    a("--seed", type=int)
    a("--ifeval-responses", metavar="FILE",
      help="score ready-made responses (jsonl: prompt, response); needs --out")
    a("--ifeval-inputs", metavar="FILE",
      help="official input_data.jsonl (default: ../shared/data/ifeval/ or hub)")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def torch_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _is_run(path):
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, "model"))


def _is_run_without_model(path):
    """A train.py --out-dir (its config.json has a config_key) with no model/ to evaluate."""
    cfg = os.path.join(path, "config.json")
    return (os.path.isdir(path) and not _is_run(path) and os.path.isfile(cfg)
            and "config_key" in (read_json(cfg) or {}))


def check_flags(args):
    """eval.py's number flags, checked before anything loads (UserError naming the flag)."""
    for flag in ("limit", "batch_size", "max_new_tokens", "seq_len"):
        v = getattr(args, flag)
        if v is not None and v < (2 if flag == "seq_len" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be >= {2 if flag == 'seq_len' else 1}, got {v}")
    for flag in ("tokens", "eval_tokens"):
        v = getattr(args, flag)
        if v is not None and not (math.isfinite(v) and v >= 1):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number >= 1, got {v}")
    if args.out is not None and writable_dir_problem(args.out):
        raise UserError(f"--out {args.out!r} {writable_dir_problem(args.out)}")


def _tasks(args):
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",")]
        check_tasks(tasks)
        return tasks
    tasks = []
    for task in SUITES[args.suite]:
        if task == "lm" or has_split(task, args.split):
            tasks.append(task)
        else:
            print(f"{task}: no {args.split} split (not a selection task), skipped", file=sys.stderr)
    return tasks


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=")[0] in ("--compare", "--plot") for a in argv):
        return report.main(argv)  # tables and figures live there; this keeps old command lines working
    args = get_parser().parse_args(argv)
    check_flags(args)
    if args.ifeval_responses:
        if not args.out:
            raise UserError("--ifeval-responses needs --out DIR")
        res = score_ifeval_responses(args.ifeval_responses, args.ifeval_inputs, args.out, args.data_dir)
        print(json.dumps(res))
        return res
    if not args.target:
        raise UserError("give one run dir or model to evaluate (or --ifeval-responses; tables: report.py)")
    if _is_run_without_model(args.target):
        raise UserError(f"eval.py target {args.target}: a train.py run without model/ (run with --no-save-model, "
                        f"or killed before it finished): rerun train.py with --save-model, then evaluate it")
    run = _is_run(args.target)
    model_path = os.path.join(args.target, "model") if run else args.target
    cfg = read_json(os.path.join(args.target, "config.json")) if run else {}
    tasks = _tasks(args)
    student_device = args.student_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(args.dtype, student_device)
    out_dir = args.out or (args.target if run else None)
    if out_dir and writable_dir_problem(out_dir):
        raise UserError(f"eval.py: the output dir {out_dir!r} {writable_dir_problem(out_dir)} (set --out)")
    if args.backend == "lm-eval":
        if args.split != "test" or "lm" in tasks:
            raise UserError("--backend lm-eval scores the benchmarks' test split only (no --suite lm)")
        dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
        results = evaluate_lm_eval(model_path, tasks, args.limit, args.batch_size, student_device, dtype_name,
                                   args.gsm8k_shots)
    else:
        lm_kwargs = report.data_kwargs(cfg, args)
        if "lm" in tasks:
            check_lm_data(lm_kwargs)
        prepared = load_inputs(tasks, args.split, args.data_dir, args.limit, args.ifeval_inputs, out_dir,
                               args.gsm8k_shots)  # before the model: a bad file fails in seconds
        model, tok = load_model(model_path, student_device, dtype, flag="eval.py target")
        teacher = None
        if "lm" in tasks:
            spec = args.teacher or cfg.get("teacher")
            if spec and spec != "none":
                teacher, _ = load_model(spec, args.teacher_device or student_device, dtype, flag="--teacher")
        results = evaluate(model, tok, tasks, args.split, args.data_dir, args.limit, args.batch_size,
                           args.max_new_tokens, args.chat_template, out_dir, args.ifeval_inputs, teacher,
                           lm_kwargs, args.gsm8k_shots, progress=not args.no_progress, prepared=prepared)
    if out_dir:
        path = report.eval_file(out_dir, args.split)
        merged = read_json(path) if os.path.isfile(path) else {}
        merged.update(results)
        atomic_json(path, merged)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(results, indent=2))
    average = report.paper_average(results)
    if average is not None:
        print(f"Acc (paper average) = {average:.4f}")
    if suite.suite_acc(results) is not None:
        print(f"suite acc (sandbox suite average) = {suite.suite_acc(results):.4f}")
    return results


# -----------------------------------------------------------------------------
# registries

GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # the harness's `until` for gsm8k

# --split -> (the hub split that holds it, first row used): see the table in the module doc
SPLITS = {
    "hellaswag": {"validation": ("train", 0), "test": ("validation", 0)},
    "piqa": {"validation": ("train", 0), "test": ("validation", 0)},
    "arc_easy": {"validation": ("validation", 0), "test": ("test", 0)},
    "gsm8k": {"validation": ("train", GSM8K_SHOT_POOL), "test": ("test", 0)},
    "lambada": {"test": ("test", 0)},
    "ifeval": {"test": ("train", 0)},
    **{task: {"validation": ("validation", 0), "test": ("test", 0)} for task in suite.TASKS},  # suite.py's parts
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
    **{task: score_lambada if spec["kind"] == "last_word" else score_multiple_choice
       for task, spec in suite.TASKS.items()},
}

SUITES = {
    "paper": ["hellaswag", "piqa", "arc_easy", "lambada", "gsm8k", "ifeval"],
    "lm": ["lm"],
    "sandbox": list(suite.SUITE),
    "all": ["lm", "hellaswag", "piqa", "arc_easy", "lambada", "gsm8k", "ifeval"],
}

HARNESS = {  # our task -> (harness task, {our metric: harness metric})
    "hellaswag": ("hellaswag", {"acc": "acc,none", "acc_norm": "acc_norm,none"}),
    "piqa": ("piqa", {"acc": "acc,none", "acc_norm": "acc_norm,none"}),
    "arc_easy": ("arc_easy", {"acc": "acc,none", "acc_norm": "acc_norm,none"}),
    "lambada": ("lambada_openai", {"acc": "acc,none", "ppl": "perplexity,none"}),
    "gsm8k": ("gsm8k", {"strict_match": "exact_match,strict-match",
                        "flexible_extract": "exact_match,flexible-extract"}),
    "ifeval": ("ifeval", {"prompt_strict": "prompt_level_strict_acc,none",
                          "prompt_loose": "prompt_level_loose_acc,none",
                          "inst_strict": "inst_level_strict_acc,none",
                          "inst_loose": "inst_level_loose_acc,none"}),
}

if __name__ == "__main__":
    run_cli(main, "eval.py")
