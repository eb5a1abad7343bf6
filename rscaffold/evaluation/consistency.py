"""Consistency checks: a cheap heuristic check that a stated final answer agrees with the reasoning before it.

- *math* (GSM8K, MATH-500): only outputs that *state* a final answer (``\\boxed{}``, "the answer
  is", "Answer:", "####") are checked. The reasoning before that statement is searched for
  computations ``a op b = c`` (``+ - * / ^``, ``×``, ``÷``, ``\\times``, ``\\cdot``, "3 x 4"; chains
  ``a + b = c + d = e`` give ``e``). The answer is consistent when it equals the result of the
  last computation, or, when numbers follow that computation before the answer (a result said
  in words: "... so 16 are left"), the last of those numbers. Without any computation the last
  number before the answer statement is compared (``math_last_number``); an answer written
  right after ``=`` is the result of that computation (``math_answer_is_result``). No number
  before the answer: not checked.
- *yes/no* (StrategyQA): the output is inconsistent when an explicit verdict anywhere in it has
  the opposite polarity of the extracted answer. Verdicts are "the answer is yes/no" (and
  "Answer:"), ``\\boxed{yes}``, a line starting with "Yes," / "No." (followed by punctuation, so
  "No one ..." is not one), and "so / therefore / thus / hence, yes/no" followed by
  punctuation; true/false count as yes/no. Negated sentences ("X is not Y") are not
  interpreted, so the check catches flip-flopping verdicts, not every contradiction.
- *multiple choice*: not checked (``consistent`` is None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rscaffold.evalsets.answers import is_correct


@dataclass(frozen=True)
class Consistency:
    """Outcome of :func:`check_consistency`. ``consistent`` None: not checked (``evidence`` says why)."""

    consistent: bool | None
    check: str | None = None
    evidence: str | None = None


_ANSWER_STATEMENT = re.compile(r"\\(?:boxed|fbox)\s*\{|\banswer\b\s*(?:is\b|:|=)|####", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?![\w])|(?<![\w.])-?\.\d+")
_RESULT = re.compile(r"\s*(-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+)(?![\d,]*\d)")
_FOLLOWED_BY_OPERATOR = re.compile(r"\s*[-+*/^]\s*\(?\s*\.?\d")
_OPERATION = re.compile(r"\d\s*\)?\s*[-+*/^]\s*\(?\s*-?\.?\d")
_ARITH_CHARS = set("0123456789.,+-*/^() \t%")


def _normalise_math_text(text: str) -> str:
    t = text.replace("**", "").replace("\u2212", "-").replace("×", "*").replace("÷", "/").replace("·", "*")
    t = re.sub(r"\\(?:times|cdot|ast)\b", "*", t)
    t = re.sub(r"\\div\b", "/", t)
    t = re.sub(r"\\(?:left|right)\b", "", t)
    t = re.sub(r"\\[()\[\]]", " ", t)
    t = t.replace("\\$", "").replace("$", "").replace("\\,", "").replace("\\!", "")
    t = re.sub(r"(?<=\d)\s*[xX]\s*(?=\d)", " * ", t)
    return t


def _computations(body: str) -> list[tuple[str, str, int]]:
    """``(expression, result, end offset)`` of every ``a op b = c`` in ``body``, in order."""
    out = []
    for m in re.finditer(r"=", body):
        j = m.start()
        while j > 0 and body[j - 1] in _ARITH_CHARS:
            j -= 1
        lhs = re.split(r"[.,]\s+", body[j : m.start()])[-1]  # "20. 20 - 4 =": a sentence ended
        if not _OPERATION.search(lhs):
            continue
        r = _RESULT.match(body, m.end())
        if not r or _FOLLOWED_BY_OPERATOR.match(body, r.end()):
            continue  # "= 3 + 4 = 7": the result is the last link of the chain
        out.append((f"{lhs.strip()} = {r.group(1)}", r.group(1).replace(",", ""), r.end()))
    return out


def _same_number(a: str, b: str) -> bool:
    return is_correct(a, b, "math")


def check_math_consistency(output: str, predicted: str | None) -> Consistency:
    """Does the stated final answer equal the last computed result before it? (module docstring)"""
    if predicted is None:
        return Consistency(None, None, "no answer extracted")
    text = _normalise_math_text(output)
    statements = list(_ANSWER_STATEMENT.finditer(text))
    if not statements:
        return Consistency(None, None, "no stated final answer")
    body = text[: statements[-1].start()]
    if re.search(r"=\s*(?:the\s+)?$", body, re.IGNORECASE):
        line = body.rstrip().rsplit("\n", 1)[-1].strip()
        return Consistency(True, "math_answer_is_result", f"{line} {predicted}".strip())
    comps = _computations(body)
    if comps:
        expr, result, end = comps[-1]
        candidates = [result]
        later = _NUMBER.findall(body[end:])
        if later:
            candidates.append(later[-1].replace(",", ""))
        ok = any(_same_number(predicted, c) for c in candidates)
        evidence = expr if len(candidates) == 1 else f"{expr}; then {candidates[1]}"
        return Consistency(ok, "math_equation", evidence)
    numbers = _NUMBER.findall(body)
    if not numbers:
        return Consistency(None, None, "no number before the answer")
    last = numbers[-1].replace(",", "")
    return Consistency(_same_number(predicted, last), "math_last_number", last)


_POLARITY = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_VERDICTS = (
    re.compile(r"\banswer\b\s*(?:is\b|:|=)\s*:?\s*[\"'“(\[]*\s*(yes|no|true|false)\b", re.IGNORECASE),
    re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{)?\s*(yes|no|true|false)\b", re.IGNORECASE),
    re.compile(r"^[\s\"'“]*(yes|no)\s*[,.!:;]", re.IGNORECASE | re.MULTILINE),
    re.compile(r"\b(?:so|therefore|thus|hence)\s*,?\s*(yes|no)\s*[,.!]", re.IGNORECASE),
)


def yesno_verdicts(output: str) -> list[tuple[int, str, str]]:
    """Explicit yes/no verdicts in an output: ``(offset, polarity, matched text)``, in order."""
    text = output.replace("**", "")
    found: dict[int, tuple[int, str, str]] = {}
    for pattern in _VERDICTS:
        for m in pattern.finditer(text):
            found.setdefault(m.start(1), (m.start(1), _POLARITY[m.group(1).lower()], m.group(0).strip()))
    return sorted(found.values())


def check_polarity_consistency(output: str, predicted: str | None) -> Consistency:
    """No explicit verdict in the output has the opposite polarity of the answer (module docstring)."""
    if predicted not in ("yes", "no"):
        return Consistency(None, None, "no answer extracted")
    against = [v for v in yesno_verdicts(output) if v[1] != predicted]
    if against:
        return Consistency(False, "yesno_polarity", f"{against[0][2]!r} vs answer {predicted}")
    return Consistency(True, "yesno_polarity", None)


def check_consistency(output: str, predicted: str | None, answer_type: str) -> Consistency:
    """The consistency check of an answer type (see the module docstring); choice: not checked."""
    if answer_type == "math":
        return check_math_consistency(output, predicted)
    if answer_type == "yesno":
        return check_polarity_consistency(output, predicted)
    return Consistency(None, None, "not checked for this answer type")
