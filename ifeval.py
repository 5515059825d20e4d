"""IFEval: instruction-following evaluation (Zhou et al. 2023, arXiv:2311.07911).

Why it is here
--------------
Selective KD (Tavor et al., "Rethinking Selective Knowledge Distillation")
changes *which* teacher signals the student sees: only the positions t with
m_t = 1, only U sampled classes of p_t per position, only the top-l% samples
by score s_i.  A student q trained that way must still follow instructions,
so the paper reports IFEval next to perplexity and the other benchmarks.
This module scores ready-made responses; generating them is eval.py's job.

What IFEval measures
--------------------
Each of the 541 official prompts (540 in the shared input file) carries 1-3
*verifiable* instructions ("answer in fewer than 120 words", "no commas",
"wrap the whole reply in JSON", ...), each with its own kwargs.  A checker
decides each instruction with a deterministic rule; no model judges anything.

    strict   : the checker sees the response as is.
    loose    : the checker also sees 7 relaxed variants (first line removed,
               last line removed, both removed, and each of the 4 with every
               '*' deleted); an instruction passes if any variant passes.
    prompt-level acc      = mean over prompts of all(instructions followed)
    instruction-level acc = mean over all (prompt, instruction) pairs

Shapes: per prompt, ``follow_instruction_list`` is a list[bool] with one entry
per id in ``instruction_id_list``; the summary is a dict of 4 floats + counts.

Matching the official verifier
------------------------------
The rules follow google-research/instruction_following_eval (instructions.py,
instructions_util.py, evaluation_lib.py) so that scores agree prompt by prompt;
the code here is written from scratch and depends on nothing but ``langdetect``.
Three conventions need care:

* words     : nltk ``RegexpTokenizer(r"\\w+")`` == ``re.findall(r"\\w+")``.
* sentences : nltk's pretrained English Punkt model (Kiss & Strunk 2006).
  We re-implement the Punkt decision procedure (candidate '.?!' contexts,
  abbreviation / ellipsis / initial / ordinal rules, collocations, frequent
  sentence starters, orthographic heuristic, boundary realignment) with the
  model's small tables inlined.  The model's orthographic table (20k word
  types from the WSJ corpus) is not shipped; ``_ortho_flags`` approximates it
  (see there), which only matters right after an abbreviation, an ellipsis or
  a single-letter initial followed by a capitalised word.
* capital words : nltk ``word_tokenize`` (Treebank rules: contractions such as
  DON'T -> DO N'T, '&', ';', dashes, brackets, quotes split off); re-implemented
  in ``treebank_words``.

Language checks use ``langdetect`` with ``DetectorFactory.seed = 0`` so that
repeated runs agree; as in the official code a LangDetectException counts as
"followed".  A prompt with no response scores as the empty string, which fails
every instruction (the official code requires ``response.strip()``).

Checked against nltk (real Punkt model, word_tokenize) on the 540 shared GPT-4
responses and all their loose variants: capital-word counts are identical, and
sentence counts differ on 16 of 4320 texts (outline letters "A. Brief ...")
without changing any verdict.  Scores: strict 417/540 = 0.7722, loose
431/540 = 0.7981 (nltk + the official rules give the same 431).
"""
from __future__ import annotations

import collections
import json
import os
import re
import string

from common import UserError, read_jsonl  # the project's one JSONL reader

# ----------------------------------------------------------------------------
# Words: the official count_words is nltk.RegexpTokenizer(r"\w+"), i.e. findall.
# ----------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    return len(_WORD_RE.findall(text))


# ----------------------------------------------------------------------------
# Sentences: a Punkt sentence splitter (Kiss & Strunk 2006) with the tables of
# nltk's pretrained English model.  The official count is len(sentences).
# ----------------------------------------------------------------------------

# Word types (lower-cased, final period dropped) the English model learned
# as abbreviations: a period after them is not a sentence break by itself.
_ABBREV = frozenset("""
a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala ariz aug ave b.f b.v bros c
c.i.t c.o.m.b c.v calif chg cie co col colo conn corp cos ct d d.c d.h d.w dec
dr e e.f e.h e.l e.m f f.g f.j feb fla fri ft g g.d g.f g.k ga gen h h.c h.f
h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r jan jr k kan ky l l.a l.f l.p lt ltd
m m.b.a m.d.c m.j maj messrs mg mich minn mr mrs ms n n.c n.d n.h n.j n.m n.v
n.y nev nov oct ok okla ore p p.a.m p.m pa ph.d prof r r.a r.h r.i r.j r.k r.t
rep reps s s.a s.a.y s.c s.g s.p.a s.s sen sep sept sr st sw t t.j tenn tues
u.k u.n u.s u.s.a u.s.s.r v va vs vt w w.c w.r w.va w.w wash wed wis yr
""".split()) | {". . "}  # the model also holds the odd type ". . "

# Frequent sentence starters: after an abbreviation, a capitalised one of
# these means the abbreviation also ends the sentence ("... U.S. The ...").
_SENT_STARTERS = frozenset("""
according although among both but despite even he however i if in indeed
instead it many meanwhile moreover most nevertheless nonetheless nor sales
separately similarly since so some the there these they this though thus
under when while yet
""".split())

# Collocations (type before the period, type after): never a break there.
_COLLOCATIONS = frozenset(
    [("##number##", w) for w in (
        "abreast aes business cbot colgate commodities cooper corrections "
        "credit dividend financing genentech henley insider international "
        "leisure letters notable pay-fone pegasus pepper review rj wedgestone "
        "who zimmer").split()]
    + [("b", w) for w in ("edelman", "levine", "smith", "stewart", "wigton")]
    + [("i", "magnin"), ("i", "toussie"), ("j", "aron"), ("j", "fialka"),
       ("j", "walter"), ("o", "ludcke")])

# Orthographic-context bits: where a word type was seen upper/lower-case
# (beginning of sentence, middle, unknown position).
_BEG_UC, _MID_UC, _UNK_UC = 1 << 1, 1 << 2, 1 << 3
_BEG_LC, _MID_LC, _UNK_LC = 1 << 4, 1 << 5, 1 << 6
_UC = _BEG_UC | _MID_UC | _UNK_UC
_LC = _BEG_LC | _MID_LC | _UNK_LC

# The only types in the English model seen sentence-initially in lower case
# but never capitalised: after an ordinal ("3. b-week") they start a sentence.
_BEG_LC_ONLY = frozenset(["administrators", "b-week", "r-revised", "z-holiday"])

# Punkt's word regex pieces (language-independent defaults of nltk's Punkt).
_NON_WORD = r"""[)";}\]*:@'({\[!?]"""       # never inside a word
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"  # dashes and ellipses
_WORD_START = r"""[^("`{\[:;&#*@)}\]\-,]"""  # cannot start a word
_PUNKT_WORD_RE = re.compile(
    _MULTI
    + r"|(?=" + _WORD_START + r")\S+?"
    + r"(?=\s|$|" + _NON_WORD + "|" + _MULTI
    + r"|,(?=$|\s|" + _NON_WORD + "|" + _MULTI + "))"
    + r"|\S")
# A candidate boundary: '.?!' followed by punctuation or by space + a token.
_PERIOD_CTX_RE = re.compile(
    r"[.?!](?=(?P<after>" + _NON_WORD + r"|\s+(?P<next>\S+)))")
# Closing quotes/brackets right after a boundary belong to the sentence before.
_REALIGN_RE = re.compile(r"""["')\]}]+?(?:\s+|(?=--)|$)""", re.MULTILINE)
_NUMERIC_RE = re.compile(r"^-?[\.,]?\d[\d,\.-]*\.?$")
_INITIAL_RE = re.compile(r"[^\W\d]\.$")
_ELLIPSIS_RE = re.compile(r"\.\.+$")


# Orthographic context of ~250 common words, copied from the English model
# (flag value -> words).  Every other word is treated as never seen.
_COMMON_ORTHO = {w: f for f, ws in {
    2: "additionally",
    14: "i",
    32: ("them whom onto towards upon please always very basic important "
         "personal practical potential positive negative effective available "
         "present conclusion example step tips challenges"),
    34: ("her us which yes such yet therefore furthermore finally overall unless "
         "within above behind between beyond remember consider being tomorrow "
         "sometimes better nevertheless nonetheless final private global ideal "
         "examples"),
    36: ("whose across below off toward use keep start been must best brief open "
         "main future short small large possible summary background case cases "
         "steps benefits career"),
    38: ("you me my our their where why few only until down out do did again "
         "never maybe well really good according minor public social local "
         "professional past introduction"),
    40: "different",
    42: ("your nor still thus moreover indeed though along through try "
         "separately similarly recent"),
    44: "around key full free",
    46: ("an these those its he she they we his there what how if not all any "
         "both each many most one first second just even however meanwhile "
         "although while up about against among let now today once often perhaps "
         "new great despite general long high low major real late big little "
         "young special national total"),
    96: "him into begin simple",
    98: "without does",
    100: "than have might",
    102: "or every much take would should current",
    106: "here so instead note were yesterday early",
    108: "who make was be has had could old",
    110: ("this it when no more some other another two three next last also since "
         "because after before during as at for from in on over under with is "
         "are will may sales common"),
    116: "can",
    126: "the a that then but and by of to",
}.items() for w in ws.split()}


# Endings of ordinary (lower-case) English words: used to guess that an
# unseen capitalised word after an outline letter ("B. Discussion") is an
# ordinary word, hence a sentence start, as the full model would know.
_COMMON_ENDINGS = ("tion", "tions", "sion", "sions", "ment", "ments", "ness",
                   "ity", "ities", "ing", "ings", "ance", "ence", "sis", "ure",
                   "ures", "ism", "ive", "ous", "ful", "less", "able", "ible",
                   "ship", "ogy")


def _ortho_flags(typ: str, guess: bool = False) -> int:
    """Orthographic context of a word type (0 = never seen).

    The English model stores it for ~20k word types of its WSJ training
    text; we keep ~250 common words (``_COMMON_ORTHO``) and treat other words
    as unseen, which is what nltk does for words outside its table.  With
    ``guess`` (used after single-letter initials) an unseen word with an
    ordinary-word ending counts as seen in lower case.  The flags matter
    only right after an abbreviation, an ellipsis, an initial or an ordinal
    followed by a capitalised word; on the official GPT-4 responses the
    approximation changes no instruction verdict (see tests)."""
    if typ in _BEG_LC_ONLY:
        return _BEG_LC
    flags = _COMMON_ORTHO.get(typ, 0)
    if not flags and guess and typ.isalpha() and typ.endswith(_COMMON_ENDINGS):
        flags = _MID_LC
    return flags


class _Tok:
    """One Punkt token with its annotations (first and second pass)."""
    __slots__ = ("tok", "typ", "sentbreak", "abbr", "ellipsis")

    def __init__(self, tok: str):
        self.tok = tok
        self.typ = _NUMERIC_RE.sub("##number##", tok.lower())
        self.sentbreak = self.abbr = self.ellipsis = False

    def typ_no_period(self) -> str:
        t = self.typ
        return t[:-1] if len(t) > 1 and t[-1] == "." else t

    def typ_no_sentperiod(self) -> str:
        return self.typ_no_period() if self.sentbreak else self.typ


def _first_pass(t: _Tok) -> None:
    # Decide from the token alone: '.?!' alone, ellipsis, abbreviation, or
    # any other word ending in '.' (a tentative break).
    s = t.tok
    if s in (".", "?", "!"):
        t.sentbreak = True
    elif _ELLIPSIS_RE.match(s):
        t.ellipsis = True
    elif s.endswith(".") and not s.endswith(".."):
        low = s[:-1].lower()
        if low in _ABBREV or low.split("-")[-1] in _ABBREV:
            t.abbr = True
        else:
            t.sentbreak = True


def _starts_sentence(t: _Tok, guess: bool = False):
    """Orthographic heuristic: True / False / None (= unknown)."""
    if t.tok in (";", ":", ",", ".", "!", "?"):
        return False
    flags = _ortho_flags(t.typ_no_sentperiod(), guess)
    first = t.tok[0]
    if first.isupper() and flags & _LC and not flags & _MID_UC:
        return True
    if first.islower() and (flags & _UC or not flags & _BEG_LC):
        return False
    return None


def _second_pass(t: _Tok, nxt: _Tok) -> None:
    # Revise a period-final token using the token after it.
    if not t.tok.endswith("."):
        return
    typ, ntyp = t.typ_no_period(), nxt.typ_no_sentperiod()
    initial = _INITIAL_RE.match(t.tok) is not None
    if (typ, ntyp) in _COLLOCATIONS:
        t.sentbreak, t.abbr = False, True
        return
    if (t.abbr or t.ellipsis) and not initial:
        if _starts_sentence(nxt) is True:
            t.sentbreak = True
            return
        if nxt.tok[0].isupper() and ntyp in _SENT_STARTERS:
            t.sentbreak = True
            return
    if initial or typ == "##number##":
        starts = _starts_sentence(nxt, guess=initial)
        if starts is False:
            t.sentbreak, t.abbr = False, True
            return
        if (starts is None and initial and nxt.tok[0].isupper()
                and not _ortho_flags(ntyp, guess=True) & _LC):
            t.sentbreak, t.abbr = False, True


def _context_has_break(context: str) -> bool:
    # Tokenize the few words around one candidate and run both passes; a
    # break counts only if some token follows it inside the context.
    toks = [_Tok(w) for line in context.split("\n") if line.strip()
            for w in _PUNKT_WORD_RE.findall(line)]
    for t in toks:
        _first_pass(t)
    for t, nxt in zip(toks, toks[1:]):
        _second_pass(t, nxt)
        if t.sentbreak:
            return True
    return False


def _candidates(text: str):
    """Yield (match, context) for each candidate boundary; the context is the
    word before the '.?!', the mark itself and what follows it.  Candidates
    whose preceding words overlap ("acting!!!") collapse to the last one."""
    def context(word, m):
        return text[word[0]:word[1]] + m.group() + m.group("after")

    prev_word, prev_m = (0, 0), None
    for m in _PERIOD_CTX_RE.finditer(text):
        before = text[prev_word[1]:m.start()]
        ws = max((i for i, c in enumerate(before) if c in string.whitespace),
                 default=0)
        # nltk treats "whitespace at offset 0" like "no whitespace"
        start = ws + prev_word[1] + 1 if ws else prev_word[0]
        word = (start, m.start())
        if prev_m is not None and prev_word[1] <= word[0]:
            yield prev_m, context(prev_word, prev_m)
        prev_word, prev_m = word, m
    if prev_m is not None:
        yield prev_m, context(prev_word, prev_m)


def split_sentences(text: str) -> list[str]:
    """Punkt sentence split (nltk ``sent_tokenize`` semantics, English)."""
    slices, last = [], 0
    for m, ctx in _candidates(text):
        if _context_has_break(ctx):
            slices.append((last, m.end()))
            last = m.start("next") if m.group("next") else m.end()
    slices.append((last, len(text.rstrip())))
    # Realign: closing quotes/brackets after a break move to the sentence
    # before; empty sentences are dropped.
    out, shift = [], 0
    for i, (a, b) in enumerate(slices):
        a += shift
        if i + 1 == len(slices):
            if text[a:b]:
                out.append(text[a:b])
            continue
        na, nb = slices[i + 1]
        m = _REALIGN_RE.match(text[na:nb])
        if m:
            out.append(text[a:na + len(m.group(0).rstrip())])
            shift = m.end()
        else:
            shift = 0
            if text[a:b]:
                out.append(text[a:b])
    return out


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


# ----------------------------------------------------------------------------
# Treebank-style word tokenizer (nltk word_tokenize) for capital-word counts.
# Only the splits matter here: a token counts if str.isupper() is True.
# ----------------------------------------------------------------------------

_TB_STEPS = [
    # opening quotes
    (re.compile(r"([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r'^"'), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"""([ (\[{<])("|'{2})"""), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
    # punctuation
    (re.compile(r"""([^.])(\.)([\]\)}>"'»”’ ]*)\s*$"""), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
]
_TB_END_STEPS = [
    # closing quotes and clitics ('s, n't, ...) split off
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
] + [(re.compile(p), r" \1 \2 ") for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b",
    r"(?i)\b(gon)(na)\b", r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b",
    r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
    r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b")]


def treebank_words(text: str) -> list[str]:
    """Word tokens as nltk ``word_tokenize`` gives them (per Punkt sentence)."""
    out = []
    for sent in split_sentences(text):
        for rx, rep in _TB_STEPS:
            sent = rx.sub(rep, sent)
        sent = " " + sent + " "
        for rx, rep in _TB_END_STEPS:
            sent = rx.sub(rep, sent)
        out.extend(sent.split())
    return out


# ----------------------------------------------------------------------------
# Language detection (langdetect, seeded for determinism).
# ----------------------------------------------------------------------------

def _detect_language(text: str):
    """ISO code from langdetect, or None when it cannot decide."""
    import langdetect  # imported lazily: loading its profiles takes ~1 s
    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


# ----------------------------------------------------------------------------
# Checkers: check_x(text, **kwargs) -> bool, one per official instruction id.
# ----------------------------------------------------------------------------

_RELATIONS = ("less than", "at least")


def _compare(n: int, relation: str, threshold: int) -> bool:
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {_RELATIONS}, got {relation!r}")
    return n < threshold if relation == "less than" else n >= threshold


def check_keywords_existence(text, *, keywords):
    # keywords are regex patterns in the official code (not escaped)
    return all(re.search(k, text, flags=re.IGNORECASE) for k in keywords)


def check_keywords_frequency(text, *, keyword, frequency, relation):
    n = len(re.findall(keyword.strip(), text, flags=re.IGNORECASE))
    return _compare(n, relation, frequency)


def check_forbidden_words(text, *, forbidden_words):
    return not any(re.search(r"\b" + w + r"\b", text, flags=re.IGNORECASE)
                   for w in forbidden_words)


def check_letter_frequency(text, *, letter, let_frequency, let_relation):
    letter = letter.strip().lower()
    if len(letter) != 1:
        raise ValueError(f"letter must be a single character, got {letter!r}")
    return _compare(text.lower().count(letter), let_relation, let_frequency)


def check_response_language(text, *, language):
    code = _detect_language(text)
    return True if code is None else code == language


def check_number_sentences(text, *, num_sentences, relation):
    return _compare(count_sentences(text), relation, num_sentences)


def check_number_paragraphs(text, *, num_paragraphs):
    # paragraphs are separated by the markdown divider ***; an empty piece
    # is allowed only at either end
    parts = re.split(r"\s?\*\*\*\s?", text)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def check_number_words(text, *, num_words, relation):
    return _compare(count_words(text), relation, num_words)


def check_nth_paragraph_first_word(text, *, num_paragraphs, nth_paragraph,
                                   first_word):
    parts = text.split("\n\n")
    n = sum(1 for p in parts if p.strip())
    if nth_paragraph > n:
        return False
    para = parts[nth_paragraph - 1].strip()  # index into the raw split
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'").lstrip('"')
    got = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        got += ch.lower()
    return n == num_paragraphs and got == first_word.lower()


def check_number_placeholders(text, *, num_placeholders):
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def check_postscript(text, *, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pat = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pat = r"\s*p\.\s?s\..*$"
    else:
        pat = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pat, text.lower(), flags=re.MULTILINE))


def check_number_bullet_lists(text, *, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def check_constrained_response(text):
    text = text.strip()
    return any(o in text for o in
               ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def check_number_highlighted_sections(text, *, num_highlights):
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", text)
             if h.removeprefix("**").removesuffix("**").strip())
    return n >= num_highlights


def check_multiple_sections(text, *, section_spliter, num_sections):
    pat = r"\s?" + section_spliter.strip() + r"\s?\d+\s?"
    return len(re.split(pat, text)) - 1 >= num_sections


def check_json_format(text):
    text = (text.strip().removeprefix("```json").removeprefix("```Json")
            .removeprefix("```JSON").removeprefix("```").removesuffix("```")
            .strip())
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def check_title(text):
    return any(t.lstrip("<").rstrip(">").strip()
               for t in re.findall(r"<<[^\n]+>>", text))


def check_two_responses(text):
    parts = text.split("******")
    kept = []
    for i, p in enumerate(parts):
        if p.strip():
            kept.append(p)
        elif i not in (0, len(parts) - 1):
            return False
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def check_repeat_prompt(text, *, prompt_to_repeat):
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def check_end_checker(text, *, end_phrase):
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def check_capital_word_frequency(text, *, capital_frequency, capital_relation):
    n = sum(1 for w in treebank_words(text) if w.isupper())
    return _compare(n, capital_relation, capital_frequency)


def check_english_capital(text):
    if not text.isupper():
        return False
    code = _detect_language(text)
    return True if code is None else code == "en"


def check_english_lowercase(text):
    if not text.islower():
        return False
    code = _detect_language(text)
    return True if code is None else code == "en"


def check_no_comma(text):
    return "," not in text


def check_quotation(text):
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ----------------------------------------------------------------------------
# Scoring: strict, loose, summary (evaluation_lib semantics).
# ----------------------------------------------------------------------------

def loose_variants(response: str) -> list[str]:
    """The official 8 texts tried by loose scoring, in the official order."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


def _follows(iid: str, kwargs: dict, text: str) -> bool:
    if not text.strip():  # empty responses follow nothing
        return False
    try:
        fn = INSTRUCTIONS[iid]
    except KeyError:
        raise ValueError(f"unknown instruction id {iid!r}") from None
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    try:
        return bool(fn(text, **kw))
    except TypeError as e:
        raise ValueError(f"bad kwargs {kw} for instruction {iid!r}: {e}") from None


def _pairs(row: dict):
    ids = row["instruction_id_list"]
    kws = row.get("kwargs") or [{}] * len(ids)
    if len(kws) != len(ids):
        raise ValueError(f"prompt key {row.get('key')}: {len(ids)} instruction ids "
                         f"but {len(kws)} kwargs")
    return list(zip(ids, kws))


def check_strict(input_row: dict, response: str) -> list[bool]:
    return [_follows(i, kw, response) for i, kw in _pairs(input_row)]


def check_loose(input_row: dict, response: str) -> list[bool]:
    texts = loose_variants(response)
    return [any(_follows(i, kw, t) for t in texts) for i, kw in _pairs(input_row)]


def _row(inp: dict, response: str, follow: list[bool]) -> dict:
    # Same fields, same (alphabetical) order as the official output jsonl.
    return {"follow_all_instructions": all(follow),
            "follow_instruction_list": follow,
            "instruction_id_list": list(inp["instruction_id_list"]),
            "prompt": inp["prompt"],
            "response": response}


def score_responses(inputs: list[dict], responses) -> tuple[list, list, dict]:
    """Score responses ({prompt: response} or rows with prompt/response).

    Returns (strict_rows, loose_rows, summary); the rows follow the order of
    ``inputs``.  A prompt without a response is scored as ''."""
    if not isinstance(responses, dict):
        responses = {r["prompt"]: r["response"] for r in responses}
    strict, loose = [], []
    missing = 0
    for inp in inputs:
        resp = responses.get(inp["prompt"])
        if resp is None:
            missing, resp = missing + 1, ""
        strict.append(_row(inp, resp, check_strict(inp, resp)))
        loose.append(_row(inp, resp, check_loose(inp, resp)))
    return strict, loose, summarize(strict, loose, missing=missing)


def summarize(strict_rows: list, loose_rows: list, missing: int = 0) -> dict:
    def acc(rows):
        n_p = len(rows)
        n_i = sum(len(r["follow_instruction_list"]) for r in rows)
        c_p = sum(bool(r["follow_all_instructions"]) for r in rows)
        c_i = sum(sum(r["follow_instruction_list"]) for r in rows)
        # 0.0 rather than NaN on an empty set of prompts
        return c_p, c_i, n_p, n_i, (c_p / n_p if n_p else 0.0), (c_i / n_i if n_i else 0.0)

    sp, si, n_p, n_i, sp_acc, si_acc = acc(strict_rows)
    lp, li, _, _, lp_acc, li_acc = acc(loose_rows)
    per_id = collections.defaultdict(lambda: [0, 0, 0])  # strict ok, loose ok, total
    for s, l in zip(strict_rows, loose_rows):
        for iid, a, b in zip(s["instruction_id_list"], s["follow_instruction_list"],
                             l["follow_instruction_list"]):
            per_id[iid][0] += a
            per_id[iid][1] += b
            per_id[iid][2] += 1
    return {
        "prompt_level_strict_acc": sp_acc,
        "inst_level_strict_acc": si_acc,
        "prompt_level_loose_acc": lp_acc,
        "inst_level_loose_acc": li_acc,
        "counts": {"prompts": n_p, "instructions": n_i, "missing_responses": missing,
                   "prompt_strict_correct": sp, "inst_strict_correct": si,
                   "prompt_loose_correct": lp, "inst_loose_correct": li},
        "per_instruction": {k: {"strict": v[0] / v[2], "loose": v[1] / v[2], "n": v[2]}
                            for k, v in sorted(per_id.items())},
    }


# ----------------------------------------------------------------------------
# I/O
# ----------------------------------------------------------------------------

def load_inputs(path: str) -> list[dict]:
    """Official input_data.jsonl rows: key, prompt, instruction_id_list, kwargs."""
    rows = read_jsonl(path, "IFEval inputs")
    for n, r in enumerate(rows, 1):
        for k, kind in (("prompt", str), ("instruction_id_list", list), ("kwargs", list)):
            if k not in r:
                raise ValueError(f"{path}: row {n} has no {k!r}")
            if not isinstance(r[k], kind):
                raise ValueError(f"{path}: row {n}: {k!r} must be a {kind.__name__}, got {type(r[k]).__name__}")
        if not all(isinstance(kw, dict) for kw in r["kwargs"]):
            raise ValueError(f"{path}: row {n}: 'kwargs' must be a list of objects")
        if len(r["kwargs"]) != len(r["instruction_id_list"]):
            raise ValueError(f"{path}: row {n} has {len(r['instruction_id_list'])} "
                             f"instruction ids but {len(r['kwargs'])} kwargs")
        for iid in r["instruction_id_list"]:
            if iid not in INSTRUCTIONS:
                raise ValueError(f"{path}: row {n} has unknown instruction id {iid!r}")
    return rows


def load_responses(path: str) -> dict:
    """{prompt: response} from jsonl lines with 'prompt' and 'response'
    (a repeated prompt keeps its last response, as in the official reader)."""
    out = {}
    for n, r in enumerate(read_jsonl(path, "IFEval responses"), 1):
        if "prompt" not in r or "response" not in r:
            raise ValueError(f"{path}: row {n} needs 'prompt' and 'response'")
        if not isinstance(r["prompt"], str) or not isinstance(r["response"], (str, type(None))):
            raise ValueError(f"{path}: row {n}: 'prompt' and 'response' must be strings")
        out[r["prompt"]] = r["response"] if r["response"] is not None else ""
    return out


def _atomic_write_jsonl(path: str, rows: list[dict]) -> None:
    from common import atomic_write  # the project's one atomic writer (temp file + os.replace)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_results(out_dir: str, strict_rows: list, loose_rows: list) -> tuple[str, str]:
    """Write DIR/ifeval_results_strict.jsonl and DIR/ifeval_results_loose.jsonl
    atomically (temp file in DIR + os.replace); returns the two paths."""
    if not out_dir:
        raise ValueError("out_dir must be a directory path, got an empty string")
    os.makedirs(out_dir, exist_ok=True)
    paths = (os.path.join(out_dir, "ifeval_results_strict.jsonl"),
             os.path.join(out_dir, "ifeval_results_loose.jsonl"))
    _atomic_write_jsonl(paths[0], strict_rows)
    _atomic_write_jsonl(paths[1], loose_rows)
    return paths


def main(argv=None) -> dict:
    from common import ArgumentParser
    ap = ArgumentParser(prog="ifeval.py", description="Score IFEval responses.")
    ap.add_argument("--inputs", required=True, help="official input_data.jsonl")
    ap.add_argument("--responses", required=True, help="jsonl with prompt, response")
    ap.add_argument("--out", required=True, help="output directory")
    a = ap.parse_args(argv)
    try:  # a bad file: one line naming it (the readers' messages name the file and the row)
        strict, loose, summary = score_responses(load_inputs(a.inputs), load_responses(a.responses))
        write_results(a.out, strict, loose)
    except (OSError, ValueError, UserError) as e:
        ap.error(str(e))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_instruction"}))
    return summary


# ----------------------------------------------------------------------------
# Registry: official instruction id -> checker.
# ----------------------------------------------------------------------------

INSTRUCTIONS = {
    "keywords:existence": check_keywords_existence,
    "keywords:frequency": check_keywords_frequency,
    "keywords:forbidden_words": check_forbidden_words,
    "keywords:letter_frequency": check_letter_frequency,
    "language:response_language": check_response_language,
    "length_constraints:number_sentences": check_number_sentences,
    "length_constraints:number_paragraphs": check_number_paragraphs,
    "length_constraints:number_words": check_number_words,
    "length_constraints:nth_paragraph_first_word": check_nth_paragraph_first_word,
    "detectable_content:number_placeholders": check_number_placeholders,
    "detectable_content:postscript": check_postscript,
    "detectable_format:number_bullet_lists": check_number_bullet_lists,
    "detectable_format:constrained_response": check_constrained_response,
    "detectable_format:number_highlighted_sections": check_number_highlighted_sections,
    "detectable_format:multiple_sections": check_multiple_sections,
    "detectable_format:json_format": check_json_format,
    "detectable_format:title": check_title,
    "combination:two_responses": check_two_responses,
    "combination:repeat_prompt": check_repeat_prompt,
    "startend:end_checker": check_end_checker,
    "change_case:capital_word_frequency": check_capital_word_frequency,
    "change_case:english_capital": check_english_capital,
    "change_case:english_lowercase": check_english_lowercase,
    "punctuation:no_comma": check_no_comma,
    "startend:quotation": check_quotation,
}

if __name__ == "__main__":
    main()
