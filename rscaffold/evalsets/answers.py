"""Final-answer extraction and checking for every benchmark answer type.

Three answer types cover the five benchmarks:

``math``   (GSM8K, MATH-500): a number or a LaTeX expression. Extraction prefers the last
           ``\\boxed{...}``, then an anchor ("The answer is X", "Answer: X", "#### X"), then the
           last number in the text. Checking uses ``math_verify`` so that ``\\frac{1}{2}``, ``0.5``
           and ``1/2`` agree, with fast exact paths for plain numbers and a numeric fallback.
``yesno``  (StrategyQA): ``"yes"`` / ``"no"``.
``choice`` (CommonsenseQA, TruthfulQA MC): an option letter ``"A"``, ``"B"``, ...
``text``   (a user's own problems with short free-text answers): the text after "The answer is"
           (else in the last ``\boxed{}``, else the last line), compared after lower-casing and
           removing punctuation, articles and extra spaces (SQuAD's exact-match normalisation).

math_verify runs in a helper process (:mod:`rscaffold.evalsets.verify_worker`), so a slow or
hanging comparison is bounded and safe from any thread.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

from rscaffold.evalsets import verify_worker

logger = logging.getLogger(__name__)

AnswerType = Literal["math", "yesno", "choice", "text"]
ANSWER_TYPES: tuple[str, ...] = get_args(AnswerType)

DEFAULT_VERIFY_TIMEOUT_S = 5.0
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}")


# =============================================================================================
# multiple-choice layout (shared by the loaders and by extraction)

_CHOICE_LINE = re.compile(r"^([A-Z])\. (.*)$")


def format_choice_question(question: str, options: Sequence[str]) -> str:
    """The standard layout: the question, then one ``"A. option"`` line per option."""
    if not options:
        raise ValueError("a multiple-choice question needs at least one option")
    if len(options) > len(_LETTERS):
        raise ValueError(f"at most {len(_LETTERS)} options are supported, got {len(options)}")
    lines = [question.strip()]
    lines += [f"{_LETTERS[i]}. {' '.join(str(opt).split())}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def choice_options(question: str) -> list[str]:
    """The options of a question laid out by :func:`format_choice_question` (``[]`` if none).

    Reads the trailing block of ``"A. ..."``, ``"B. ..."`` lines, which must start at ``A`` and run
    in order.
    """
    lines = question.rstrip().splitlines()
    found: list[str] = []
    for line in reversed(lines):
        m = _CHOICE_LINE.match(line)
        if not m:
            break
        found.append(m.group(2))
        if m.group(1) == "A":
            break
    found.reverse()
    letters = [ln[0] for ln in lines[len(lines) - len(found) :]]
    if not found or letters != list(_LETTERS[: len(found)]):
        return []
    return found


# =============================================================================================
# extraction: math


def find_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in order, honouring nested braces.

    An unbalanced box (a truncated output) is skipped.
    """
    out: list[str] = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 1
        i = m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\":  # skip escaped characters such as \{ and \}
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1].strip())
    return out


_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_MATH_ANCHOR = re.compile(
    r"(?:\banswer\b\s*(?:is\b|:|=)\s*:?|####)[ \t]*(?P<ans>[^\n]+)",
    re.IGNORECASE,
)
# number (optionally with currency, percent) followed by nothing but words: units to drop
_NUMBER_WITH_UNITS = re.compile(
    rf"^(?:\\?\$|€|£)?\s*(?P<num>(?:{_NUM})(?:/\d+)?)(?:\s*(?:\\?%|percent\b))?(?:\s+(?P<rest>[A-Za-z]{{2,}}[A-Za-z\s'’.-]*))?$"
)
_LAST_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\s+(?:because|since|as)\s")


def _strip_markdown(text: str) -> str:
    return text.replace("**", "").replace("__", "").replace("\u2212", "-")


def _cut_math_span(s: str) -> str:
    """If ``s`` starts with inline math (``$...$``, ``\\(...\\)``, ``\\[...\\]``), return its body."""
    s = s.strip()
    for open_, close in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(open_):
            end = s.find(close, len(open_))
            if end > len(open_):
                return s[len(open_) : end]
            if open_ == "$":  # a currency sign, not math: "$18."
                return s[1:]
    return s


def _clean_number(s: str) -> str:
    s = s.strip().rstrip(".,;:")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def clean_math_answer(ans: str) -> str:
    """Normalise an extracted math answer: math delimiters, currency, trailing period, thousands
    separators, trailing unit words ("18 dollars" -> "18"), "x = 5" -> "5"."""
    s = _cut_math_span(_strip_markdown(ans)).strip()
    # strip surrounding quotes / trailing punctuation
    s = s.strip("\"'`“”").strip()
    s = re.sub(r"(?:\\[,;!]|\s)+$", "", s)
    s = s.rstrip(".,;:!")
    s = s.strip()
    # "x = 5" or "18 + 2 = 20": the right-hand side, when it is a plain number and the left-hand
    # side a single variable or plain arithmetic (an equation such as "5x - 7y + 4 = 0" is kept)
    if s.count("=") == 1 and "," not in s:
        lhs, rhs = (part.strip() for part in s.split("="))
        single_var = re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+", lhs)
        # no letter outside LaTeX commands such as \times or \frac
        arithmetic = re.search(r"\d", lhs) and not re.search(r"(?<![\\A-Za-z])[A-Za-z]", lhs)
        if (single_var or arithmetic) and re.fullmatch(rf"(?:\\?\$)?\s*(?:{_NUM})", rhs):
            s = rhs
    # a number followed only by unit words, possibly wrapped in \text{...}
    plain = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r" \1", s).strip()
    plain = plain.replace("\\ ", " ").replace("\\,", "").replace("\\!", "")
    m = _NUMBER_WITH_UNITS.match(plain)
    if m:
        return _clean_number(m.group("num"))
    if s.startswith("\\$"):
        s = s[2:].strip()
    return _clean_number(s)


def _is_number(ans: str) -> bool:
    """Whether a cleaned math answer is a number (integer, decimal, fraction; signs and LaTeX
    fractions allowed): what a numeric benchmark (GSM8K) accepts as an answer."""
    return _plain_number(ans) is not None


def _extract_math(text: str, numeric: bool = False) -> str | None:
    text = _strip_markdown(text)
    boxed = [b for b in find_boxed(text) if b]
    if boxed:
        ans = clean_math_answer(boxed[-1]) or None
        if ans is not None and (not numeric or _is_number(ans)):
            return ans
    anchors = list(_MATH_ANCHOR.finditer(text))
    for m in reversed(anchors):
        raw = m.group("ans").strip()
        # keep a leading math span whole; otherwise stop at the end of the sentence
        body = raw
        if not raw.startswith(("$", "\\(", "\\[")):
            cut = _SENTENCE_END.search(raw)
            if cut:
                body = raw[: cut.start()]
        ans = clean_math_answer(body)
        if ans and (not numeric or _is_number(ans)):
            return ans
    # No anchor (or, for a numeric benchmark, no anchor that states a number, such as a copied
    # placeholder "The answer is N."): the last number in the text.
    numbers = _LAST_NUMBER.findall(text)
    for num in reversed(numbers):
        num = num.rstrip(",")
        if "," in num and not _THOUSANDS.match(num.split("/")[0]):
            num = num.rsplit(",", 1)[1]  # "3,5" is a list, not a thousands number
        num = _clean_number(num)
        if num and num != "-":
            return num
    return None


# =============================================================================================
# extraction: yes / no

_YESNO_WORD = r"(yes|no|true|false)"
_YESNO_ANCHOR = re.compile(rf"\banswer\b\s*(?:is\b|:|=)\s*:?\s*[\"'“(\[]*\s*{_YESNO_WORD}\b", re.IGNORECASE)
_YESNO_ANY = re.compile(rf"\b{_YESNO_WORD}\b", re.IGNORECASE)
_YESNO_MAP = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def _last_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            return line.strip()
    return ""


# A bare verdict: yes/no/true/false not followed by a word ("No, because ...", "so, yes.",
# "The claim is false."), so that a determiner ("There is no evidence ...", "no one") is not one.
_YESNO_VERDICT = re.compile(rf"\b{_YESNO_WORD}\b(?![ \t]*[\w'’-])", re.IGNORECASE)


def _extract_yesno(text: str) -> str | None:
    text = _strip_markdown(text)
    boxed = find_boxed(text)
    if boxed:
        words = _YESNO_ANY.findall(re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", boxed[-1]))
        if words:
            return _YESNO_MAP[words[-1].lower()]
    anchors = _YESNO_ANCHOR.findall(text)
    if anchors:
        return _YESNO_MAP[anchors[-1].lower()]
    words = _YESNO_VERDICT.findall(_last_line(text))
    if words:
        return _YESNO_MAP[words[-1].lower()]
    m = re.match(rf"\s*{_YESNO_WORD}\b(?![ \t]*[\w'’-])", text, re.IGNORECASE)  # "Yes. Because ..."
    if m:
        return _YESNO_MAP[m.group(1).lower()]
    return None


# =============================================================================================
# extraction: multiple choice


def _letter_class(n_options: int | None) -> str:
    letters = _LETTERS[:n_options] if n_options else _LETTERS
    return f"[{letters}]"


def _extract_choice(text: str, options: Sequence[str] | None) -> str | None:
    text = _strip_markdown(text)
    n = len(options) if options else None
    up = _letter_class(n)
    low = up.lower()
    # a letter: uppercase, or any case inside parentheses/brackets
    letter = rf"(?:[(\[]\s*(?P<p>{up}|{low})\s*[)\]]|(?P<u>{up})(?![\w'’]))"

    def pick(m: re.Match[str]) -> str:
        groups = m.groupdict()
        return next(groups[k] for k in ("p", "u", "l") if groups.get(k)).upper()

    boxed = find_boxed(text)
    if boxed:
        b = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", boxed[-1]).strip()
        m = re.fullmatch(rf"\s*(?:{letter})\s*[.)]?.*", b, re.DOTALL)
        if m:
            return pick(m)
    # keywords in any case, letters as described above
    # (after "answer is", a lone lower-case letter ending the line counts too: "answer: b")
    anchor = re.compile(
        rf"(?:\b(?i:answer)\b\s*(?i:is\b|:|=)\s*:?\s*(?:(?i:option|choice)\s*)?|\b(?i:option|choice)\s+)"
        rf"(?:{letter}|(?P<l>{low})(?=\s*[.!]?\s*$))",
        re.MULTILINE,
    )
    hits = list(anchor.finditer(text))
    if hits:
        return pick(hits[-1])

    last = _last_line(text)
    # a lone letter, "(C) bank", "C. bank", "C) bank", "C: bank"
    m = re.match(rf"^(?:{letter})\s*(?:[.):]|$)", last)
    if m:
        return pick(m)
    paren = list(re.finditer(rf"[(\[]\s*(?P<p>{up})\s*[)\]]", last))
    if paren:
        return paren[-1].group("p")

    if options:
        for scope in (last, text):
            best: tuple[int, int, int] | None = None  # (end, length, index)
            for i, opt in enumerate(options):
                opt = " ".join(str(opt).split()).rstrip(".")
                if not opt:
                    continue
                pat = re.compile(rf"(?<!\w){re.escape(opt)}(?!\w)", re.IGNORECASE)
                for hit in pat.finditer(scope):
                    cand = (hit.end(), len(opt), i)
                    if best is None or cand[:2] > best[:2]:
                        best = cand
            if best is not None:
                return _LETTERS[best[2]]
    return None


# =============================================================================================
# extraction: free text

_TEXT_ANCHOR = re.compile(r"\banswer\b\s*(?:is\b|:|=)\s*:?[ \t]*(?P<ans>[^\n]+)", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def _extract_text(text: str) -> str | None:
    text = _strip_markdown(text)
    boxed = find_boxed(text)
    if boxed:
        answer = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", boxed[-1])
    else:
        hits = list(_TEXT_ANCHOR.finditer(text))
        answer = hits[-1].group("ans") if hits else _last_line(text)
        answer = _SENTENCE_END.split(answer, maxsplit=1)[0]
    answer = answer.strip().strip("\"'“”‘’`.,;:!").strip()
    return answer or None


def normalize_text(value: str) -> str:
    """Lower case, without punctuation, articles and extra spaces (SQuAD's exact-match normalisation)."""
    v = _PUNCT.sub(" ", value.lower())
    return " ".join(_ARTICLES.sub(" ", v).split())


# =============================================================================================
# public extraction API


def extract_answer(
    text: str | None, answer_type: str, options: Sequence[str] | None = None, *, numeric: bool = False
) -> str | None:
    """The final answer in a model output, normalised; ``None`` when none can be found.

    ``math``: a number or LaTeX expression (``"18"``, ``"\\frac{1}{2}"``); with ``numeric`` (a
    benchmark whose answers are numbers, GSM8K) a boxed or anchored answer that is not a number
    (a copied placeholder: "The answer is N.") does not count, and the last number in the text
    is taken instead, for every model alike. ``yesno``: ``"yes"`` / ``"no"`` (outside an anchor
    only a bare verdict counts: "There is no evidence" is not "no"). ``choice``: an upper-case
    letter; pass the option texts (A first) so that an answer given as an option's text is
    recognised, and letters outside the options are ignored.
    ``text``: the short answer as written (compare with :func:`normalize_text`).
    """
    _check_type(answer_type)
    if not text or not text.strip():
        return None
    if answer_type == "math":
        return _extract_math(text, numeric)
    if answer_type == "yesno":
        return _extract_yesno(text)
    if answer_type == "text":
        return _extract_text(text)
    return _extract_choice(text, options)


# =============================================================================================
# checking


def normalize_yesno(value: str) -> str | None:
    v = value.strip().strip(".!\"'()").strip().lower()
    return _YESNO_MAP.get(v)


def normalize_choice(value: str) -> str | None:
    v = value.strip().strip(".:)(][ ").strip()
    if len(v) == 1 and v.upper() in _LETTERS:
        return v.upper()
    return None


def _normalize_math_string(s: str) -> str:
    s = s.strip()
    if s.startswith("$") and s.endswith("$") and len(s) > 1:
        s = s.strip("$")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


_PLAIN_NUMBER = re.compile(
    r"^(?P<sign>-?)(?:(?P<dec>\d+(?:\.\d*)?|\.\d+)|(?P<a>\d+)/(?P<b>\d+)|\\frac\{(?P<fa>\d+)\}\{(?P<fb>\d+)\})$"
)


def _plain_number(s: str) -> Fraction | None:
    """An exact value for a plain number: integer, decimal, ``a/b`` or ``\\frac{a}{b}``."""
    s = _normalize_math_string(s).lstrip("+")
    s = s.replace("\\$", "").lstrip("$")
    if s.startswith("\\frac{-"):
        s = "-" + s.replace("\\frac{-", "\\frac{", 1)
    m = _PLAIN_NUMBER.match(s)
    if not m:
        return None
    sign = -1 if m.group("sign") else 1
    try:
        if m.group("dec") is not None:
            return sign * Fraction(m.group("dec"))
        a, b = (m.group("a"), m.group("b")) if m.group("a") is not None else (m.group("fa"), m.group("fb"))
        if int(b) == 0:
            return None
        return sign * Fraction(int(a), int(b))
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_equal(p: Fraction, g: Fraction) -> bool:
    if p == g:
        return True
    if p.denominator == 1 and g.denominator == 1:
        return False  # integers must match exactly, however large
    return abs(p - g) <= 1e-6 * max(1.0, abs(float(g)))


def _loose_float(s: str) -> float | None:
    try:
        return float(_normalize_math_string(s).replace("\\$", "").lstrip("$"))
    except ValueError:
        return None


def is_correct(
    predicted: str | None,
    gold: str,
    answer_type: str,
    *,
    timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
) -> bool:
    """Whether an extracted answer matches the gold answer. ``None`` is never correct.

    ``math``: equal strings (after light LaTeX normalisation) and equal plain numbers are decided
    directly (integers exactly, other numbers to 1e-6 relative); everything else goes to
    math_verify (gold parsed as gold, as its asymmetric ``verify(gold, target)`` expects), which
    never takes longer than about ``timeout_s`` and is safe in any thread; if math_verify can
    parse neither side, numbers are compared as floats.
    """
    _check_type(answer_type)
    if predicted is None or not str(predicted).strip():
        return False
    predicted = str(predicted)
    if answer_type == "yesno":
        p = normalize_yesno(predicted)
        return p is not None and p == normalize_yesno(gold)
    if answer_type == "choice":
        p = normalize_choice(predicted)
        return p is not None and p == normalize_choice(gold)
    if answer_type == "text":
        p = normalize_text(predicted)
        return bool(p) and p == normalize_text(gold)

    # math
    if _normalize_math_string(predicted) == _normalize_math_string(gold):
        return True
    pn, gn = _plain_number(predicted), _plain_number(gold)
    if pn is not None and gn is not None:
        return _numbers_equal(pn, gn)
    verdict = _math_verify(gold, predicted, timeout_s)
    if verdict is not None:
        return verdict
    pf, gf = _loose_float(predicted), _loose_float(gold)
    if pf is not None and gf is not None and math.isfinite(pf) and math.isfinite(gf):
        return math.isclose(pf, gf, rel_tol=1e-6, abs_tol=1e-9)
    return False


@dataclass(frozen=True)
class AnswerCheck:
    predicted: str | None
    correct: bool

    @property
    def parsed(self) -> bool:
        return self.predicted is not None


def check_answer(
    text: str | None,
    gold: str,
    answer_type: str,
    *,
    options: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
    numeric: bool = False,
) -> AnswerCheck:
    """Extract the answer from a model output and check it: ``AnswerCheck(predicted, correct)``."""
    predicted = extract_answer(text, answer_type, options=options, numeric=numeric)
    return AnswerCheck(predicted, is_correct(predicted, gold, answer_type, timeout_s=timeout_s))


def _math_verify(gold: str, predicted: str, timeout_s: float) -> bool | None:
    return verify_worker.compare(gold, predicted, timeout_s)
