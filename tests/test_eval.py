"""Tests for eval.py: benchmark scorers on fixture files in the hub's schema, with fake models whose
logits force the answer, tiny random Llama models for fast-path-vs-reference checks, the compare table
and the figures from fake run dirs. No network, no ../shared."""
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
import models  # noqa: E402

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


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    write_jsonl(str(d / "hellaswag" / "validation.jsonl"), HELLASWAG)
    write_jsonl(str(d / "piqa" / "validation.jsonl"), PIQA)
    write_jsonl(str(d / "arc_easy" / "test.jsonl"), ARC)
    write_jsonl(str(d / "arc_easy" / "validation.jsonl"), ARC[:1])
    write_jsonl(str(d / "lambada" / "test.jsonl"), [{"text": f"story number {i} ends with word{i}"} for i in range(5)])
    write_jsonl(str(d / "gsm8k" / "test.jsonl"),
                [{"question": "How many?", "answer": "2 + 40 = <<2+40=42>>42\n#### 42"},
                 {"question": "And now?", "answer": "#### 7"}])
    return str(d)


# -----------------------------------------------------------------------------
# ECE and LAMBADA

def test_ece_hand_example():
    # one example per bin: (0.05 + 0.9 + 0.38 + 0.55 + 0.2) / 5
    ece = models.expected_calibration_error([0.95, 0.9, 0.62, 0.55, 0.2], [1, 0, 1, 0, 0], n_bins=15)
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
    res = E.score_lambada(model, tok, examples, batch_size=2, progress=False)
    p_gold = [p if ok else (1 - p) / (V - 1) for p, ok in zip(conf, correct)]
    assert res["acc"] == pytest.approx(0.4)
    assert res["ece"] == pytest.approx(0.416, abs=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(-sum(math.log(p) for p in p_gold) / 5), rel=1e-4)
    assert res["n"] == 5


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
    with pytest.raises(ValueError, match="label"):
        E.hellaswag_example(dict(HELLASWAG[0], label=""))


def test_multiple_choice_acc_vs_acc_norm(tok, data_dir):
    model = unigram(tok, {"a": 5.0, "Ġa": 5.0})  # 'a' likely, everything else equally unlikely
    res = E.evaluate(model, tok, ["hellaswag", "piqa", "arc_easy"], split="full", data_dir=data_dir,
                     progress=False)
    # HellaSwag doc 0: acc picks the short ' b', acc_norm the per-character better ' aaaaaaaa' (gold)
    assert res["hellaswag"]["acc"] == pytest.approx(0.5)
    assert res["hellaswag"]["acc_norm"] == pytest.approx(1.0)
    assert res["piqa"]["acc"] == pytest.approx(0.5) and res["piqa"]["acc_norm"] == pytest.approx(0.5)
    assert res["arc_easy"]["acc"] == pytest.approx(0.5) and res["arc_easy"]["n"] == 2
    # gold wins when it is the 'a' choice: flipping the model flips every answer
    flipped = unigram(tok, {"b": 5.0, "Ġb": 5.0})
    piqa = E.score_multiple_choice(flipped, tok, [E.piqa_example(d) for d in PIQA], progress=False)
    assert piqa["acc"] == pytest.approx(0.5)
    arc = E.score_multiple_choice(flipped, tok, [E.arc_example(ARC[0])], progress=False)
    assert arc["acc"] == 0.0


def test_splits_are_disjoint(data_dir):
    val = E.load_docs("lambada", "validation", data_dir)
    test = E.load_docs("lambada", "test", data_dir)
    full = E.load_docs("lambada", "full", data_dir)
    assert [d["text"][-5:] for d in val] == ["word0", "word2", "word4"]
    assert [d["text"][-5:] for d in test] == ["word1", "word3"]
    assert sorted(d["text"] for d in val + test) == sorted(d["text"] for d in full)
    assert len(E.load_docs("lambada", "full", data_dir, limit=2)) == 2
    assert len(E.load_docs("arc_easy", "validation", data_dir)) == 1  # ARC has its own validation file
    with pytest.raises(ValueError, match="unknown task"):
        E.load_docs("mmlu", "test", data_dir)
    with pytest.raises(FileNotFoundError, match="piqa"):
        E.load_docs("piqa", "full", os.path.join(data_dir, "nowhere"))


# -----------------------------------------------------------------------------
# GSM8K

@pytest.mark.parametrize("text,want", [
    ("The answer is $1,234.", "1234"), ("#### 72", "72"), ("It costs -5 dollars", "-5"),
    ("so she owes −7.", "-7"), ("$-3.50", "-3.5"), ("-$3", "-3"), ("10-5 = 5", "5"), ("18.00", "18"),
    ("0.50 of it", "0.5"), ("no digits", None), ("#### 1,000\n\nQuestion: 5 apples", "1000"),
    ("She has 42.", "42"), ("100.00", "100"), ("The total is 3 + 4 = 7.\nSo 7 cookies.", "7"),
])
def test_extract_number(text, want):
    assert E.extract_number(text) == want


def test_gsm8k_forced_generation(tok, data_dir):
    # after 'Answer:' the model says ' 42.' and stops: right for the first problem, wrong for the second
    model = bigram_from_probs(tok, {":": {"Ġ": 0.9}, "Ġ": {"4": 0.9}, "4": {"2": 0.9}, "2": {".": 0.9},
                                    ".": {"<eos>": 0.9}})
    examples = [E.gsm8k_example(d) for d in E.load_docs("gsm8k", "full", data_dir)]
    assert [ex["gold"] for ex in examples] == ["42", "7"]
    assert E.generate_greedy(model, tok, ["Answer:"], 10, progress=False) == [" 42."]
    assert E.generate_greedy(model, tok, ["Answer:"], 10, stop=("2",), progress=False) == [" 4"]
    res = E.score_gsm8k(model, tok, examples, max_new_tokens=10, progress=False)
    assert res == {"acc": 0.5, "n": 2}


def test_generate_fast_path_matches_reference_loop(tok):
    model = tiny_llama(tok, seed=3)
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


def test_ifeval_generation_scores_the_split(tok, tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "ifeval", fake_ifeval(calls))
    inp = tmp_path / "input_data.jsonl"
    write_jsonl(str(inp), [{"key": i, "prompt": f"P{i}:", "instruction_id_list": ["x"], "kwargs": [{}]}
                           for i in range(4)])
    model = bigram_from_probs(tok, {":": {"Ġ": 0.9}, "Ġ": {"4": 0.9}, "4": {"2": 0.9}, "2": {".": 0.9}})
    res = E.evaluate(model, tok, ["ifeval"], split="test", ifeval_inputs=str(inp), out_dir=str(tmp_path / "o"),
                     max_new_tokens=8, progress=False)["ifeval"]
    assert calls["scored"] == ["P1:", "P3:"]  # test = odd rows
    assert res["prompt_strict"] == 1.0 and res["n"] == 2
    assert calls["written"] == str(tmp_path / "o" / "ifeval")  # per-split folder under --out
    resp = [json.loads(x) for x in open(tmp_path / "o" / "ifeval" / "ifeval_responses.jsonl")]
    assert resp == [{"prompt": "P1:", "response": " 42."}, {"prompt": "P3:", "response": " 42."}]


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


def test_score_lm_uses_the_right_split(tok, monkeypatch):
    g = torch.Generator().manual_seed(0)
    splits = {"train": None, "val": FakePacked(g), "test": FakePacked(g)}
    seen = {}

    def load_splits(tokenizer, **kw):
        seen.update(kw, tokenizer=tokenizer)
        return splits

    monkeypatch.setitem(sys.modules, "data", types.SimpleNamespace(load_splits=load_splits))
    student, teacher = tiny_llama(tok, 0), tiny_llama(tok, 1)
    val = E.score_lm(student, tok, "validation", teacher, batch_size=2, progress=False, data="corpus", seq_len=10)
    test = E.score_lm(student, tok, "test", teacher, batch_size=2, progress=False, data="corpus", seq_len=10)
    assert seen["data"] == "corpus" and seen["seq_len"] == 10 and seen["tokenizer"] is tok
    ref = models.heldout_metrics(student, splits["val"].batches(2), teacher=teacher, vocab_size=len(tok))
    assert val["loss"] == pytest.approx(ref["loss"]) and val["kl_to_teacher"] == pytest.approx(ref["kl_to_teacher"])
    assert test["loss"] != pytest.approx(val["loss"])


# -----------------------------------------------------------------------------
# the CLI on a run dir with a tiny saved model

def test_cli_run_dir_writes_eval_json(tok, data_dir, tmp_path):
    run = tmp_path / "run"
    tiny_llama(tok).save_pretrained(str(run / "model"))
    tok.save_pretrained(str(run / "model"))
    (run / "config.json").write_text(json.dumps({"run_name": "x", "seed": 0}))
    res = E.main([str(run), "--tasks", "hellaswag,piqa,arc_easy,lambada,gsm8k", "--data-dir", data_dir,
                  "--split", "full", "--max-new-tokens", "3", "--batch-size", "2", "--no-progress"])
    saved = json.load(open(run / "eval_full.json"))
    assert set(saved) == {"hellaswag", "piqa", "arc_easy", "lambada", "gsm8k"}
    assert saved["lambada"]["n"] == 5 and saved["lambada"]["ppl"] > 1.0
    assert 0.0 <= E.paper_average(saved) <= 1.0
    assert saved == json.loads(json.dumps(res))
    E.main([str(run), "--tasks", "piqa", "--data-dir", data_dir, "--split", "validation", "--no-progress"])
    assert json.load(open(run / "eval_validation.json"))["piqa"]["n"] == 1  # even rows of 2
    assert not (run / "eval.json").exists()  # --split test (the reported tables) is a separate file
    assert set(json.load(open(run / "eval_full.json"))) == set(saved)  # untouched by the validation run


# -----------------------------------------------------------------------------
# compare table and figures from fake run dirs

def fake_run(root, name, run_name, seed, loss, cfg=None, ev=None):
    d = root / name
    d.mkdir(parents=True)
    config = dict({"run_name": run_name, "seed": seed, "k": 1.0, "l": 1.0, "policy": "top_k",
                   "pos_metric": "student_entropy", "sample_metric": "none"}, **(cfg or {}))
    summary = {"wall_time_s": 100.0 + seed, "sup_frac_positions": config["k"], "sup_frac_samples": config["l"],
               "peak_mem_bytes": {"student": 2 * 2 ** 30, "teacher": 4 * 2 ** 30},
               "student_after": {"loss": loss, "ppl": math.exp(loss), "kl_to_teacher": 0.5, "top1_agree": 0.6,
                                 "ece": 0.05}}
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps(summary))
    if ev is not None:
        (d / "eval.json").write_text(json.dumps(ev))
    return str(d)


EVAL = {"hellaswag": {"acc": 0.3, "acc_norm": 0.4}, "piqa": {"acc": 0.6, "acc_norm": 0.6},
        "arc_easy": {"acc": 0.5, "acc_norm": 0.45}, "lambada": {"acc": 0.35, "ppl": 20.0, "ece": 0.1},
        "gsm8k": {"acc": 0.1}, "ifeval": {"prompt_strict": 0.2, "prompt_loose": 0.25}}


def test_compare_table(tmp_path, capsys):
    runs = [fake_run(tmp_path, "a0", "se-k0.25", 0, 2.0, {"k": 0.25}, EVAL),
            fake_run(tmp_path, "a1", "se-k0.25", 1, 2.2, {"k": 0.25}),
            fake_run(tmp_path, "full", "full-kd", 0, 1.9)]
    out = tmp_path / "t" / "table.md"
    table = E.main(["--compare", *runs, "--compare-out", str(out)])
    assert out.read_text() == table and table in capsys.readouterr().out
    lines = table.strip().split("\n")
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    se = dict(zip(head, (c.strip() for c in lines[2].strip("|").split("|"))))
    full = dict(zip(head, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert se["run"] == "se-k0.25" and se["n"] == "2"
    assert se["loss"] == f"2.1000 ± {math.sqrt(0.02):.4f}"  # sample std of (2.0, 2.2)
    assert se["Acc"] == f"{(0.4 + 0.6 + 0.45 + 0.35 + 0.1) / 5:.4f} ± 0.0000"  # only seed 0 has eval.json
    assert se["IFEval S"] == "0.2000 ± 0.0000" and se["mem T (GiB)"] == "4.00 ± 0.00"
    assert se["wall (s)"] == "100.5 ± 0.7"
    assert full["n"] == "1" and full["loss"] == "1.9000 ± 0.0000" and full["Acc"] == "-"


def test_plot_budget(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [fake_run(tmp_path, "full0", "full", 0, 1.9), fake_run(tmp_path, "full1", "full", 1, 1.9),
            fake_run(tmp_path, "k25s0", "se25", 0, 2.0, {"k": 0.25}),
            fake_run(tmp_path, "k25s1", "se25", 1, 2.2, {"k": 0.25}),
            fake_run(tmp_path, "k50", "se50", 0, 1.95, {"k": 0.5}),
            fake_run(tmp_path, "rnd", "rnd", 0, 2.5, {"k": 0.25, "policy": "random"}),
            fake_run(tmp_path, "l50", "sl50", 0, 2.05, {"k": 0.25, "l": 0.5, "sample_metric": "student_entropy"}),
            fake_run(tmp_path, "l25", "sl25", 0, 2.3, {"k": 0.25, "l": 0.25, "sample_metric": "student_entropy"})]
    path = tmp_path / "figs" / "budget.png"
    d = E.main(["--plot", str(path), "--plot-kind", "budget", *runs])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert d["metric"] == "loss"  # no eval.json anywhere
    k = d["axes"]["k"]
    (x1, m1, s1, n1), (x2, m2, s2, n2) = k["series"]["student_entropy / top_k"]
    assert (x1, n1, x2, n2) == (0.25, 2, 0.5, 1)
    assert m1 == pytest.approx(2.1) and s1 == pytest.approx(math.sqrt(0.02)) and m2 == pytest.approx(1.95)
    assert k["full"] == (pytest.approx(1.9), 0.0) and k["random"] == [(0.25, 2.5, 0.0, 1)]
    assert [p[:2] for p in d["axes"]["l"]["series"]["student_entropy"]] == [(0.25, 2.3), (0.5, 2.05)]


def test_plot_entropy_tokens(tmp_path):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    tokens = [["The", " cat", " sat", " on", "\n", " $5", " mat", "."][i % 8] for i in range(40)]
    H = torch.rand(40, generator=g) * 3
    sel = torch.arange(40) % 3 == 0
    path = tmp_path / "tokens.png"
    info = E.plot_entropy_tokens(tokens, H, sel, str(path), title="demo", width=30)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert info["outlined"] == int(sel.sum()) and info["lines"] > 1
    with pytest.raises(ValueError, match="length"):
        E.plot_entropy_tokens(tokens, H[:5], sel, str(path))


def test_token_entropy_matches_dense(tok):
    model = tiny_llama(tok)
    ids = torch.randint(0, len(tok), (17,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lp = model(ids[None]).logits[0].float().log_softmax(-1)
    dense = -(lp.exp() * lp).sum(-1)
    assert torch.allclose(E.token_entropy(model, ids, chunk_size=5), dense, atol=1e-5)


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match="--plot needs matplotlib: pip install matplotlib"):
        E.plot_entropy_tokens(["a"], [0.5], [True], str(tmp_path / "x.png"))


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


def test_compare_adds_reference_rows_and_drops_empty_columns(tmp_path):
    def with_refs(d, seed, before_loss, teacher_loss):
        p = os.path.join(d, "summary.json")
        s = json.load(open(p))
        s["student_before"] = {"loss": before_loss, "ppl": math.exp(before_loss), "kl_to_teacher": 9.0,
                               "top1_agree": 0.01, "ece": 0.3}
        s["teacher"] = {"loss": teacher_loss, "ppl": math.exp(teacher_loss), "ece": 0.02}
        open(p, "w").write(json.dumps(s))
        return d
    runs = [with_refs(fake_run(tmp_path, "a0", "se", 0, 2.0), 0, 11.0, 1.5),
            with_refs(fake_run(tmp_path, "b0", "full", 0, 1.9), 0, 11.0, 1.5),  # same seed: counted once
            with_refs(fake_run(tmp_path, "a1", "se", 1, 2.2), 1, 12.0, 1.7)]
    table = E.compare_runs(runs)
    lines = table.strip().split("\n")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "Acc" not in head and "IFEval S" not in head and "loss" in head  # no run has eval.json
    rows = {r["run"]: r for r in (dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:])}
    assert list(rows) == ["se", "full", "student, no KD (reference)", "teacher (reference)"]
    st, te = rows["student, no KD (reference)"], rows["teacher (reference)"]
    assert st["n"] == "2" and st["loss"] == f"11.5000 ± {math.sqrt(0.5):.4f}" and st["KL"] == "9.0000 ± 0.0000"
    assert te["n"] == "2" and te["loss"] == f"1.6000 ± {math.sqrt(0.02):.4f}" and te["KL"] == "-"
    assert te["wall (s)"] == "-" and rows["se"]["wall (s)"] == "100.5 ± 0.7"
    assert "reference" not in E.compare_runs(runs, refs=False)


def test_compare_baseline_gives_paired_differences(tmp_path):
    runs = [fake_run(tmp_path, "f0", "full", 0, 2.0), fake_run(tmp_path, "f1", "full", 1, 3.0),
            fake_run(tmp_path, "s0", "se", 0, 2.1), fake_run(tmp_path, "s1", "se", 1, 3.3)]
    lines = E.compare_runs(runs, baseline="full").strip().split("\n")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:5] == ["run", "n", "loss", "Δloss vs full", "PPL"] and "ΔKL vs full" in head
    se = dict(zip(head, (c.strip() for c in lines[3].strip("|").split("|"))))
    # per seed: +0.1 and +0.3 -> mean +0.2, sample std 0.1414 (the plain loss std is 0.85)
    assert se["Δloss vs full"] == f"+0.2000 ± {math.sqrt(0.02):.4f}" and se["ΔKL vs full"] == "+0.0000 ± 0.0000"
    with pytest.raises(ValueError, match="not a run name"):
        E.compare_runs(runs, baseline="nope")
