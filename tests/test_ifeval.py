"""Tests for ifeval.py: checkers (pass + fail each), Punkt/Treebank helpers,
loose variants, scoring, I/O, and (when ../shared is there) the 540 official
GPT-4 responses."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ifeval  # noqa: E402
from common import UserError  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "ifeval"


def follows(iid, text, **kw):
    return ifeval._follows(iid, kw, text)


# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------

def test_count_words_is_w_plus():
    # \w+ splits on apostrophes and hyphens:
    # It / s / a / well / known / fact / 42 / times
    assert ifeval.count_words("It's a well-known fact, 42 times.") == 8
    assert ifeval.count_words("") == 0


@pytest.mark.parametrize("text,expected", [
    # "dr" is an abbreviation of the English model: no break after "Dr."
    ("Dr. Smith went home. He slept.", ["Dr. Smith went home.", "He slept."]),
    # a decimal point is not a candidate boundary (no space after it)
    ("It costs 3.5 dollars. Cheap!", ["It costs 3.5 dollars.", "Cheap!"]),
    # ellipsis + lower-case word: unknown -> no break; '?' breaks
    ("Wait... what? Yes.", ["Wait... what?", "Yes."]),
    # ellipsis + "The" (a frequent sentence starter): break
    ("Wait... The end.", ["Wait...", "The end."]),
    # "p.m" is an abbreviation, and "yesterday" is lower case
    ("We met Mr. Jones at 5 p.m. yesterday.",
     ["We met Mr. Jones at 5 p.m. yesterday."]),
    # "e.g" is NOT in the model's abbreviations: punkt splits there
    ("See e.g. the docs. Fine.", ["See e.g.", "the docs.", "Fine."]),
    # ordinal followed by a lower-case word: not a break
    ("1. first item\n2. second item", ["1. first item\n2. second item"]),
    # ordinal followed by a capitalised word: a break
    ("1. First item\n2. Second item", ["1.", "First item\n2.", "Second item"]),
    # closing bracket / quote realigned onto the sentence before
    ("(He left.) She stayed.", ["(He left.)", "She stayed."]),
    ('He said "Go." Then he left.', ['He said "Go."', "Then he left."]),
    # initial + unseen capitalised word (a name): no break
    ("J. Smith wrote it.", ["J. Smith wrote it."]),
    # abbreviation + frequent sentence starter: break
    ("The U.S. The country.", ["The U.S.", "The country."]),
    ("Hello!!! World?! ok.", ["Hello!!!", "World?!", "ok."]),
    ("no period at all", ["no period at all"]),
    ("", []),
    ("   ", []),
])
def test_split_sentences_punkt_cases(text, expected):
    assert ifeval.split_sentences(text) == expected
    assert ifeval.count_sentences(text) == len(expected)


def test_treebank_words_splits_like_word_tokenize():
    toks = ifeval.treebank_words("I DON'T know R&D. It's (NASA) CANNOT--fine")
    assert toks == ["I", "DO", "N'T", "know", "R", "&", "D", ".", "It", "'s",
                    "(", "NASA", ")", "CAN", "NOT", "--", "fine"]
    # I, DO, N'T, R, D, NASA, CAN, NOT are all-caps tokens
    assert sum(t.isupper() for t in toks) == 8


# --------------------------------------------------------------------------
# Checkers, one family at a time: a pass and a fail each
# --------------------------------------------------------------------------

def test_keywords():
    assert follows("keywords:existence", "The Cat sat on a mat.", keywords=["cat", "mat"])
    assert not follows("keywords:existence", "The dog sat.", keywords=["cat", "dog"])
    # case-insensitive regex search, substring matches count (official rule)
    assert follows("keywords:frequency", "Fun, FUN, funny", keyword="fun",
                   frequency=3, relation="at least")
    assert not follows("keywords:frequency", "fun fun", keyword="fun",
                       frequency=2, relation="less than")
    assert follows("keywords:forbidden_words", "A catalog of items", forbidden_words=["cat"])
    assert not follows("keywords:forbidden_words", "My Cat.", forbidden_words=["cat"])
    assert follows("keywords:letter_frequency", "Banana", letter="a",
                   let_frequency=3, let_relation="at least")
    assert not follows("keywords:letter_frequency", "bAnAnA", letter="A",
                       let_frequency=3, let_relation="less than")


def test_language():
    en = "This is clearly an English sentence about the weather today and tomorrow."
    fr = "Le renard brun rapide saute par-dessus le chien paresseux et court dans la forêt."
    assert follows("language:response_language", fr, language="fr")
    assert not follows("language:response_language", en, language="fr")
    # undetectable text: the official code counts it as followed
    assert follows("language:response_language", "12345 !!!", language="fr")


def test_length_constraints():
    t = "One. Two. Three."
    assert follows("length_constraints:number_sentences", t, num_sentences=3, relation="at least")
    assert not follows("length_constraints:number_sentences", t, num_sentences=3,
                       relation="less than")
    assert follows("length_constraints:number_words", "a b c", num_words=4, relation="less than")
    assert not follows("length_constraints:number_words", "a b c d", num_words=4,
                       relation="less than")
    three = "p1\n***\np2\n***\np3"
    assert follows("length_constraints:number_paragraphs", three, num_paragraphs=3)
    assert not follows("length_constraints:number_paragraphs", three, num_paragraphs=2)
    # an empty paragraph in the middle fails outright; at the ends it is dropped
    assert not follows("length_constraints:number_paragraphs", "a\n***\n***\nb", num_paragraphs=2)
    assert follows("length_constraints:number_paragraphs", "***\na\n***\nb\n***", num_paragraphs=2)
    paras = "First para.\n\n\"Bonding, they said.\n\nLast one."
    kw = dict(num_paragraphs=3, nth_paragraph=2, first_word="bonding")
    assert follows("length_constraints:nth_paragraph_first_word", paras, **kw)
    assert not follows("length_constraints:nth_paragraph_first_word", paras,
                       **{**kw, "first_word": "first"})
    assert not follows("length_constraints:nth_paragraph_first_word", paras,
                       **{**kw, "num_paragraphs": 2})


def test_detectable_content():
    assert follows("detectable_content:number_placeholders", "[a] and [b]", num_placeholders=2)
    assert not follows("detectable_content:number_placeholders", "[a] and b", num_placeholders=2)
    assert follows("detectable_content:postscript", "Hi.\np.s. bye", postscript_marker="P.S.")
    assert follows("detectable_content:postscript", "Hi.\nP.P.S bye", postscript_marker="P.P.S")
    assert not follows("detectable_content:postscript", "Hi. PS bye", postscript_marker="P.S.")


def test_detectable_format():
    bullets = "Intro\n* one\n* two\n- three"
    assert follows("detectable_format:number_bullet_lists", bullets, num_bullets=3)
    assert not follows("detectable_format:number_bullet_lists", bullets, num_bullets=2)
    assert follows("detectable_format:constrained_response", "  My answer is no. ")
    assert not follows("detectable_format:constrained_response", "My answer is: no")
    # *a* and **b** count; ** ** (blank) does not
    assert follows("detectable_format:number_highlighted_sections", "*a* and **b**",
                   num_highlights=2)
    assert not follows("detectable_format:number_highlighted_sections", "** ** and *a*",
                       num_highlights=2)
    secs = "SECTION 1\nfoo\nSECTION 2\nbar"
    assert follows("detectable_format:multiple_sections", secs, section_spliter="SECTION",
                   num_sections=2)
    assert not follows("detectable_format:multiple_sections", secs, section_spliter="Section",
                       num_sections=1)
    assert follows("detectable_format:json_format", '```json\n{"a": [1, 2]}\n```')
    assert not follows("detectable_format:json_format", '{"a": 1} trailing')
    assert follows("detectable_format:title", "<<My Title>>\nbody")
    assert not follows("detectable_format:title", "<<   >> and <<\n>>")


def test_combination_and_startend():
    assert follows("combination:two_responses", "first\n******\nsecond")
    assert not follows("combination:two_responses", "same\n******\nsame ")
    assert not follows("combination:two_responses", "a\n******\n******\nb")
    assert follows("combination:repeat_prompt", "  write a POEM. Sure: ...",
                   prompt_to_repeat="Write a poem.")
    assert not follows("combination:repeat_prompt", "Sure! Write a poem.",
                       prompt_to_repeat="Write a poem.")
    assert follows("startend:end_checker", 'Bye. Any other questions?"  ',
                   end_phrase="Any other questions?")
    assert not follows("startend:end_checker", "Any other questions? Bye.",
                       end_phrase="Any other questions?")
    assert follows("startend:quotation", ' "quoted" ')
    assert not follows("startend:quotation", '"')


def test_change_case_and_punctuation():
    t = "I DON'T like R&D at all"  # I, DO, N'T, R, D -> 5
    assert follows("change_case:capital_word_frequency", t, capital_frequency=5,
                   capital_relation="at least")
    assert not follows("change_case:capital_word_frequency", t, capital_frequency=5,
                       capital_relation="less than")
    up = "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG AND RUNS AWAY INTO THE FOREST."
    assert follows("change_case:english_capital", up)
    assert not follows("change_case:english_capital", up[:-1] + "t.")
    assert follows("change_case:english_lowercase", up.lower())
    assert not follows("change_case:english_lowercase", "The " + up.lower())
    assert follows("punctuation:no_comma", "no commas here")
    assert not follows("punctuation:no_comma", "one, two")


def test_registry_and_errors():
    assert len(ifeval.INSTRUCTIONS) == 25
    assert all(callable(f) for f in ifeval.INSTRUCTIONS.values())
    with pytest.raises(ValueError, match="unknown instruction"):
        follows("keywords:nope", "text")
    with pytest.raises(ValueError, match="relation"):
        follows("length_constraints:number_words", "a b", num_words=3, relation="at most")
    with pytest.raises(ValueError, match="bad kwargs"):
        follows("punctuation:no_comma", "a", extra=1)
    # None-valued kwargs (the Hugging Face copy of the data) are ignored
    assert ifeval._follows("punctuation:no_comma", {"num_words": None}, "a b")


# --------------------------------------------------------------------------
# Strict vs loose
# --------------------------------------------------------------------------

def test_loose_variants_official_order():
    v = ifeval.loose_variants("*a*\nb\n*c*")
    assert v == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


def test_loose_passes_where_strict_fails():
    row = {"prompt": "p", "instruction_id_list": [
        "detectable_format:json_format", "startend:end_checker", "punctuation:no_comma"],
        "kwargs": [{}, {"end_phrase": "Any other questions?"}, {}]}
    resp = 'Sure, here it is:\n{"a": 1}'
    assert ifeval.check_strict(row, resp) == [False, False, False]
    # first line removed -> valid JSON and no comma; the end phrase never appears
    assert ifeval.check_loose(row, resp) == [True, False, True]
    row2 = {"prompt": "p", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    # the '*'-stripped variant: **"hi"** -> "hi"
    assert ifeval.check_strict(row2, '**"hi"**') == [False]
    assert ifeval.check_loose(row2, '**"hi"**') == [True]


def test_empty_and_missing_responses_fail():
    row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert ifeval.check_strict(row, "   ") == [False]
    assert ifeval.check_loose(row, "") == [False]
    strict, loose, summ = ifeval.score_responses([row], {})
    assert strict[0]["follow_all_instructions"] is False
    assert strict[0]["response"] == ""
    assert summ["counts"]["missing_responses"] == 1
    assert summ["prompt_level_strict_acc"] == 0.0


def test_score_responses_summary_hand_computed():
    rows = [
        {"prompt": "a", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
         "kwargs": [{}, {}]},
        {"prompt": "b", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    # a: no comma ok, not quoted (strict) but quoted once the last line goes
    resp = [{"prompt": "a", "response": '"hi"\nfooter'}, {"prompt": "b", "response": "x, y"}]
    strict, loose, s = ifeval.score_responses(rows, resp)
    assert [r["follow_instruction_list"] for r in strict] == [[True, False], [False]]
    assert [r["follow_instruction_list"] for r in loose] == [[True, True], [False]]
    assert s["prompt_level_strict_acc"] == 0.0 and s["inst_level_strict_acc"] == 1 / 3
    assert s["prompt_level_loose_acc"] == 0.5 and s["inst_level_loose_acc"] == 2 / 3
    assert s["counts"]["prompts"] == 2 and s["counts"]["instructions"] == 3
    empty = ifeval.score_responses([], {})[2]
    assert empty["prompt_level_strict_acc"] == 0.0 and empty["inst_level_loose_acc"] == 0.0


# --------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------

def test_write_results_format_and_atomicity(tmp_path, monkeypatch):
    rows = [{"prompt": "a", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"prompt": "b", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    strict, loose, _ = ifeval.score_responses(rows, {"a": "ok", "b": "x, y"})
    out = tmp_path / "res"
    ps, pl = ifeval.write_results(str(out), strict, loose)
    assert Path(ps).name == "ifeval_results_strict.jsonl"
    assert Path(pl).name == "ifeval_results_loose.jsonl"
    lines = Path(ps).read_text().splitlines()
    assert len(lines) == 2
    got = [json.loads(line) for line in lines]
    assert list(got[0]) == ["follow_all_instructions", "follow_instruction_list",
                            "instruction_id_list", "prompt", "response"]
    assert got[1]["follow_instruction_list"] == [False] and got[0]["prompt"] == "a"
    before = Path(pl).read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ifeval.os, "replace", boom)
    with pytest.raises(OSError):
        ifeval.write_results(str(out), strict[:1], loose[:1])
    monkeypatch.undo()
    assert Path(pl).read_text() == before  # old file intact
    assert sorted(p.name for p in out.iterdir()) == [
        "ifeval_results_loose.jsonl", "ifeval_results_strict.jsonl"]  # no temp left


def test_loaders_and_errors(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list":
                               ["punctuation:no_comma"], "kwargs": [{}]}) + "\n\n")
    assert ifeval.load_inputs(str(inp))[0]["key"] == 1
    resp = tmp_path / "r.jsonl"
    resp.write_text('{"prompt": "p", "response": "old"}\n{"prompt": "p", "response": "new"}\n')
    assert ifeval.load_responses(str(resp)) == {"p": "new"}
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        ifeval.load_inputs(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        ifeval.load_responses(str(bad))
    bad.write_text(json.dumps({"prompt": "p", "instruction_id_list": ["x:y"], "kwargs": [{}]}))
    with pytest.raises(ValueError, match="unknown instruction id"):
        ifeval.load_inputs(str(bad))
    bad.write_text(json.dumps({"prompt": "p"}))
    with pytest.raises(ValueError, match="response"):
        ifeval.load_responses(str(bad))


# --------------------------------------------------------------------------
# The 540 official prompts with GPT-4's responses (only if ../shared exists)
# --------------------------------------------------------------------------

# Prompts GPT-4 fails strictly but passes loosely.  Checked one by one against
# a published run of the official verifier on the same responses
# (eval_results_loose.jsonl of the GPT-4 demo): all 14 are loose passes there.
LOOSE_ONLY_KEYS = {164, 181, 1051, 1092, 1314, 1627, 1825, 1996, 2275, 2549,
                   3281, 3287, 3371, 3718}


@pytest.fixture(scope="module")
def gpt4_scores():
    if not (SHARED / "input_data.jsonl").is_file():
        pytest.skip("../shared/data/ifeval not present")
    inputs = ifeval.load_inputs(str(SHARED / "input_data.jsonl"))
    responses = ifeval.load_responses(str(SHARED / "gpt4_responses.jsonl"))
    return inputs, ifeval.score_responses(inputs, responses)


def test_gpt4_official_totals(gpt4_scores):
    inputs, (strict, loose, s) = gpt4_scores
    assert len(strict) == len(loose) == 540
    assert s["counts"]["prompt_strict_correct"] == 417      # 0.77222
    assert round(s["prompt_level_strict_acc"], 4) == 0.7722
    # nltk itself (real punkt model + official checkers) gives 431/540 here;
    # shared/README's 0.7963 (430) is one prompt lower: see LOOSE_ONLY_KEYS.
    assert s["counts"]["prompt_loose_correct"] == 431        # 0.79815
    loose_only = {i["key"] for i, a, b in zip(inputs, strict, loose)
                  if b["follow_all_instructions"] and not a["follow_all_instructions"]}
    assert loose_only == LOOSE_ONLY_KEYS
    assert all(b["follow_all_instructions"] for a, b in zip(strict, loose)
               if a["follow_all_instructions"])  # loose is never stricter


# Responses whose number_sentences verdict is within one sentence of its
# threshold, with the count nltk's punkt (sent_tokenize) gives for them.
NLTK_SENTENCE_COUNTS = {1174: 6, 1476: 2, 1535: 4, 1653: 14, 2035: 7, 2143: 5,
                        2303: 17, 2749: 21, 2787: 4, 3276: 5, 3362: 7, 3672: 1,
                        3691: 10}


def test_gpt4_sentence_counts_near_thresholds(gpt4_scores):
    inputs, (strict, _, _) = gpt4_scores
    got = {i["key"]: ifeval.count_sentences(r["response"])
           for i, r in zip(inputs, strict) if i["key"] in NLTK_SENTENCE_COUNTS}
    assert got == NLTK_SENTENCE_COUNTS


def test_cli_bad_file_is_one_line(tmp_path, capsys):
    inp, resp = tmp_path / "in.jsonl", tmp_path / "r.jsonl"
    inp.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                               "kwargs": [{}]}) + "\n")
    resp.write_bytes(bytes(range(128, 256)))
    with pytest.raises(SystemExit) as e:
        ifeval.main(["--inputs", str(inp), "--responses", str(resp), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ifeval.py: error: ")
    assert f"{resp}: not UTF-8 text at byte 0" in err[0]
