"""Final-answer extraction and checking for every benchmark answer type.

Three answer types cover the five benchmarks:

``math``   (GSM8K, MATH-500): a number or a LaTeX expression. Extraction prefers the last
           ``\\boxed{...}``, then an anchor ("The answer is X", "Answer: X", "#### X"), then the
           last number in the text. Checking uses ``math_verify`` so that ``\\frac{1}{2}``, ``0.5``
           and ``1/2`` agree, with fast exact paths for plain numbers and a numeric fallback.
``yesno``  (StrategyQA): ``"yes"`` / ``"no"``.
``choice`` (CommonsenseQA, TruthfulQA MC): an option letter ``"A"``, ``"B"``, ...

math_verify and threads
-----------------------
math_verify's own timeouts use ``signal.alarm``, which raises ``ValueError`` outside the main
thread (Prefect runs tasks in worker threads), and which would also cancel any other SIGALRM timer
of the process (pytest-timeout, for one). Without a timeout, however, sympy can hang for good on an
answer such as ``9^{9^{9}}``. So math_verify runs in a small helper process (this file, started as
a script with ``sys.executable``), where its signal timeouts are safe because they run in that
process's main thread; the calling side enforces a hard deadline and kills and restarts the helper
when it is exceeded. Calls are serialised by a lock, so :func:`is_correct` is safe from any thread.
Plain numbers and identical strings never reach math_verify. If the helper cannot be started,
math_verify runs in-process with its timeouts disabled (and a warning is logged once).

This module must stay importable without the rest of rscaffold (it is the helper's entry point).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Literal, get_args

logger = logging.getLogger(__name__)

AnswerType = Literal["math", "yesno", "choice"]
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
    letters = [ln[0] for ln in lines[len(lines) - len(found):]]
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


def _extract_math(text: str) -> str | None:
    text = _strip_markdown(text)
    boxed = [b for b in find_boxed(text) if b]
    if boxed:
        return clean_math_answer(boxed[-1]) or None
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
        if ans:
            return ans
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
_YESNO_ANCHOR = re.compile(
    rf"\banswer\b\s*(?:is\b|:|=)\s*:?\s*[\"'“(\[]*\s*{_YESNO_WORD}\b", re.IGNORECASE
)
_YESNO_ANY = re.compile(rf"\b{_YESNO_WORD}\b", re.IGNORECASE)
_YESNO_MAP = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def _last_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            return line.strip()
    return ""


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
    words = _YESNO_ANY.findall(_last_line(text))
    if words:
        return _YESNO_MAP[words[-1].lower()]
    m = re.match(rf"\s*{_YESNO_WORD}\b", text, re.IGNORECASE)  # "Yes. Because ..."
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
# public extraction API


def extract_answer(text: str | None, answer_type: str, options: Sequence[str] | None = None) -> str | None:
    """The final answer in a model output, normalised; ``None`` when none can be found.

    ``math``: a number or LaTeX expression (``"18"``, ``"\\frac{1}{2}"``). ``yesno``: ``"yes"`` /
    ``"no"``. ``choice``: an upper-case letter; pass the option texts (A first) so that an answer
    given as an option's text is recognised, and letters outside the options are ignored.
    """
    _check_type(answer_type)
    if not text or not text.strip():
        return None
    if answer_type == "math":
        return _extract_math(text)
    if answer_type == "yesno":
        return _extract_yesno(text)
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


_PLAIN_NUMBER = re.compile(r"^(?P<sign>-?)(?:(?P<dec>\d+(?:\.\d*)?|\.\d+)|(?P<a>\d+)/(?P<b>\d+)|\\frac\{(?P<fa>\d+)\}\{(?P<fb>\d+)\})$")


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
    options: Sequence[str] | None = None,
    *,
    timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
) -> AnswerCheck:
    """Extract the answer from a model output and check it: ``AnswerCheck(predicted, correct)``."""
    predicted = extract_answer(text, answer_type, options=options)
    return AnswerCheck(predicted, is_correct(predicted, gold, answer_type, timeout_s=timeout_s))


# =============================================================================================
# math_verify, isolated in a helper process


def _as_latex(s: str) -> str:
    s = s.strip()
    if "\\boxed" in s or (s.startswith("$") and s.endswith("$") and len(s) > 1):
        return s
    return f"${s}$"


def _verify_direct(gold: str, predicted: str, timeout: int | None) -> bool | None:
    """math_verify on two answers; ``None`` when it can parse neither of them to a comparable value.

    ``timeout`` (seconds) uses math_verify's signal alarm and is only valid in a main thread.
    """
    from math_verify import parse, verify

    g = parse(_as_latex(gold), parsing_timeout=timeout)
    p = parse(_as_latex(predicted), parsing_timeout=timeout)
    if not g or not p:
        return None
    return bool(verify(g, p, timeout_seconds=timeout))


class _NoTimeoutWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


class _MathVerifyWorker:
    """One helper process running math_verify; requests are serialised by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._broken: str | None = None  # why the helper cannot be used (fall back in-process)
        self.restarts = 0

    # -- process management ---------------------------------------------------------------
    def _start(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--math-verify-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            encoding="utf-8",
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: IO[str]) -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, args=(proc.stdout,), daemon=True, name="math-verify-reader").start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            first = None
        msg = json.loads(first) if first else {"error": "no answer from the helper process"}
        if not msg.get("ready"):
            self._kill(proc)
            raise RuntimeError(str(msg.get("error")))
        self._proc, self._lines = proc, lines

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        try:
            proc.kill()
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - best effort
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None

    # -- requests --------------------------------------------------------------------------
    def compare(self, gold: str, predicted: str, timeout_s: float) -> bool | None:
        with self._lock:
            if self._broken is None and self._proc is None:
                try:
                    self._start()
                except Exception as err:  # noqa: BLE001
                    self._broken = f"{type(err).__name__}: {err}"
                    for name in ("math_verify.parser", "math_verify.grader"):
                        logging.getLogger(name).addFilter(_NoTimeoutWarningFilter())
                    logger.warning(
                        "cannot start the math_verify helper process (%s); running math_verify "
                        "in-process without timeouts",
                        self._broken,
                    )
            if self._broken is not None:
                return _verify_direct(gold, predicted, None)
            return self._request(gold, predicted, timeout_s)

    def _request(self, gold: str, predicted: str, timeout_s: float) -> bool | None:
        assert self._proc is not None and self._proc.stdin is not None
        inner = max(1, int(timeout_s / 2))  # math_verify's own per-operation limit, in the helper
        try:
            self._proc.stdin.write(json.dumps({"gold": gold, "pred": predicted, "timeout": inner}) + "\n")
            self._proc.stdin.flush()
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            logger.warning(
                "math_verify took longer than %.1fs on %r vs gold %r; counted as incorrect",
                timeout_s, predicted[:80], gold[:80],
            )
            self._restart()
            return False
        except (BrokenPipeError, OSError):
            line = None
        if line is None:  # the helper died: restart it and count this one as unparseable
            logger.warning("the math_verify helper process exited; restarting it")
            self._restart()
            return None
        result = json.loads(line).get("result")
        return None if result is None else bool(result)

    def _restart(self) -> None:
        if self._proc is not None:
            self._kill(self._proc)
        self._proc = None
        self.restarts += 1


_WORKER = _MathVerifyWorker()
atexit.register(_WORKER.close)


def _math_verify(gold: str, predicted: str, timeout_s: float) -> bool | None:
    return _WORKER.compare(gold, predicted, timeout_s)


def _worker_main() -> None:
    """The helper process: JSON requests on stdin, one JSON answer line each on stdout."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    logging.basicConfig(level=logging.ERROR)
    out = sys.stdout
    try:
        import math_verify  # noqa: F401
    except Exception as err:  # noqa: BLE001
        out.write(json.dumps({"error": f"cannot import math_verify: {err}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        result: Any
        try:
            req = json.loads(line)
            result = _verify_direct(req["gold"], req["pred"], req.get("timeout"))
        except Exception:  # noqa: BLE001 - an unparseable pair is not a crash
            result = None
        out.write(json.dumps({"result": result}) + "\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--math-verify-worker"]:
    _worker_main()
