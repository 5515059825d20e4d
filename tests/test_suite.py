"""suite.py: the sandbox's downstream tasks built from synthetic files and a toy pair, and the acceptance code."""
import json
import math
import os
import re

import pytest

import eval as eval_
import report
import sandbox
import suite
import train
from common import UserError

WIN = 160  # tokens = bytes here: the byte encoder makes every count checkable by hand


def encode(text):
    return list(text.encode())


def synthetic_file(n, seed):
    """A Python-like file: classes of methods whose lines share indentation and differ in names."""
    names = ["alpha_value", "beta_count", "gamma_total", "delta_items", "omega_index", "sigma_limit"]
    out = []
    for c in range(n):
        out.append(f"class Thing{seed}_{c}:")
        for m in range(4):
            a, b = names[(c + m + seed) % 6], names[(c + 2 * m + seed + 1) % 6]
            out += [f"    def method_{c}_{m}(self, {a}):",
                    f"        {b} = {a} + {c * 7 + m} * {seed + 1}",
                    f"        result_{m} = self.combine({a}, {b})",
                    f"        return result_{m} - {a}", ""]
    return "\n".join(out) + "\n"


# relpaths chosen so that both parts get files (split_of is a hash of the path)
FILES = [(f"pkg/mod{i}.py", synthetic_file(6, i)) for i in range(12)]


def build(task, split, files=FILES, n=200, per_file=40):
    return suite.build_examples(task, split, files, encode, WIN, n=n, per_file=per_file)


def source(ex):
    rel, pos = ex["id"].rsplit(":", 1)
    return dict(FILES)[rel], int(pos)


def test_split_is_a_hash_of_the_path_and_both_parts_are_used():
    parts = [suite.split_of(rel) for rel, _ in FILES]
    assert parts == [suite.split_of(rel) for rel, _ in FILES]
    assert set(parts) == set(suite.SPLITS)


@pytest.mark.parametrize("task", sorted(suite.TASKS))
def test_examples_are_deterministic_disjoint_and_fit_the_window(task):
    val, test = build(task, "validation"), build(task, "test")
    assert val and test, task
    assert build(task, "validation") == val  # same files, same examples: no seed, no clock
    assert build(task, "validation", files=FILES[::-1]) == val  # nor the order the files come in
    files = {split: {ex["id"].rsplit(":", 1)[0] for ex in exs} for split, exs in (("v", val), ("t", test))}
    assert not files["v"] & files["t"]  # the parts share no file
    assert all(suite.split_of(rel) == "validation" for rel in files["v"])
    for ex in val + test:
        conts = [" " + c for c in ex["choices"]] if "choices" in ex else [ex["target"]]
        assert all(len(encode(ex["context"] + c)) <= WIN for c in conts)  # every position inside the window
        assert len(encode(ex["context"])) >= WIN * suite.MIN_CONTEXT
        text, _ = source(ex)
        start = text.find(ex["context"].rstrip(" "))
        assert start == 0 or text[start - 1] == "\n"  # the context starts a line


def test_per_file_and_total_caps():
    exs = build("last_word", "test", n=30, per_file=4)
    per_file = {}
    for ex in exs:
        per_file[ex["id"].rsplit(":", 1)[0]] = per_file.get(ex["id"].rsplit(":", 1)[0], 0) + 1
    assert len(exs) == 30 or len(exs) == sum(per_file.values())
    assert max(per_file.values()) <= 4 and len(exs) <= 30


def test_next_line_distractors():
    for ex in build("next_line", "test"):
        text, i = source(ex)
        lines = text.split("\n")
        gold = ex["choices"][ex["gold"]]
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip(" "))]
        assert lines[i] == indent + gold  # the gold is the file's next line
        assert ex["context"] + " " + gold == text[text.find(ex["context"]):][:len(ex["context"]) + 1 + len(gold)]
        assert len(ex["choices"]) == suite.CHOICES and len(set(ex["choices"])) == suite.CHOICES
        shown = {ln.strip() for ln in ex["context"].split("\n")}
        for c in ex["choices"]:
            assert sum(ln == indent + c for ln in lines) == 1  # a line of the same file, same indent, unique
            assert abs(len(c) - len(gold)) <= max(4, len(gold) // 4)  # similar length
            assert c == gold or c.strip() not in shown  # no distractor is copied from the context


def test_last_word_and_pick_name_targets_come_from_the_context():
    for ex in build("last_word", "validation"):
        text, pos = source(ex)
        word = ex["target"][1:]
        assert ex["target"][0] == " " and re.fullmatch(r"[A-Za-z_]\w{3,}", word) and word not in suite.COMMON
        assert text[pos:pos + len(word)] == word and text[:pos - 1].endswith(ex["context"])
        assert re.search(rf"\b{word}\b", ex["context"])  # carried over from the context, as in LAMBADA
    for ex in build("pick_name", "validation"):
        text, pos = source(ex)
        gold = ex["choices"][ex["gold"]]
        assert text[pos:pos + len(gold)] == gold and text[:pos - 1].endswith(ex["context"])
        for c in ex["choices"]:  # every choice is a name of the context
            assert re.search(rf"\b{c}\b", ex["context"]) and len(c) >= 4


def test_swap_name_differs_in_one_name():
    exs = build("swap_name", "test")
    golds = [ex["gold"] for ex in exs]
    assert set(golds) == {0, 1}  # the gold's place is hashed, not always first
    for ex in exs:
        gold, other = ex["choices"][ex["gold"]], ex["choices"][1 - ex["gold"]]
        a, b = re.split(r"(\w+)", gold), re.split(r"(\w+)", other)
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diff) == 1 and abs(len(diff[0][0]) - len(diff[0][1])) <= 2
        assert diff[0][1] not in re.findall(r"\w+", gold)


def test_next_indent_offers_the_line_at_three_indentations():
    for ex in build("next_indent", "test"):
        text, i = source(ex)
        line = text.split("\n")[i]
        body = line.lstrip(" ")
        assert " " + ex["choices"][ex["gold"]] == line and ex["context"].endswith("\n")  # the file's own line
        depth = len(line) - len(body)
        assert sorted(" " + c for c in ex["choices"]) == sorted(" " * d + body for d in (depth - 4, depth, depth + 4))


def test_line_order_swaps_two_consecutive_lines():
    for ex in build("line_order", "validation"):
        text, i = source(ex)
        a, b = text.split("\n")[i:i + 2]
        indent = a[:len(a) - len(a.lstrip(" "))]
        assert ex["choices"][ex["gold"]] == a.strip() + "\n" + b  # the file's order
        assert ex["choices"][1 - ex["gold"]] == b.strip() + "\n" + indent + a.strip()


def test_line_end_distractors_are_one_edit_away():
    exs = build("line_end", "test")
    assert len({len(ex["choices"]) for ex in exs}) > 1  # as many choices as endings one edit away
    for ex in exs:
        text, i = source(ex)
        lines = text.split("\n")
        nxt = lines[i + 1]
        after = "\n" + nxt[:len(nxt) - len(nxt.lstrip(" ")) - 1]  # the next line's indentation less one space
        gold = ex["choices"][ex["gold"]]
        assert ex["context"] + " " + gold == text[text.find(ex["context"]):][:len(ex["context"]) + 1 + len(gold)]
        end = re.search(r"[)\]}:,(\[{]+$", lines[i]).group()
        head = lines[i].strip()[:-len(end)]
        for c in ex["choices"]:
            assert c.startswith(head) and c.endswith(after)
            mine = c[len(head):len(c) - len(after)]
            assert mine in suite.ENDINGS and (c == gold or suite._one_edit(mine, end))
        assert len(set(ex["choices"])) == len(ex["choices"]) >= suite.CHOICES


def test_one_edit():
    assert suite._one_edit(")", "):") and suite._one_edit("):", ")") and suite._one_edit(")", "]")
    assert suite._one_edit("))", "])") and not suite._one_edit(")", ")")
    assert not suite._one_edit(")", "]):") and not suite._one_edit("):", "],")


def test_fit_context_takes_the_longest_fitting_lines():
    text = "aaaa\nbbbb\ncccc\ndddd\n"
    starts = suite.line_starts(text)
    end = text.index("dddd")
    assert suite.fit_context(text, starts, end, "xx", encode, 11, 1) == "cccc\n"  # 5 + 2 <= 11 < 10 + 2
    assert suite.fit_context(text, starts, end, "xx", encode, 100, 1) == text[:end]
    assert suite.fit_context(text, starts, end, "xx", encode, 11, 6) is None  # less context than asked


def test_probe_files_refuse_text_a_model_trained_on(tmp_path):
    rel = next(r for r in (f"m{i}.py" for i in range(100)) if sandbox.part_of(r) == "pretrain")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "probe.jsonl").write_text(json.dumps({"id": rel, "text": "x = 1\n"}) + "\n")
    with pytest.raises(UserError, match="not a probe-part file"):
        suite.probe_files(str(tmp_path))
    with pytest.raises(UserError, match="python sandbox.py"):
        suite.window(str(tmp_path))


def test_token_counts_of_the_probe_contexts(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abc def word", "x" * 300 + " name")))
    assert suite.token_counts(str(path), encode) == [7, 300]


# -----------------------------------------------------------------------------
# acceptance numbers

def test_paired_bootstrap_known_cases():
    ones, zeros = [1.0] * 50, [0.0] * 50
    assert suite.paired_bootstrap(ones, zeros) == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    assert suite.paired_bootstrap(ones, ones) == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    n = 400
    a, b = [float(i % 2) for i in range(n)], [0.0] * n  # differences: half 1, half 0
    st = suite.paired_bootstrap(a, b)
    half = 1.96 * math.sqrt(0.25 / n)  # the normal interval the bootstrap approximates
    assert st["mean"] == 0.5 and abs(st["lo"] - (0.5 - half)) < 0.01 and abs(st["hi"] - (0.5 + half)) < 0.01
    assert suite.paired_bootstrap(a, b) == st  # fixed by hash: the same interval every time
    with pytest.raises(ValueError):
        suite.paired_bootstrap([1.0], [1.0, 0.0])


def correct(n, k):
    """n examples, the first k right."""
    return [1.0] * k + [0.0] * (n - k)


def test_verdicts():
    n = 400
    t, s, kd = (correct(n, 240), None), (correct(n, 160), None), (correct(n, 200), None)
    v = suite.verdict("next_line", t, s, kd)
    assert v["teacher"] == 0.6 and v["student"] == 0.4 and abs(v["gap"]["mean"] - 0.2) < 1e-12
    assert v["gap_ok"] and v["ceiling_ok"] and v["kd_ok"] and v["accepted"]
    assert suite.verdict("next_line", t, s)["accepted"] is None  # no Full KD run: not yet decided
    small = suite.verdict("next_line", (correct(n, 172), None), s, kd)  # 3 points: under the 5 asked
    assert not small["gap_ok"] and not small["accepted"]
    saturated = suite.verdict("next_line", (correct(n, 360), None), s, kd)  # 90% > 85%
    assert saturated["gap_ok"] and not saturated["ceiling_ok"] and not saturated["accepted"]
    away = suite.verdict("next_line", t, s, (correct(n, 120), None))  # Full KD moved away from the teacher
    assert not away["kd_ok"] and not away["accepted"]
    # last_word: accuracy toward the teacher is not enough; word NLL must move toward it too
    nll = lambda x: [x] * n  # noqa: E731
    t_w, s_w = (correct(n, 240), nll(2.0)), (correct(n, 160), nll(3.0))
    assert suite.verdict("last_word", t_w, s_w, (correct(n, 200), nll(2.5)))["accepted"]
    worse = suite.verdict("last_word", t_w, s_w, (correct(n, 200), nll(3.5)))
    assert not worse["kd_ok"] and worse["kd_ppl"] == pytest.approx(math.exp(3.5))
    with pytest.raises(UserError, match="different examples"):
        suite.verdict("next_line", t, (correct(n - 1, 10), None))


def test_per_example_reads_the_task_metric():
    rows = [{"gold": 1, "pred": 1, "pred_norm": 0}, {"gold": 2, "pred": 0, "pred_norm": 2}]
    assert suite.per_example("next_line", rows) == ([0.0, 1.0], None)  # acc_norm: pred_norm
    assert suite.per_example("next_indent", rows) == ([1.0, 0.0], None)  # acc: pred
    words = [{"is_greedy": True, "loglikelihood": -1.5}, {"is_greedy": False, "loglikelihood": -4.0}]
    assert suite.per_example("last_word", words) == ([1.0, 0.0], [1.5, 4.0])


def test_acceptance_reads_eval_outputs_and_prints_the_table(tmp_path):
    n = 100
    for who, k in (("teacher", 60), ("student", 30), ("kd", 45)):
        d = tmp_path / who / "eval_examples_validation"
        d.mkdir(parents=True)
        for task in suite.TASKS:
            if suite.TASKS[task]["kind"] == "last_word":
                rows = [{"is_greedy": i < k, "loglikelihood": -(3.0 - k / 100)} for i in range(n)]
            else:
                rows = [{"gold": 0, "pred": 0 if i < k else 1, "pred_norm": 0 if i < k else 1} for i in range(n)]
            eval_.write_jsonl(str(d / f"{task}.jsonl"), rows)
    verdicts = suite.acceptance(*(str(tmp_path / w) for w in ("teacher", "student", "kd")))
    assert [v["task"] for v in verdicts] == list(suite.TASKS) and all(v["accepted"] for v in verdicts)
    table = suite.format_acceptance(verdicts)
    assert "| next_line | acc_norm | 100 | 60.0 | 30.0 | +30.0 [" in table
    assert f"suite_acc (kd, {len(suite.TASKS)} accepted tasks) = 45.0" in table
    with pytest.raises(UserError, match="--accept: .* not found"):
        suite.acceptance(str(tmp_path / "teacher"), str(tmp_path / "student"), split="test")


def test_suite_acc_is_the_mean_of_the_suite_metrics():
    results = {t: {"acc": 0.1, "acc_norm": 0.3} for t in suite.SUITE}
    want = sum(0.1 if suite.TASKS[t]["metric"] == "acc" else 0.3 for t in suite.SUITE) / len(suite.SUITE)
    assert suite.suite_acc(results) == pytest.approx(want)
    assert suite.suite_acc({suite.SUITE[0]: {"acc": 0.5, "acc_norm": 0.5}}) is None  # a task missing
    assert [c for c in report.COLUMNS if c[0] == "suite acc"][0][2]({"eval": results}) == pytest.approx(want)


# -----------------------------------------------------------------------------
# the toy pair, end to end through eval.py

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    return home, sandbox.build(os.path.join(str(home), sandbox.VERSION), scale="toy", log=lambda m: None)


def test_toy_pair_scored_through_eval(toy, tmp_path, monkeypatch):
    home, p = toy
    monkeypatch.setenv("NANO_SEKD_HOME", str(home))
    win = suite.window(p["root"])
    assert win == sandbox.SCALES["toy"]["seq_len"]
    tok = suite.load_tokenizer(p["root"])
    assert suite.examples("last_word", "test", limit=5) == suite.examples("last_word", "test", root=p["root"])[:5]
    for task in suite.TASKS:
        exs = suite.examples(task, "validation", limit=12)
        conts = lambda ex: [" " + c for c in ex["choices"]] if "choices" in ex else [ex["target"]]  # noqa: E731
        assert all(len(tok.encode(ex["context"] + c, add_special_tokens=False)) <= win for ex in exs for c in conts(ex))
    out = tmp_path / "teacher"
    results = eval_.main([p["teacher"], "--suite", "sandbox", "--split", "validation", "--limit", "12",
                          "--out", str(out), "--no-progress"])
    assert set(results) == set(suite.SUITE)
    for task in suite.SUITE:
        rows = [json.loads(line) for line in open(out / "eval_examples_validation" / f"{task}.jsonl")]
        assert len(rows) == results[task]["n"] and results[task]["split"] == "validation"
        right = suite.per_example(task, rows)[0]
        assert sum(right) / len(right) == pytest.approx(results[task][suite.TASKS[task]["metric"]])
    saved = json.load(open(out / "eval_validation.json"))
    assert suite.suite_acc(saved) == pytest.approx(suite.suite_acc(results))


def test_eval_without_a_built_pair_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NANO_SEKD_HOME", str(tmp_path))  # no pair built there
    with pytest.raises(UserError, match="not built .* run python sandbox.py"):
        eval_.main([str(tmp_path / "no-model"), "--suite", "sandbox", "--out", str(tmp_path / "o")])


def test_train_scores_the_suite_on_both_parts(toy, tmp_path, monkeypatch):
    home, p = toy
    monkeypatch.setenv("NANO_SEKD_HOME", str(home))
    out = tmp_path / "run"
    train.main(["--teacher", p["teacher"], "--student", p["student"], "--data", p["kd"], "--seq-len", "32",
                "--tokens", "256", "--eval-tokens", "64", "--batch-size", "4", "--k", "0.5", "--suite", "sandbox",
                "--out-dir", str(out)])
    summary = json.load(open(out / "summary.json"))
    for split, name in (("validation", "eval_validation.json"), ("test", "eval.json")):
        saved = json.load(open(out / name))
        assert set(saved) == set(suite.SUITE) and summary["suite_acc"][split] == suite.suite_acc(saved)
        # the same numbers as eval.py on the saved model (eval.py's own scorers, per-example rows kept)
        again = eval_.main([str(out), "--suite", "sandbox", "--split", split, "--out", str(tmp_path / "ev"),
                            "--no-progress"])
        assert suite.suite_acc(again) == pytest.approx(suite.suite_acc(saved), abs=1e-12)
        folder = "eval_examples" if split == "test" else "eval_examples_validation"
        assert all(os.path.getsize(out / folder / f"{t}.jsonl") > 0 for t in suite.SUITE)
    assert report.load_run(str(out))["eval"] == json.load(open(out / "eval.json"))  # report's suite acc column
    # a run without --suite writes no eval file, and replacing a suite run (--fresh) removes the stale ones
    train.main(["--teacher", p["teacher"], "--student", p["student"], "--data", p["kd"], "--seq-len", "32",
                "--tokens", "256", "--eval-tokens", "64", "--batch-size", "4", "--k", "0.5", "--out-dir", str(out),
                "--fresh"])
    assert not (out / "eval.json").exists() and not (out / "eval_examples").exists()
    assert json.load(open(out / "summary.json"))["suite_acc"] == {}
