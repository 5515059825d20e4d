"""Tests for eval.py: benchmark scorers on fixture files in the hub's schema, with fake models whose
logits force the answer, tiny random Llama models for fast-path-vs-reference checks, the compare table
and the CLI (tables and figures: tests/test_report.py). No network, no ../shared."""
import json
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import eval as E  # noqa: E402
import heldout  # noqa: E402
import report  # noqa: E402
from common import UserError  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


# -----------------------------------------------------------------------------
# helpers: a byte-level tokenizer built in memory, fake LMs with set logits, a tiny Llama

def byte_tokenizer():
    """One token per byte, plus ' '+lowercase letter merged into one token ('Ġa'), plus <eos>."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for ch in LETTERS:
        vocab["Ġ" + ch] = len(vocab)
        merges.append(("Ġ", ch))
    vocab["<eos>"] = len(vocab)
    t = Tokenizer(tm.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tid(tok, piece):
    return tok.convert_tokens_to_ids(piece)


class BigramLM(torch.nn.Module):
    """logits at position t = M[x_t]: hidden = one-hot(x_t) (d = V), head W = M^T, so h @ W^T = M[x_t]."""

    def __init__(self, M):
        super().__init__()
        self.V = M.shape[0]
        self.W = torch.nn.Parameter(M.T.contiguous().clone())
        self.model = lambda input_ids: types.SimpleNamespace(
            last_hidden_state=F.one_hot(input_ids, self.V).float())

    def get_output_embeddings(self):
        return types.SimpleNamespace(weight=self.W)


def unigram(tok, logit_of):
    V = len(tok)
    row = torch.zeros(V)
    for piece, v in logit_of.items():
        row[tid(tok, piece)] = v
    return BigramLM(row.expand(V, V))


def bigram_from_probs(tok, rows):
    """rows: {current piece: {next piece: prob}}; unlisted mass spread evenly; unlisted rows -> <eos>."""
    V = len(tok)
    P = torch.zeros(V, V)
    P[:, tid(tok, "<eos>")] = 1.0
    for cur, nxt in rows.items():
        c = tid(tok, cur)
        rest = 1.0 - sum(nxt.values())
        P[c] = rest / (V - len(nxt))
        for piece, p in nxt.items():
            P[c, tid(tok, piece)] = p
    return BigramLM(torch.log(P.clamp_min(1e-30)))


def tiny_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


HELLASWAG = [  # unigram model below: ll(' b') = -6.36 beats ll(' aaaaaaaa') = -10.87, per char it loses
    {"ind": 0, "activity_label": "Baking", "ctx_a": "A man [title] mixes flour.", "ctx_b": "then he",
     "ctx": "A man [title] mixes flour. then he", "endings": ["b", "aaaaaaaa", "bb", "bbb"],
     "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "1"},
    {"ind": 1, "activity_label": "Running", "ctx_a": "She runs.", "ctx_b": "she", "ctx": "She runs. she",
     "endings": ["aa", "bb", "bbbb", "b"], "source_id": "activitynet~2", "split": "val",
     "split_type": "indomain", "label": "0"},
]
PIQA = [{"goal": "open a jar", "sol1": "aaa", "sol2": "bbb", "label": 0},
        {"goal": "dry a shirt", "sol1": "aaa", "sol2": "bbb", "label": 1}]
ARC = [{"id": "q1", "question": "Which?", "choices": {"text": ["bbb", "aaa", "bab"], "label": ["A", "B", "C"]},
        "answerKey": "B"},
       {"id": "q2", "question": "What?", "choices": {"text": ["bb", "aa", "b b", "ab"], "label": ["1", "2", "3", "4"]},
        "answerKey": "1"}]


GSM8K_TEST = [{"question": "How many?", "answer": "2 + 40 = <<2+40=42>>42\n#### 42"},
              {"question": "And now?", "answer": "#### 7"}]
GSM8K_TRAIN = [{"question": f"Shot {i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)]


@pytest.fixture()
def data_dir(tmp_path):
    """Every task's hub split files: test rows (reported) and validation rows (selection) differ."""
    d = tmp_path / "data"
    write_jsonl(str(d / "hellaswag" / "validation.jsonl"), HELLASWAG)
    write_jsonl(str(d / "hellaswag" / "train.jsonl"), HELLASWAG[:1])
    write_jsonl(str(d / "piqa" / "validation.jsonl"), PIQA)
    write_jsonl(str(d / "piqa" / "train.jsonl"), PIQA[:1])
    write_jsonl(str(d / "arc_easy" / "test.jsonl"), ARC)
    write_jsonl(str(d / "arc_easy" / "validation.jsonl"), ARC[:1])
    write_jsonl(str(d / "lambada" / "test.jsonl"), [{"text": f"story number {i} ends with word{i}"} for i in range(5)])
    write_jsonl(str(d / "gsm8k" / "test.jsonl"), GSM8K_TEST)
    write_jsonl(str(d / "gsm8k" / "train.jsonl"), GSM8K_TRAIN)
    return str(d)


# -----------------------------------------------------------------------------
# ECE and LAMBADA

def test_ece_hand_example():
    # one example per bin: (0.05 + 0.9 + 0.38 + 0.55 + 0.2) / 5
    ece = heldout.expected_calibration_error([0.95, 0.9, 0.62, 0.55, 0.2], [1, 0, 1, 0, 0], n_bins=15)
    assert ece == pytest.approx(0.416, abs=1e-9)


def test_lambada_acc_ppl_ece_forced(tok):
    conf = [0.95, 0.9, 0.62, 0.55, 0.2]
    correct = [1, 0, 1, 0, 0]
    V = len(tok)
    rows = {}  # the context's last token decides the next-token distribution of its example
    for c, p, ok in zip("ABCDE", conf, correct):
        rows[c] = {"Ġx": p} if ok else {"Ġz": p}  # the top-1 token has probability p; gold is ' x'
    model = bigram_from_probs(tok, rows)
    examples = [E.lambada_example({"text": f"the end {c} x"}) for c in "ABCDE"]
    assert examples[0] == {"context": "the end A", "target": " x"}
    res, rows = E.score_lambada(model, tok, examples, batch_size=2, progress=False)
    p_gold = [p if ok else (1 - p) / (V - 1) for p, ok in zip(conf, correct)]
    assert res["acc"] == pytest.approx(0.4)
    assert res["ece_greedy_word"] == pytest.approx(0.416, abs=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(-sum(math.log(p) for p in p_gold) / 5), rel=1e-4)
    assert res["n"] == 5
    # per-example outputs re-score to the same numbers
    assert [r["is_greedy"] for r in rows] == [bool(c) for c in correct]
    assert [r["greedy_confidence"] for r in rows] == pytest.approx(conf, abs=1e-5)


def test_loglikelihood_greedy_and_confidence(tok):
    # two-token continuation: confidence = product of the top-1 probabilities along the target
    model = bigram_from_probs(tok, {"A": {"Ġx": 0.9}, "Ġx": {"y": 0.5, "z": 0.25}})
    ctx = tok.encode("A", add_special_tokens=False)
    good = tok.encode(" xy", add_special_tokens=False)
    bad = tok.encode(" xz", add_special_tokens=False)
    (ll1, g1, c1), (ll2, g2, c2) = E.loglikelihood(model, [(ctx, good), (ctx, bad)], progress=False)
    assert (g1, g2) == (True, False)
    assert ll1 == pytest.approx(math.log(0.9 * 0.5), abs=1e-5)
    assert ll2 == pytest.approx(math.log(0.9 * 0.25), abs=1e-5)
    assert c1 == pytest.approx(math.log(0.45), abs=1e-5) and c2 == pytest.approx(c1, abs=1e-6)


def test_loglikelihood_matches_dense_reference(tok):
    model = tiny_llama(tok)
    g = torch.Generator().manual_seed(1)
    reqs = []
    for n_ctx, n_cont in [(5, 3), (1, 1), (12, 4), (7, 1), (3, 6)]:
        ids = torch.randint(0, len(tok), (n_ctx + n_cont,), generator=g).tolist()
        reqs.append((ids[:n_ctx], ids[n_ctx:]))
    fast = E.loglikelihood(model, reqs, batch_size=2, progress=False)
    for (ctx, cont), (ll, greedy, lc) in zip(reqs, fast):
        with torch.no_grad():
            lp = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)  # (T, V)
        rows = lp[len(ctx) - 1:len(ctx) + len(cont) - 1]
        assert ll == pytest.approx(float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum()), abs=1e-4)
        assert lc == pytest.approx(float(rows.max(-1).values.sum()), abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = E.encode_pair(tok, "Answer: ", "x")
    assert ctx == tok.encode("Answer:", add_special_tokens=False)
    assert cont == [tid(tok, "Ġx")]
    assert E.encode_pair(tok, "", "ab")[0] == [tok.eos_token_id]


# -----------------------------------------------------------------------------
# multiple choice on fixture files

def test_hellaswag_preprocessing():
    ex = E.hellaswag_example(HELLASWAG[0])
    assert ex["context"] == "Baking: A man. mixes flour. Then he"
    assert ex["gold"] == 1
    doc = dict(HELLASWAG[1], endings=["Step [substeps] one  here.", "b", "c", "d"])
    assert E.hellaswag_example(doc)["choices"][0] == "Step one here."
    with pytest.raises(UserError, match="label"):
        E.hellaswag_example(dict(HELLASWAG[0], label=""))


def test_multiple_choice_acc_vs_acc_norm(tok, data_dir, tmp_path):
    model = unigram(tok, {"a": 5.0, "Ġa": 5.0})  # 'a' likely, everything else equally unlikely
    out = tmp_path / "out"
    res = E.evaluate(model, tok, ["hellaswag", "piqa", "arc_easy"], split="test", data_dir=data_dir,
                     out_dir=str(out), progress=False)
    # HellaSwag doc 0: acc picks the short ' b', acc_norm the per-character better ' aaaaaaaa' (gold)
    assert res["hellaswag"]["acc"] == pytest.approx(0.5)
    assert res["hellaswag"]["acc_norm"] == pytest.approx(1.0)
    assert res["piqa"]["acc"] == pytest.approx(0.5) and res["piqa"]["acc_norm"] == pytest.approx(0.5)
    assert res["arc_easy"]["acc"] == pytest.approx(0.5) and res["arc_easy"]["n"] == 2
    # per-example outputs: choice log-likelihoods that re-score to the reported acc / acc_norm
    rows = [json.loads(x) for x in open(out / "eval_examples" / "hellaswag.jsonl")]
    assert len(rows) == 2 and len(rows[0]["choice_loglikelihoods"]) == 4
    assert rows[0]["pred"] == 0 and rows[0]["pred_norm"] == 1 == rows[0]["gold"]
    # gold wins when it is the 'a' choice: flipping the model flips every answer
    flipped = unigram(tok, {"b": 5.0, "Ġb": 5.0})
    piqa, _ = E.score_multiple_choice(flipped, tok, [E.piqa_example(d) for d in PIQA], progress=False)
    assert piqa["acc"] == pytest.approx(0.5)
    arc, _ = E.score_multiple_choice(flipped, tok, [E.arc_example(ARC[0])], progress=False)
    assert arc["acc"] == 0.0


def test_choice_ece_is_the_softmax_over_choices(tok):
    # PIQA doc 0 (gold 'aaa') and doc 1 (gold 'bbb') under a model that prefers 'a': confidence =
    # softmax of the two choice log-likelihoods, correct = acc; one right, one wrong, same confidence
    model = unigram(tok, {"a": 2.0, "Ġa": 2.0})
    res, rows = E.score_multiple_choice(model, tok, [E.piqa_example(d) for d in PIQA], progress=False)
    conf = [torch.tensor(r["choice_loglikelihoods"], dtype=torch.float64).softmax(0).max().item() for r in rows]
    assert conf[0] == pytest.approx(conf[1]) and 0.5 < conf[0] < 1.0
    assert res["ece_choice_softmax"] == pytest.approx(abs(conf[0] - 0.5), abs=1e-9)  # one bin: |0.5 - conf|
    assert report.choice_ece_average({"arc_easy": {"ece_choice_softmax": 0.1}, "piqa": {"ece_choice_softmax": 0.2},
                                 "hellaswag": {"ece_choice_softmax": 0.3}}) == pytest.approx(0.2)
    assert report.choice_ece_average({"piqa": {"ece_choice_softmax": 0.2}}) is None


# -----------------------------------------------------------------------------
# splits: validation selects, test reports, never the same rows; LAMBADA and IFEval in full

def test_splits_are_explicit_and_disjoint(data_dir):
    # test = the split the harness reports (HellaSwag/PIQA: hub validation); validation = hub train
    assert len(E.load_docs("hellaswag", "test", data_dir)) == 2
    assert E.load_docs("hellaswag", "validation", data_dir) == HELLASWAG[:1]
    assert len(E.load_docs("arc_easy", "validation", data_dir)) == 1 and len(E.load_docs("arc_easy", "test",
                                                                                          data_dir)) == 2
    # GSM8K validation = train minus the shot pool, so a shot is never a scored example
    val = E.load_docs("gsm8k", "validation", data_dir)
    assert val == GSM8K_TRAIN[E.GSM8K_SHOT_POOL:]
    # LAMBADA in full: all 5 rows, not a subset
    assert len(E.load_docs("lambada", "test", data_dir)) == 5
    assert len(E.load_docs("lambada", "test", data_dir, limit=2)) == 2
    with pytest.raises(UserError, match="--split validation: lambada has no validation split"):
        E.load_docs("lambada", "validation", data_dir)
    with pytest.raises(UserError, match="unknown task"):
        E.load_docs("mmlu", "test", data_dir)
    with pytest.raises(UserError, match="piqa"):
        E.load_docs("piqa", "test", os.path.join(data_dir, "nowhere"))


# -----------------------------------------------------------------------------
# GSM8K: the harness's two filters and its exact-match normalisation

@pytest.mark.parametrize("generation,strict,strict_ok,flexible,flexible_ok", [
    ("so 9 * 2 = 18\n#### 18", "18", True, "18", True),
    ("#### 18\n#### 5", "18", True, "5", False),                 # strict: the first '#### N'
    ("#### 18 cookies, that is 2 per child", "18", True, "2", False),  # flexible: the last number
    ("The answer is $18.00.", "[invalid]", False, "$18.00.", False),  # '18.00' is not '18' to the harness
    ("She pays $18.", "[invalid]", False, "$18.", True),           # '$' and one final '.' are ignored
    ("#### 1,8", "1,8", True, "1,8", True),                       # ',' is dropped on both sides
    ("no digits at all", "[invalid]", False, "[invalid]", False),
])
def test_gsm8k_strict_and_flexible_as_the_harness(generation, strict, strict_ok, flexible, flexible_ok):
    reference = "9 * 2 = <<9*2=18>>18\n#### 18"
    assert E.strict_match(generation) == strict
    assert E.flexible_extract(generation) == flexible
    assert E.gsm8k_correct(strict, reference) is strict_ok
    assert E.gsm8k_correct(flexible, reference) is flexible_ok
    assert E.gsm8k_correct("1,000", "#### 1,000") and E.gsm8k_correct("-7", "so -7\n#### -7")


def test_gsm8k_fewshot_prompt_is_the_harness_format():
    shots = [{"question": "A?", "answer": "1\n#### 1"}, {"question": "B?", "answer": "#### 2"}]
    assert E.gsm8k_prompt("C?", shots) == "Question: A?\nAnswer: 1\n#### 1\n\nQuestion: B?\nAnswer: #### 2\n\n" \
                                          "Question: C?\nAnswer:"
    assert E.gsm8k_prompt("C?", []) == "Question: C?\nAnswer:"


def test_gsm8k_forced_generation(tok, data_dir, tmp_path):
    # after 'Answer:' the model says ' #### 42.' and stops: right for the first problem, wrong for the second
    model = bigram_from_probs(tok, {":": {"Ġ": 0.9}, "Ġ": {"#": 0.9}, "#": {"4": 0.6}, "4": {"2": 0.9},
                                    "2": {".": 0.9}, ".": {"<eos>": 0.9}})
    assert E.generate_greedy(model, tok, ["Answer:"], 10, progress=False) == [" #42."]
    assert E.generate_greedy(model, tok, ["Answer:"], 10, stop=("2",), progress=False) == [" #4"]
    res = E.evaluate(model, tok, ["gsm8k"], "test", data_dir, max_new_tokens=10, gsm8k_shots=0,
                     out_dir=str(tmp_path), progress=False)["gsm8k"]
    # ' #42.' has no '#### ': strict is invalid; flexible takes '42.' -> right for the first problem
    assert (res["strict_match"], res["flexible_extract"], res["shots"], res["n"]) == (0.0, 0.5, 0, 2)
    rows = [json.loads(x) for x in open(tmp_path / "eval_examples" / "gsm8k.jsonl")]
    assert [r["flexible_correct"] for r in rows] == [True, False] and rows[0]["generation"] == " #42."
    with pytest.raises(UserError, match="--gsm8k-shots"):
        E.evaluate(model, tok, ["gsm8k"], "test", data_dir, gsm8k_shots=E.GSM8K_SHOT_POOL + 1, progress=False)


def test_gsm8k_shots_come_from_train(tok, data_dir, monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, *a, **kw):
        seen["prompts"] = prompts
        return ["#### 42"] * len(prompts)
    monkeypatch.setattr(E, "generate_greedy", fake_generate)
    res = E.evaluate(None, tok, ["gsm8k"], "test", data_dir, progress=False)["gsm8k"]  # default: 5 shots
    assert res["shots"] == 5 and res["strict_match"] == 0.5
    assert seen["prompts"][0].count("Question:") == 6 and seen["prompts"][0].startswith("Question: Shot 0?")


# -----------------------------------------------------------------------------
# generation: raw prompts, chat template only when asked (no thinking), every end token

def test_prompts_are_raw_unless_asked(tok):
    t = byte_tokenizer()
    t.chat_template = ("{% for m in messages %}<u>{{ m.content }}</u>{% endfor %}"
                       "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}")
    assert E.format_prompt(t, "hi") == "hi"  # raw unless --chat-template, template or not
    assert E.format_prompt(t, "hi", chat_template=True) == "<u>hi</u><nothink>"
    with pytest.raises(UserError, match="--chat-template"):
        E.format_prompt(tok, "hi", chat_template=True)


def test_generation_stops_on_every_end_token_of_the_generation_config(tok):
    model = bigram_from_probs(tok, {":": {"Ġ": 0.9}, "Ġ": {"4": 0.9}, "4": {"2": 0.9}, "2": {".": 0.9},
                                    ".": {"<eos>": 0.9}})
    model.generation_config = types.SimpleNamespace(eos_token_id=[tok.eos_token_id, tid(tok, "2")])
    assert E.end_token_ids(model, tok) == sorted({tok.eos_token_id, tid(tok, "2")})
    assert E.generate_greedy(model, tok, ["Answer:"], 10, progress=False) == [" 4"]  # old: ' 42.'


def test_generate_fast_path_matches_reference_loop(tok):
    model = tiny_llama(tok, seed=3)
    model.generation_config.eos_token_id = [tok.eos_token_id, 5]
    prompts = ["Question: hi\nAnswer:", "a", "a much longer prompt than the others"]
    fast = E.generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3, use_generate=True,
                             progress=False)
    ref = E.generate_greedy(model, tok, prompts, max_new_tokens=6, use_generate=False, progress=False)
    assert fast == ref
    assert any(len(x) > 0 for x in ref)


# -----------------------------------------------------------------------------
# IFEval wiring (scoring itself is ifeval.py's, tested there): a fake ifeval module

def fake_ifeval(calls):
    m = types.ModuleType("ifeval")
    m.load_inputs = lambda p: [json.loads(x) for x in open(p)]
    m.load_responses = lambda p: {r["prompt"]: r["response"] for r in map(json.loads, open(p))}

    def score(inputs, responses):
        rows = [{"prompt": i["prompt"], "instruction_id_list": i["instruction_id_list"],
                 "follow_instruction_list": [responses.get(i["prompt"]) == " 42."],
                 "follow_all_instructions": responses.get(i["prompt"]) == " 42."} for i in inputs]
        calls["scored"] = [i["prompt"] for i in inputs]
        return rows, rows, {"inst_level_strict_acc": 0.5, "inst_level_loose_acc": 0.5}

    m.score_responses = score
    m.write_results = lambda d, s, l: calls.setdefault("written", d)
    return m


def test_ifeval_scores_every_prompt_with_the_harness_length(tok, tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "ifeval", fake_ifeval(calls))
    inp = tmp_path / "input_data.jsonl"
    write_jsonl(str(inp), [{"key": i, "prompt": f"P{i}:", "instruction_id_list": ["x"], "kwargs": [{}]}
                           for i in range(4)])
    model = bigram_from_probs(tok, {":": {"Ġ": 0.9}, "Ġ": {"4": 0.9}, "4": {"2": 0.9}, "2": {".": 0.9}})
    real_generate = E.generate_greedy

    def spy(model, tokenizer, prompts, max_new_tokens, *a, **kw):
        calls["max_new_tokens"], calls["prompts"] = max_new_tokens, prompts
        return real_generate(model, tokenizer, prompts, 8, *a, **kw)
    monkeypatch.setattr(E, "generate_greedy", spy)
    res = E.evaluate(model, tok, ["ifeval"], split="test", ifeval_inputs=str(inp), out_dir=str(tmp_path / "o"),
                     progress=False)["ifeval"]
    assert calls["scored"] == ["P0:", "P1:", "P2:", "P3:"]  # all prompts, not a subset
    assert calls["max_new_tokens"] == 1280 and calls["prompts"][0] == "P0:"  # raw prompt
    assert res["prompt_strict"] == 1.0 and res["n"] == 4
    assert calls["written"] == str(tmp_path / "o" / "ifeval")
    resp = [json.loads(x) for x in open(tmp_path / "o" / "ifeval" / "ifeval_responses.jsonl")]
    assert resp[1] == {"prompt": "P1:", "response": " 42."} and len(resp) == 4
    with pytest.raises(UserError, match="ifeval has no validation split"):
        E.evaluate(model, tok, ["ifeval"], split="validation", ifeval_inputs=str(inp), progress=False)


def test_ifeval_responses_cli(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "ifeval", fake_ifeval(calls))
    inp, resp = tmp_path / "in.jsonl", tmp_path / "resp.jsonl"
    write_jsonl(str(inp), [{"key": i, "prompt": f"P{i}", "instruction_id_list": ["x"], "kwargs": [{}]}
                           for i in range(3)])
    write_jsonl(str(resp), [{"prompt": "P0", "response": " 42."}, {"prompt": "P1", "response": "no"},
                            {"prompt": "P2", "response": " 42."}])
    res = E.main(["--ifeval-responses", str(resp), "--ifeval-inputs", str(inp), "--out", str(tmp_path / "o")])
    assert res["prompt_strict"] == pytest.approx(2 / 3) and res["prompt_loose"] == pytest.approx(2 / 3)
    assert calls["written"] == str(tmp_path / "o")


# -----------------------------------------------------------------------------
# held-out LM metrics through a mocked data.load_splits

class FakePacked:
    def __init__(self, g, n=3, T=10, V=50):
        self.input_ids = torch.randint(0, V, (n, T), generator=g)
        self.targets = torch.randint(0, V, (n, T), generator=g)
        self.valid = torch.rand(n, T, generator=g) > 0.2

    def __len__(self):
        return len(self.input_ids)

    def batches(self, bs):
        for i in range(0, len(self), bs):
            yield self.input_ids[i:i + bs], self.targets[i:i + bs], self.valid[i:i + bs]


def test_score_lm_loads_only_the_heldout_split(tok, monkeypatch):
    g = torch.Generator().manual_seed(0)
    packed = {"val": FakePacked(g), "test": FakePacked(g)}
    seen = []

    def load_splits(tokenizer, splits=("train", "val", "test"), **kw):
        seen.append(dict(kw, splits=tuple(splits), tokenizer=tokenizer))
        return {s: packed[s] for s in splits}  # a KeyError if the training split were asked for

    monkeypatch.setitem(sys.modules, "data", types.SimpleNamespace(load_splits=load_splits))
    student, teacher = tiny_llama(tok, 0), tiny_llama(tok, 1)
    val = E.score_lm(student, tok, "validation", teacher, batch_size=2, progress=False, data="corpus", seq_len=10)
    test = E.score_lm(student, tok, "test", teacher, batch_size=2, progress=False, data="corpus", seq_len=10)
    assert [s["splits"] for s in seen] == [("val",), ("test",)]  # the training budget is never tokenized
    assert seen[0]["data"] == "corpus" and seen[0]["seq_len"] == 10 and seen[0]["tokenizer"] is tok
    ref = heldout.heldout_metrics(student, packed["val"].batches(2), teacher=teacher, vocab_size=len(tok))
    assert val["loss"] == pytest.approx(ref["loss"]) and val["kl_to_teacher"] == pytest.approx(ref["kl_to_teacher"])
    assert test["loss"] != pytest.approx(val["loss"])


def test_score_lm_on_a_gsm8k_run_uses_its_masked_answers(tmp_path):
    import sys as _sys
    _sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
    from conftest import make_model, make_tokenizer
    tok = make_tokenizer()
    model = make_model(tok, layers=1)
    p = tmp_path / "gsm.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{2 * i}\n#### {2 * i}"})
                           for i in range(80)))
    out = E.score_lm(model, tok, "test", None, 4, False, task="gsm8k", task_data=str(p), seq_len=64, seed=0)
    assert out["tokens"] > 0 and out["loss"] > 0
    import data
    test = data.pack_gsm8k(data.load_gsm8k_rows(str(p)), tok, 64, None, 0)["test"]
    assert out["tokens"] == int(test.valid.sum())  # only answer tokens are scored


# -----------------------------------------------------------------------------
# the CLI on a run dir with a tiny saved model

def test_cli_run_dir_writes_eval_json(tok, data_dir, tmp_path):
    run = tmp_path / "run"
    tiny_llama(tok).save_pretrained(str(run / "model"))
    tok.save_pretrained(str(run / "model"))
    (run / "config.json").write_text(json.dumps({"run_name": "x", "seed": 0}))
    res = E.main([str(run), "--tasks", "hellaswag,piqa,arc_easy,lambada,gsm8k", "--data-dir", data_dir,
                  "--max-new-tokens", "3", "--gsm8k-shots", "1", "--batch-size", "2", "--no-progress"])
    saved = json.load(open(run / "eval.json"))
    assert set(saved) == {"hellaswag", "piqa", "arc_easy", "lambada", "gsm8k"}
    assert saved["lambada"]["n"] == 5 and saved["lambada"]["ppl"] > 1.0 and saved["gsm8k"]["shots"] == 1
    assert 0.0 <= report.paper_average(saved) <= 1.0
    assert saved == json.loads(json.dumps(res))
    assert sorted(os.listdir(run / "eval_examples")) == sorted(f"{t}.jsonl" for t in saved)
    # the paper suite on the selection split skips the tasks that have none, and writes its own file
    E.main([str(run), "--tasks", "piqa", "--data-dir", data_dir, "--split", "validation", "--no-progress"])
    assert json.load(open(run / "eval_validation.json"))["piqa"]["n"] == 1
    assert set(json.load(open(run / "eval.json"))) == set(saved)  # untouched by the validation run


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    import subprocess
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(E.__file__), "eval.py"), "--ifeval-responses",
                          str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "eval.py: error: --ifeval-responses needs --out DIR"


def test_compare_and_plot_are_handed_to_report(tmp_path, monkeypatch):
    import report
    seen = {}
    monkeypatch.setattr(report, "main", lambda argv: seen.setdefault("argv", argv))
    argv = ["--compare", "a", "b", "--compare-baseline", "full_kd"]
    assert E.main(argv) == argv and seen["argv"] == argv
    seen.clear()
    assert E.main(["out/run", "--plot=x.png", "--plot-kind", "entropy"])[1] == "--plot=x.png"


def test_lm_eval_parity_on_fixture_requests(tok):
    """Our loglikelihood against lm-evaluation-harness's HFLM on the same requests. requirements-test.txt
    installs the harness, so the suite runs it; a bare `pip install -r requirements.txt` machine skips it."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    model = tiny_llama(tok, seed=4)
    pairs = [("Question: a\nAnswer:", " bb"), ("story number 3 ends with", " word3"), ("x", " y z")]
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    theirs = harness.loglikelihood(requests)
    ours = E.loglikelihood(model, [E.encode_pair(tok, c, x) for c, x in pairs], progress=False)
    for (ll, greedy), (our_ll, our_greedy, _) in zip(theirs, ours):
        assert our_ll == pytest.approx(ll, abs=1e-4) and our_greedy == greedy
