"""Bad input at every CLI (train, eval, cache, report): exit 2 and one line naming the flag or file, before
any model loads where the check needs none; suspicious input: one warning line, and the run goes on."""
import json
import os

import pytest
import torch

import cache
import common
import config
import eval as E
import models
import report
import train
from conftest import train_args

MODEL_LOAD = "model load reached"  # what the fixture's loaders raise: a check that comes after it is late


@pytest.fixture
def no_models(monkeypatch):
    """Every model loader raises MODEL_LOAD, so a test sees whether an error came before any model."""
    def refuse(*a, **k):
        raise common.UserError(MODEL_LOAD)
    for name in ("load_model", "load_tokenizer", "load_config"):
        monkeypatch.setattr(models, name, refuse)
    monkeypatch.setattr(E, "load_model", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is refused the same way with or without network


def one_line(capsys, code, expected_code=2):
    """stderr of a CLI that exited with `code`: exactly one line, no traceback, no usage block."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code, err
    assert len(err) == 1 and "Traceback" not in err[0] and not err[0].startswith("usage:"), err
    assert MODEL_LOAD not in err[0], f"the check came after a model load: {err}"
    return err[0]


def run(main, argv, prog):
    """A CLI's main() as its __main__ runs it (common.run_cli); returns the exit code."""
    try:
        common.run_cli(lambda: main(argv), prog)
    except SystemExit as e:
        return e.code
    return 0


# -----------------------------------------------------------------------------
# files a user might hand over

def write(path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


GSM8K_ROW = {"question": "What is 2 plus 2?", "answer": "It is 4.\n#### 4"}
BAD_TASK_DATA = {  # file content -> words of the error
    "wrong_fields": (json.dumps({"q": "a", "a": "b"}) + "\n", "row 1 needs string fields"),
    "bad_json": ('{"question": "a", "answer": \n', "line 1 is not JSON"),
    "int_fields": (json.dumps({"question": 1, "answer": 2}) + "\n", "string fields 'question' and 'answer'"),
    "bare_ints": ("1\n2\n3\n", "line 1 is a JSON int, not an object"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "empty": ("\n\n", "no examples"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TASK_DATA))
def test_task_data_errors_name_the_flag_and_file(tiny_dir, tmp_path, capsys, no_models, kind):
    content, words = BAD_TASK_DATA[kind]
    f = write(tmp_path / "gsm.jsonl", content)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, tmp_path / "out", "--task", "gsm8k", "--task-data", f))
    line = one_line(capsys, e.value.code)
    assert f"--task-data {f}" in line and words in line


def train_exit(tiny_dir, tmp_path, extra):
    """train.main on the tiny fixture plus `extra` flags ({tmp} is tmp_path, where the input files the cases
    name are written first): the SystemExit it ends with."""
    write(tmp_path / "a_file", "x")
    write(tmp_path / "rows.jsonl", json.dumps({"text": "a b c"}) + "\n")
    write(tmp_path / "gsm.jsonl", json.dumps(GSM8K_ROW) + "\n")
    write(tmp_path / "random.bin", torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
          .to(torch.uint8).numpy().tobytes())
    write(tmp_path / "latin1.txt", ("Le café est très noir. " * 50 + "\n").encode("latin-1"))
    write(tmp_path / "model.gguf", b"GGUF" + bytes(range(1, 200)) * 10)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, tmp_path / "out", *[a.replace("{tmp}", str(tmp_path)) for a in extra]))
    return e.value


@pytest.mark.parametrize("extra,words", [
    (["--data", "HuggingFaceFW/fineweb-edu"], "--data HuggingFaceFW/fineweb-edu: not a local .txt/.jsonl/.parquet "
                                              "file, and not in the local Hugging Face cache"),
    (["--task", "gsm8k"], "--task-data openai/gsm8k: not a local JSONL file of question/answer rows, and not in "
                            "the local Hugging Face cache"),
    (["--task", "gsm8k", "--task-data", "nowhere.jsonl"], "--task-data nowhere.jsonl: no such file"),
    (["--data", "nowhere.txt"], "--data nowhere.txt: no such file"),
    (["--data", "{tmp}/rows.jsonl", "--text-field", "body"], "has no field 'body' (set --text-field)"),
    (["--rs-u", "0", "--cache-dir", "{tmp}/cache"], "--rs-u must be in [1, 65535] with --cache-dir"),
    (["--rs-u", "100000", "--cache-dir", "{tmp}/cache"], "--rs-u must be in [1, 65535] with --cache-dir"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--out-dir", ""], "--out-dir '' is empty"),
    (["--out-dir", "{tmp}/a_file"], "a_file' is a file, not a directory"),
    (["--out-dir", "{tmp}/a_file/run"], "a_file, which is a file"),
    (["--k", "abc"], "argument --k: invalid float value: 'abc'"),
    (["--policy", "nope"], "argument --policy: invalid choice: 'nope'"),
    (["--suite", "nope"], "argument --suite: invalid choice: 'nope'"),
])
def test_train_errors_are_one_line_before_any_model(tiny_dir, tmp_path, capsys, no_models, extra, words):
    line = one_line(capsys, train_exit(tiny_dir, tmp_path, extra).code)
    assert words.replace("{tmp}", str(tmp_path)) in line
    assert not (tmp_path / "out").exists()  # refused before the out-dir is touched


def test_suite_without_a_built_pair_is_one_line(tiny_dir, tmp_path, capsys, no_models, monkeypatch):
    monkeypatch.setenv("NANO_SEKD_HOME", str(tmp_path / "home"))  # nothing built there
    line = one_line(capsys, train_exit(tiny_dir, tmp_path, ["--suite", "sandbox"]).code)
    assert "--suite sandbox: the pair is not built" in line and "python sandbox.py" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_out_dir_is_one_line(tiny_dir, tmp_path, capsys, no_models):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(tiny_dir, ro / "run"))
    assert "is not writable" in one_line(capsys, e.value.code)


def test_value_errors_print_no_usage_block(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--k", "0"])
    assert one_line(capsys, e.value.code) == "train.py: error: --k must be in (0, 1], got 0.0"


# -----------------------------------------------------------------------------
# suspicious input: one warning line, then the run goes on (here: up to the first model load)

@pytest.mark.parametrize("extra,words", [
    (["--seeds", "0,1"], "--seeds 0,1 is read by --matrix only: this one run uses --seed 0"),
    (["--task-data", "{tmp}/gsm.jsonl"], "is read by --task gsm8k only: ignored"),
    (["--data", "{tmp}/random.bin"], "are NUL: a binary file, not text"),
    (["--data", "{tmp}/latin1.txt"], "are not UTF-8 and would be read as U+FFFD"),
    (["--data", "{tmp}/model.gguf"], "is a GGUF model file"),
])
def test_suspicious_input_warns_once(tiny_dir, tmp_path, capsys, no_models, extra, words):
    train_exit(tiny_dir, tmp_path, extra)
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("train.py: warning: ")]
    assert len(warnings) == 1 and words in warnings[0], err
    assert MODEL_LOAD in err[-1]  # a warning, not an error: the run went on


def test_clean_input_gives_no_warning(tiny_dir, tmp_path, capsys, no_models):
    with pytest.raises(SystemExit):
        train.main(train_args(tiny_dir, tmp_path / "out"))
    assert "warning" not in capsys.readouterr().err


# -----------------------------------------------------------------------------
# eval.py

IFEVAL_INPUT = {"key": 1, "prompt": "Say hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
BAD_RESPONSES = {  # content -> words
    "bad_json": ('{"prompt": \n', "line 1 is not JSON"),
    "wrong_fields": (json.dumps({"prompt": "Say hi"}) + "\n", "needs 'prompt' and 'response'"),
    "int_fields": (json.dumps({"prompt": 1, "response": 2}) + "\n", "must be strings"),
    "bare_ints": ("1\n", "not an object"),
    "binary": (bytes(range(128, 256)) * 4, "not UTF-8 text"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RESPONSES) + ["missing"])
def test_ifeval_responses_errors_name_the_flag_and_file(tmp_path, capsys, no_models, kind):
    inputs = write(tmp_path / "in.jsonl", json.dumps(IFEVAL_INPUT) + "\n")
    resp = tmp_path / "resp.jsonl"
    if kind != "missing":
        write(resp, BAD_RESPONSES[kind][0])
    code = run(E.main, ["--ifeval-responses", str(resp), "--ifeval-inputs", inputs, "--out", str(tmp_path / "o")],
               "eval.py")
    line = one_line(capsys, code)
    assert line.startswith("eval.py: error: --ifeval-responses") and str(resp) in line
    assert (BAD_RESPONSES[kind][1] if kind != "missing" else "no such file") in line


def fake_run_dir(tmp_path, **cfg):
    d = tmp_path / "run"
    d.mkdir()
    write(d / "config.json", json.dumps(dict({"config_key": "abc", "seed": 0, "seq_len": 32}, **cfg)))
    return str(d)


@pytest.mark.parametrize("argv,words", [
    (["{run}"], "a train.py run without model/"),
    (["{teacher}", "--suite", "lm", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["{teacher}", "--suite", "lm", "--tokens", "nan"], "--tokens must be a finite number"),
    (["{teacher}", "--tasks", "piqa,nope"], "--tasks: unknown task 'nope'"),
    (["{teacher}", "--out", "{tmp}/a_file"], "--out '{tmp}/a_file' is a file, not a directory"),
    (["{teacher}", "--suite", "lm", "--data", "{tmp}/nowhere.txt"], "--data {tmp}/nowhere.txt: no such file"),
    (["{teacher}", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
])
def test_eval_errors_are_one_line_before_any_model(tiny_dir, tmp_path, capsys, no_models, argv, words):
    write(tmp_path / "a_file", "x")
    sub = {"{run}": fake_run_dir(tmp_path), "{teacher}": str(tiny_dir / "teacher"), "{tmp}": str(tmp_path)}

    def fill(s):
        for k, v in sub.items():
            s = s.replace(k, v)
        return s
    line = one_line(capsys, run(E.main, [fill(a) for a in argv], "eval.py"))
    assert line.startswith("eval.py: error: ") and fill(words) in line


def test_eval_suite_lm_warns_on_binary_data_before_any_model(tiny_dir, tmp_path, capsys, no_models):
    f = write(tmp_path / "data.txt", b"\x00\x01" * 100)
    code = run(E.main, [str(tiny_dir / "teacher"), "--suite", "lm", "--data", f], "eval.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[0].startswith("eval.py: warning: --data") and "NUL" in err[0]
    assert MODEL_LOAD in err[-1]


# -----------------------------------------------------------------------------
# cache.py

def built_cache(root, n=4, T=8, V=50):
    x = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(0))
    meta = dict(teacher="fake", vocab_size=V, seq_len=T, tokenizer_fingerprint="t", data_fingerprint="d")
    return cache.build(str(root), lambda ids: torch.randn(*ids.shape, V), x, torch.arange(n), meta, U=8,
                       shard_size=2, progress=False)


def cli_cache(argv):
    try:
        cache.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("argv,words", [
    (["bench", "--samples", "-1"], "cache.py bench: error: --samples must be >= 1, got -1"),
    (["bench", "--batch", "0"], "--batch must be >= 1"),
    (["estimate", "--tokens", "nan"], "cache.py estimate: error: --tokens must be a finite number"),
    (["estimate", "--tokens", "inf"], "--tokens must be a finite number"),
    (["estimate", "--l", "2"], "--l is a fraction"),
    (["estimate", "--u", "x"], "argument --u: invalid int value: 'x'"),
])
def test_cache_cli_errors_are_one_line(capsys, argv, words):
    assert words in one_line(capsys, cli_cache(argv))


def test_cache_inspect_on_a_cache_dir_root_names_its_caches(tmp_path, capsys):
    built_cache(tmp_path / "root" / "train-abc-seed0")
    built_cache(tmp_path / "root" / "val-def-seed0")
    line = one_line(capsys, cli_cache(["inspect", tmp_path / "root"]))
    assert "is a --cache-dir root" in line and "train-abc-seed0, val-def-seed0" in line


def test_cache_inspect_refuses_a_truncated_shard_record(tmp_path, capsys):
    d = built_cache(tmp_path / "c")
    assert cli_cache(["inspect", d]) == 0
    rec = os.path.join(d, "shard_00001.json")
    text = open(rec).read()
    open(rec, "w").write(text[: len(text) // 2])
    line = one_line(capsys, cli_cache(["inspect", d]))
    assert "shard_00001.json" in line and ("not valid JSON" in line or "truncated" in line)


# -----------------------------------------------------------------------------
# report.py

@pytest.mark.parametrize("argv,words", [
    (["--compare", "{tmp}/nope"], "run directory not found: {tmp}/nope"),
    (["--compare", "{tmp}/a_file"], "{tmp}/a_file: no config.json"),
    (["--plot-kind", "nope"], "argument --plot-kind: invalid choice: 'nope'"),
    ([], "nothing to do"),
    (["--lr-sweep", "{tmp}/nope"], "run directory not found: {tmp}/nope"),
])
def test_report_errors_are_one_line(tmp_path, capsys, argv, words):
    (tmp_path / "a_file").mkdir()
    line = one_line(capsys, run(report.main, [a.replace("{tmp}", str(tmp_path)) for a in argv], "report.py"))
    assert line.startswith("report.py: error: ") and words.replace("{tmp}", str(tmp_path)) in line


# -----------------------------------------------------------------------------
# diagnose.py

@pytest.mark.parametrize("argv,words", [
    (["quintiles", "{tmp}/a_file"], "not a finished train.py run with model/"),
    (["step1", "--k", "2"], "--k must be in (0, 1]"),
    (["step1", "--batches", "0"], "--batches >= 1"),
    (["quintiles", "{tmp}/a_file", "--bogus"], "unrecognized arguments: --bogus"),
    (["answers", "--preset", "tiny"], "answers needs a pair with --student"),
])
def test_diagnose_errors_are_one_line(tmp_path, capsys, no_models, argv, words):
    import diagnose
    (tmp_path / "a_file").mkdir()
    line = one_line(capsys, run(diagnose.main, [a.replace("{tmp}", str(tmp_path)) for a in argv], "diagnose.py"))
    assert line.startswith("diagnose.py: error: ") and words in line
