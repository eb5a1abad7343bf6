"""Semantic signals: the taxonomy, keyword pre-labels, the LLM labeling request and its parser.

Labeling follows the paper's two stages:

1. *keyword pre-label* (:func:`keyword_prelabel`): a step whose first words are a cue of the
   taxonomy gets that cue's category;
2. *LLM validation* (:class:`Labeler`): one request per trace lists all its steps with their
   pre-labels; the LLM confirms or corrects each one and labels the steps without a cue. An answer
   that cannot be parsed is retried (with the parser's error), then falls back to
   :func:`fallback_label`.

Also the small statistics the quality report needs: :func:`transition_matrix`,
:func:`cohens_kappa`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from rscaffold.config import LabelingConfig, SamplingConfig, format_validation_error
from rscaffold.records import LabeledStepRecord
from rscaffold.teachers.base import ChatRequest, Completion, LLMBackend

log = logging.getLogger(__name__)

# Prompt budget (characters). Steps are truncated in the prompt only; records keep the full text.
PROMPT_STEP_CHARS = 400  # at most this much of one step
PROMPT_MIN_STEP_CHARS = 60  # ... but never less than this, however many steps
PROMPT_STEPS_BUDGET_CHARS = 6000  # all steps of one trace together
PROMPT_QUESTION_CHARS = 600
RETRY_ANSWER_CHARS = 1500  # how much of a failed answer is quoted back in a retry
TRUNCATION_MARK = " [...]"
MAX_REPORTED_PROBLEMS = 5  # per kind, in a parse error (the error is quoted back in retries)

# Rough output-token cost of one answer entry, used to pick the answer format that fits
# ``sampling.max_new_tokens`` (small local labelers get ~160 new tokens).
_JSON_TOKENS_PER_STEP = 18
_JSON_RATIONALE_TOKENS_PER_STEP = 40
_LINES_TOKENS_PER_STEP = 8

AnswerFormat = Literal["json", "lines"]
Source = Literal["llm", "keyword", "fallback"]


class TaxonomyError(ValueError):
    """A taxonomy file that cannot be used; the message says which file and what is wrong."""


class LabelParseError(ValueError):
    """A labeler answer that cannot be turned into one valid label per step."""


# ---------------------------------------------------------------------------------------------
# taxonomy

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def _norm_cue(cue: str) -> str:
    """Canonical form of a cue or of matched text: lowercase, straight quotes, no , ; :"""
    return " ".join(re.sub(r"[,;:]", " ", cue.translate(_APOSTROPHES).lower()).split())


class SignalSpec(BaseModel):
    """One signal category."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    token: str = Field(min_length=1)
    definition: str = Field(min_length=1)
    cues: list[str] = Field(default_factory=list)
    essential: bool = True
    example: str = ""

    @field_validator("name", "definition", "example")
    @classmethod
    def _strip(cls, v: str) -> str:
        return " ".join(v.split())

    @field_validator("token")
    @classmethod
    def _token_no_space(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError(f"token must not contain whitespace: {v!r}")
        return v

    @field_validator("cues")
    @classmethod
    def _cues_clean(cls, v: list[str]) -> list[str]:
        out = []
        for cue in v:
            if not isinstance(cue, str) or not _norm_cue(cue):
                raise ValueError(f"empty cue {cue!r}")
            out.append(" ".join(cue.lower().split()))
        return out


class Taxonomy(BaseModel):
    """The signal categories (names, tokens, definitions, cues), loaded from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    default_signal: str
    signals: list[SignalSpec] = Field(min_length=1)

    _cue_re: re.Pattern[str] = PrivateAttr()
    _cue_owner: dict[str, tuple[str, str]] = PrivateAttr()  # normalized cue -> (signal, cue)

    @model_validator(mode="after")
    def _check(self) -> "Taxonomy":
        problems: list[str] = []
        for what, values in (("name", [s.name.lower() for s in self.signals]), ("token", [s.token for s in self.signals])):
            dups = sorted(v for v, c in Counter(values).items() if c > 1)
            if dups:
                problems.append(f"duplicate signal {what}(s): {', '.join(dups)}")
        if self.default_signal not in {s.name for s in self.signals}:
            problems.append(f"default_signal {self.default_signal!r} is not one of the signal names")
        seen: dict[str, str] = {}
        for s in self.signals:
            for cue in s.cues:
                key = _norm_cue(cue)
                if key in seen and seen[key] != s.name:
                    problems.append(f"cue {cue!r} belongs to both {seen[key]!r} and {s.name!r}")
                seen[key] = s.name
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model_post_init(self, __context: Any) -> None:
        owner: dict[str, tuple[str, str]] = {}
        for s in self.signals:
            for cue in s.cues:
                owner[_norm_cue(cue)] = (s.name, cue)
        alts = []
        for key in sorted(owner, key=len, reverse=True):  # longest cue first: it wins
            words = [re.escape(w) for w in key.split()]
            alts.append(r"[,;:]?\s+".join(words))
        pattern = r"(?:" + "|".join(alts) + r")(?![\w'-])" if alts else r"(?!x)x"
        self._cue_re = re.compile(pattern, re.IGNORECASE)
        self._cue_owner = owner

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.signals]

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.signals]

    @property
    def by_name(self) -> dict[str, SignalSpec]:
        return {s.name: s for s in self.signals}

    @property
    def by_token(self) -> dict[str, SignalSpec]:
        return {s.token: s for s in self.signals}

    @property
    def essential_names(self) -> list[str]:
        return [s.name for s in self.signals if s.essential]

    def digest(self) -> str:
        """sha256 of the canonical content (16 hex chars); part of the labeling fingerprint."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def match_cue(self, text: str) -> tuple[str, str] | None:
        """(signal, cue) of the longest cue ``text`` starts with, else None."""
        m = self._cue_re.match(text.translate(_APOSTROPHES))
        if m is None:
            return None
        return self._cue_owner[_norm_cue(m.group(0))]


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Load and validate a taxonomy YAML file; :class:`TaxonomyError` says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"taxonomy file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TaxonomyError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TaxonomyError(f"{path}: the top level must be a mapping with 'version', 'default_signal', 'signals'")
    try:
        return Taxonomy.model_validate(raw)
    except ValidationError as err:
        raise TaxonomyError(f"invalid taxonomy {path}:\n{format_validation_error(err)}") from None


# ---------------------------------------------------------------------------------------------
# stage 1: keyword pre-label

_LEADING_JUNK = re.compile(r"""[\s*_#>`~|+\-\u2022\u00b7"'\u201c\u201d\u2018\u2019(\[]+""")
_LIST_MARKER = re.compile(r"(?:\d{1,3}|[a-zA-Z])[.)\]:]\s+|step\s+\d+\s*[:.)\-]\s*", re.IGNORECASE)


def _strip_leading(step: str) -> str:
    text = step
    while True:
        m = _LEADING_JUNK.match(text) or _LIST_MARKER.match(text)
        if m is None or m.end() == 0:
            return text
        text = text[m.end() :]


def keyword_prelabel(step: str, tax: Taxonomy) -> tuple[str | None, str | None]:
    """(signal, cue) when ``step`` starts with a cue (the longest one wins), else (None, None).

    Case-insensitive, on word boundaries; leading markdown, list markers and quotes are ignored.
    """
    hit = tax.match_cue(_strip_leading(step[:300]))
    if hit is None:
        return None, None
    return hit


def fallback_label(step: str, tax: Taxonomy) -> str:
    """The keyword pre-label, or the taxonomy's default signal (deterministic)."""
    signal, _ = keyword_prelabel(step, tax)
    return signal or tax.default_signal


# ---------------------------------------------------------------------------------------------
# stage 2: the LLM labeling request


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(TRUNCATION_MARK))].rstrip() + TRUNCATION_MARK


def step_prompt_chars(n_steps: int) -> int:
    """How many characters of each step the prompt shows for a trace of ``n_steps`` steps."""
    if n_steps <= 0:
        return PROMPT_STEP_CHARS
    return max(PROMPT_MIN_STEP_CHARS, min(PROMPT_STEP_CHARS, PROMPT_STEPS_BUDGET_CHARS // n_steps))


def label_json_schema(n_steps: int, tax: Taxonomy, with_rationale: bool = False) -> dict[str, Any]:
    """JSON schema of the full answer: ``{"labels": [{"step": i, "signal": name}, ...]}``."""
    props: dict[str, Any] = {
        "step": {"type": "integer", "minimum": 1, "maximum": max(1, n_steps)},
        "signal": {"type": "string", "enum": tax.names},
    }
    required = ["step", "signal"]
    if with_rationale:
        props["rationale"] = {"type": "string"}
        required.append("rationale")
    return {
        "type": "object",
        "properties": {
            "labels": {
                "type": "array",
                "minItems": n_steps,
                "maxItems": n_steps,
                "items": {"type": "object", "properties": props, "required": required, "additionalProperties": False},
            }
        },
        "required": ["labels"],
        "additionalProperties": False,
    }


def answer_format_for(n_steps: int, max_new_tokens: int, with_rationale: bool) -> AnswerFormat:
    """``json`` when the full JSON answer fits ``max_new_tokens``, else the compact ``lines``."""
    per_step = _JSON_RATIONALE_TOKENS_PER_STEP if with_rationale else _JSON_TOKENS_PER_STEP
    return "json" if 8 + per_step * n_steps <= max_new_tokens else "lines"


_SYSTEM = "You label the steps of a reasoning trace with semantic signals. Answer only in the requested format."


def _format_instructions(n: int, tax: Taxonomy, with_rationale: bool, fmt: AnswerFormat) -> str:
    if fmt == "lines":
        return (
            f"Answer with exactly {n} lines, one per step, in order, each `<step number>: <signal name>`, "
            f"for example `1: {tax.names[0]}`. No other text."
        )
    entry = '{"step": 1, "signal": "<name>"' + (', "rationale": "<a few words>"' if with_rationale else "") + "}"
    return f'Answer with JSON only: {{"labels": [{entry}, ...]}} with exactly {n} entries, steps 1 to {n}.'


def build_label_request(
    trace_id: str,
    question: str,
    steps: Sequence[str],
    prelabels: Sequence[str | None],
    tax: Taxonomy,
    with_rationale: bool = False,
    answer_format: AnswerFormat = "json",
) -> ChatRequest:
    """One request that labels every step of one trace (steps are numbered from 1 in the prompt)."""
    if len(prelabels) != len(steps):
        raise ValueError(f"{len(steps)} steps but {len(prelabels)} pre-labels")
    n = len(steps)
    width = step_prompt_chars(n)
    signals = "\n".join(f"- {s.name}: {s.definition}" for s in tax.signals)
    lines = [f"[{i}] (pre-label: {pre or 'none'}) {_truncate(step, width)}" for i, (step, pre) in enumerate(zip(steps, prelabels), 1)]
    user = (
        f"Signals:\n{signals}\n\n"
        f"Question: {_truncate(question, PROMPT_QUESTION_CHARS)}\n\n"
        f"Steps:\n" + "\n".join(lines) + "\n\n"
        "Give every step exactly one signal from the list. Keep a pre-label that fits the step, "
        "correct one that does not, and label the steps marked none.\n"
        + _format_instructions(n, tax, with_rationale, answer_format)
    )
    return ChatRequest(
        request_id=f"{trace_id}:label",
        messages=[{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}],
        json_schema=label_json_schema(n, tax, with_rationale) if answer_format == "json" else None,
        line_choices=label_line_choices(n, tax) if answer_format == "lines" and not with_rationale else None,
    )


def label_line_choices(n_steps: int, tax: Taxonomy) -> list[list[str]]:
    """The closed set of answer lines ``"<i>: <signal name>"``, for backends that constrain to it."""
    return [[f"{i}: {name}" for name in tax.names] for i in range(1, n_steps + 1)]


def build_retry_request(
    request: ChatRequest,
    previous: Completion,
    error: str,
    n_steps: int,
    tax: Taxonomy,
    with_rationale: bool,
    attempt: int,
    answer_format: AnswerFormat = "json",
) -> ChatRequest:
    """A follow-up to ``request`` that quotes the unusable answer and the parser's error."""
    base_id = request.request_id.split(":retry", 1)[0]
    messages = [m for m in request.messages[:2]]  # system + original user message
    if previous.ok and previous.text.strip():
        messages.append({"role": "assistant", "content": _truncate_raw(previous.text, RETRY_ANSWER_CHARS)})
        problem = f"That answer could not be used: {error}"
        if previous.truncated:
            problem += " (it was cut off at the length limit)"
        messages.append(
            {
                "role": "user",
                "content": f"{problem}.\nUse only these names: {'; '.join(tax.names)}.\n"
                + _format_instructions(n_steps, tax, with_rationale, answer_format),
            }
        )
    return ChatRequest(
        request_id=f"{base_id}:retry{attempt}",
        messages=messages,
        json_schema=label_json_schema(n_steps, tax, with_rationale) if answer_format == "json" else None,
        line_choices=label_line_choices(n_steps, tax) if answer_format == "lines" and not with_rationale else None,
    )


def _truncate_raw(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + TRUNCATION_MARK


# ---------------------------------------------------------------------------------------------
# parsing the answer


@dataclass(frozen=True)
class ParsedLabel:
    step_index: int  # 0-based
    signal: str  # a taxonomy name
    rationale: str | None = None


_LABEL_JUNK = "\"'`*_ \t.,;:"


def resolve_signal(label: str, tax: Taxonomy) -> str | None:
    """Map a label as written by an LLM to a taxonomy name, or None when unknown/ambiguous.

    Accepts the name in any case (``&`` for ``and``), the token (``<sig:contrast>``, with or without
    brackets), a unique prefix of at least 3 characters (``Contrast`` -> ``Contrast and
    Concession``) and a word of the name that only one name has (``Summary``).
    """
    raw = label.strip().strip(_LABEL_JUNK)
    if not raw:
        return None
    for s in tax.signals:
        if raw == s.token or raw.lower() == s.token.lower() or raw.lower() == s.token.strip("<>").lower():
            return s.name
    key = " ".join(raw.lower().replace("&", "and").split())
    names = {s.name.lower(): s.name for s in tax.signals}
    if key in names:
        return names[key]
    if len(key) >= 3:
        hits = [v for k, v in names.items() if k.startswith(key)]
        if len(hits) == 1:
            return hits[0]
    if " " not in key:
        hits = [v for k, v in names.items() if key in k.split() and key != "and"]
        if len(hits) == 1:
            return hits[0]
    return None


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_NUMBERED_LINE = re.compile(
    r"^\s*[-*]?\s*\**\s*(?:step\s*)?[\[(]?\s*(\d+)\s*[\])]?\s*\**\s*[:.)=\-\u2013\u2014]*\s*(.*?)\s*$",
    re.IGNORECASE,
)
_LABEL_SPLIT = re.compile(r"\s+[-\u2013\u2014]\s+|\s*\(|\s*:\s+|\s*,\s+")
_STEP_KEYS = ("step", "index", "id", "step_index", "n")
_SIGNAL_KEYS = ("signal", "label", "category", "name")


def _json_candidates(text: str) -> Iterator[Any]:
    for m in _FENCE.finditer(text):
        try:
            yield json.loads(m.group(1))
        except json.JSONDecodeError:
            pass
    decoder = json.JSONDecoder()
    for i, c in enumerate(text):
        if c in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                continue
            yield value


def _looks_like_answer(value: Any) -> bool:
    if isinstance(value, dict):
        if any(str(k).lower() in ("labels", "steps", "signals") for k in value):
            return True
        return bool(value) and all(str(k).strip().isdigit() for k in value)
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, (str, dict)) for v in value)
    return False


def _get(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    low = {str(k).lower(): v for k, v in d.items()}
    for k in keys:
        if k in low:
            return low[k]
    return None


def _entries_from_json(value: Any) -> tuple[list[tuple[int | None, str, str | None]], bool]:
    """(entries, positional): entries are (1-based step or None, raw label, rationale)."""
    if isinstance(value, dict):
        inner = _get(value, ("labels", "steps", "signals"))
        if inner is None:  # {"1": "Contrast", "2": ...}
            return [(int(str(k).strip()), str(v), None) for k, v in value.items()], False
        value = inner
    if not isinstance(value, list):
        raise LabelParseError(f"expected a list of labels, got {type(value).__name__}")
    entries: list[tuple[int | None, str, str | None]] = []
    for j, item in enumerate(value):
        if isinstance(item, str):
            entries.append((None, item, None))
        elif isinstance(item, dict):
            step = _get(item, _STEP_KEYS)
            sig = _get(item, _SIGNAL_KEYS)
            if sig is None:
                raise LabelParseError(f"entry {j + 1} has no 'signal': {json.dumps(item)[:120]}")
            rat = _get(item, ("rationale", "reason", "explanation"))
            if step is not None:
                try:
                    step = int(str(step).strip().strip("[]"))
                except ValueError:
                    raise LabelParseError(f"entry {j + 1}: step {step!r} is not a number") from None
            entries.append((step, str(sig), str(rat) if rat is not None else None))
        else:
            raise LabelParseError(f"entry {j + 1} is neither a name nor an object: {item!r}")
    numbered = [e for e in entries if e[0] is not None]
    if numbered and len(numbered) != len(entries):
        raise LabelParseError("some entries have a 'step' number and some do not")
    return entries, not numbered


def _entries_from_lines(text: str, tax: Taxonomy) -> tuple[list[tuple[int | None, str, str | None]], bool]:
    numbered: list[tuple[int | None, str, str | None]] = []
    bare: list[tuple[int | None, str, str | None]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _NUMBERED_LINE.match(line)
        if m and m.group(2):
            label, rationale = _split_label(m.group(2), tax)
            numbered.append((int(m.group(1)), label, rationale))
        elif resolve_signal(line, tax) is not None:
            bare.append((None, line.strip(), None))
    if numbered:
        return numbered, False
    return bare, True


def _split_label(text: str, tax: Taxonomy) -> tuple[str, str | None]:
    """Separate ``Contrast and Concession - the step objects`` into label and rationale."""
    if resolve_signal(text, tax) is not None:
        return text, None
    m = _LABEL_SPLIT.search(text)
    if m and resolve_signal(text[: m.start()], tax) is not None:
        return text[: m.start()], text[m.end() :].strip(" )") or None
    return text, None


def parse_labels(text: str, n_steps: int, tax: Taxonomy) -> list[ParsedLabel]:
    """Parse a labeler answer into one :class:`ParsedLabel` per step, in step order.

    Accepted: the JSON object ``{"labels": [{"step": i, "signal": name}, ...]}`` (steps from 1; a
    consistent 0-based numbering is accepted too), a JSON list of names in step order, or lines
    ``1: <name>``; JSON may sit in a code fence or in prose. Raises :class:`LabelParseError` naming
    the missing, duplicated, out-of-range or unknown entries.
    """
    if n_steps <= 0:
        return []
    body = _THINK_BLOCK.sub("", text)
    if "</think>" in body.lower():  # an unterminated reasoning prefix
        body = body[body.lower().rfind("</think>") + len("</think>") :]
    body = body.strip()
    if not body:
        raise LabelParseError("empty answer")

    entries: list[tuple[int | None, str, str | None]] | None = None
    positional = False
    first_error: LabelParseError | None = None
    for value in _json_candidates(body):
        if not _looks_like_answer(value):
            continue
        try:
            entries, positional = _entries_from_json(value)
            break
        except LabelParseError as err:
            first_error = first_error or err
    if entries is None:
        entries, positional = _entries_from_lines(body, tax)
        if not entries:
            if first_error is not None:
                raise first_error
            if "{" in body or "[" in body:
                raise LabelParseError(
                    f"no complete JSON answer found (truncated or malformed?); expected {{\"labels\": [...]}} "
                    f"with {n_steps} entries"
                )
            raise LabelParseError(
                f"no labels found: expected JSON {{\"labels\": [...]}} or lines '<step>: <signal>' for {n_steps} steps"
            )

    if positional:
        if len(entries) != n_steps:
            raise LabelParseError(f"got {len(entries)} labels for {n_steps} steps")
        indexed = [(i, label, rat) for i, (_, label, rat) in enumerate(entries)]
    else:
        steps = [e[0] for e in entries]
        offset = 1
        if 0 in steps and sorted(steps) == list(range(n_steps)):
            offset = 0  # consistently 0-based: unambiguous
        indexed = [(int(s) - offset, label, rat) for s, label, rat in entries]  # type: ignore[arg-type]

    out_of_range: list[str] = []
    unknown: list[str] = []
    out: dict[int, ParsedLabel] = {}
    dup: set[int] = set()
    for idx, label, rat in indexed:
        if not 0 <= idx < n_steps:
            out_of_range.append(f"step {idx + 1} is out of range 1..{n_steps}")
            continue
        if idx in out or idx in dup:
            dup.add(idx)
            continue
        name = resolve_signal(label, tax)
        if name is None:
            unknown.append(f"step {idx + 1}: unknown signal {label.strip()[:60]!r}")
            out[idx] = ParsedLabel(idx, "", None)  # placeholder: present, but invalid
            continue
        out[idx] = ParsedLabel(idx, name, rat.strip() if isinstance(rat, str) and rat.strip() else None)
    problems = _capped(out_of_range)
    if dup:
        problems.append("step(s) labeled more than once: " + ", ".join(str(i + 1) for i in sorted(dup)))
    missing = [i + 1 for i in range(n_steps) if i not in out]
    if missing:
        problems.append("missing step(s): " + _ranges(missing))
    if unknown:
        problems += _capped(unknown) + [f"valid signals: {', '.join(tax.names)}"]
    if problems:
        raise LabelParseError("; ".join(problems))
    return [out[i] for i in range(n_steps)]


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_REPORTED_PROBLEMS:
        return problems
    return problems[:MAX_REPORTED_PROBLEMS] + [f"and {len(problems) - MAX_REPORTED_PROBLEMS} more"]


def _ranges(nums: list[int]) -> str:
    parts: list[str] = []
    start = prev = nums[0]
    for n in nums[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# labeling traces


class TraceSteps(NamedTuple):
    """What :func:`label_traces` needs of one trace (a plain 4-tuple works too)."""

    trace_id: str
    problem_id: str
    question: str
    steps: Sequence[str]


@dataclass
class LabelStats:
    """Counters of one labeling run."""

    traces: int = 0
    steps: int = 0
    llm_ok: int = 0  # traces labeled by the LLM (first answer or a retry)
    retried: int = 0  # traces that needed at least one retry
    fallback_traces: int = 0  # traces the LLM failed on (fallback labels)
    keyword_steps: int = 0  # steps with a keyword pre-label
    prelabel_checked: int = 0  # LLM-labeled steps that had a pre-label
    prelabel_agreed: int = 0  # ... and the LLM kept it
    errors: list[str] = field(default_factory=list)  # last parse/backend error of each fallback trace

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Labeler:
    """Labels traces: keyword pre-labels, then (method ``llm``) one batched LLM call per pass."""

    def __init__(
        self,
        tax: Taxonomy,
        backend: LLMBackend | None,
        sampling: SamplingConfig,
        cfg: LabelingConfig,
    ) -> None:
        self.tax = tax
        self.backend = backend
        self.sampling = sampling
        self.cfg = cfg
        self.stats = LabelStats()

    @property
    def uses_llm(self) -> bool:
        return self.cfg.method == "llm" and self.backend is not None

    def label(self, traces: Sequence[tuple[str, str, str, Sequence[str]]]) -> Iterator[list[LabeledStepRecord]]:
        """Yield one list of records per trace, in input order."""
        items = [TraceSteps(*t) for t in traces]
        dups = sorted(k for k, c in Counter(t.trace_id for t in items).items() if c > 1)
        if dups:
            raise ValueError(f"trace ids must be unique within one call: {', '.join(dups[:5])}")
        pre = [[keyword_prelabel(s, self.tax) for s in t.steps] for t in items]
        for t, p in zip(items, pre):
            self.stats.traces += 1
            self.stats.steps += len(t.steps)
            self.stats.keyword_steps += sum(1 for sig, _ in p if sig is not None)
        if self.cfg.method == "llm" and self.backend is None:
            log.warning("labeling method 'llm' without a backend: using keyword labels")
        labels: dict[int, list[ParsedLabel]] = self._llm_labels(items, pre) if self.uses_llm else {}
        for k, (t, p) in enumerate(zip(items, pre)):
            yield self._records(t, p, labels.get(k))

    def _records(
        self, t: TraceSteps, pre: list[tuple[str | None, str | None]], parsed: list[ParsedLabel] | None
    ) -> list[LabeledStepRecord]:
        out = []
        source: Source
        for i, (step, (sig, cue)) in enumerate(zip(t.steps, pre)):
            if parsed is not None:
                signal, source, rationale = parsed[i].signal, "llm", parsed[i].rationale
            else:
                signal = sig or self.tax.default_signal
                source = "keyword" if sig is not None else "fallback"
                if self.uses_llm:
                    source = "fallback"  # the LLM failed on this trace
                rationale = None
            out.append(
                LabeledStepRecord(
                    trace_id=t.trace_id,
                    problem_id=t.problem_id,
                    step_index=i,
                    text=step,
                    prelabel=sig,
                    cue=cue,
                    signal=signal,
                    source=source,
                    rationale=rationale,
                )
            )
        return out

    def _llm_labels(
        self, items: list[TraceSteps], pre: list[list[tuple[str | None, str | None]]]
    ) -> dict[int, list[ParsedLabel]]:
        assert self.backend is not None
        with_rat = self.cfg.with_rationale
        fmt: dict[int, AnswerFormat] = {}
        pending: dict[int, ChatRequest] = {}
        for k, t in enumerate(items):
            if not t.steps:
                continue
            if getattr(self.backend, "supports_line_choices", False) and not with_rat:
                # The backend constrains decoding to valid answer lines: always well formed.
                fmt[k] = "lines"
            else:
                fmt[k] = answer_format_for(len(t.steps), self.sampling.max_new_tokens, with_rat)
            pending[k] = build_label_request(
                t.trace_id, t.question, list(t.steps), [s for s, _ in pre[k]], self.tax, with_rat, fmt[k]
            )
        done: dict[int, list[ParsedLabel]] = {}
        last_error: dict[int, str] = {}
        for attempt in range(self.cfg.retries_on_invalid + 1):
            if not pending:
                break
            if attempt == 1:
                self.stats.retried += len(pending)
            results = self._generate(list(pending.values()))
            retry: dict[int, ChatRequest] = {}
            for k, req in pending.items():
                n = len(items[k].steps)
                comp = results.get(req.request_id) or Completion(req.request_id, error="no completion returned")
                if not comp.ok:
                    error = f"backend error: {comp.error}"
                else:
                    try:
                        done[k] = parse_labels(comp.text, n, self.tax)
                        continue
                    except LabelParseError as err:
                        error = str(err)
                        if comp.truncated:
                            fmt[k] = "lines"  # the answer did not fit: ask for the compact form
                last_error[k] = error
                retry[k] = build_retry_request(req, comp, error, n, self.tax, with_rat, attempt + 1, fmt[k])
            pending = retry
        for k in pending:
            self.stats.fallback_traces += 1
            self.stats.errors.append(f"{items[k].trace_id}: {last_error.get(k, '')}")
            log.warning("labeling failed for trace %s, using fallback labels: %s", items[k].trace_id, last_error.get(k))
        for k, parsed in done.items():
            self.stats.llm_ok += 1
            for (sig, _), lab in zip(pre[k], parsed):
                if sig is not None:
                    self.stats.prelabel_checked += 1
                    self.stats.prelabel_agreed += int(lab.signal == sig)
        return done

    def _generate(self, requests: list[ChatRequest]) -> dict[str, Completion]:
        assert self.backend is not None
        # A backend reports a bad request in its Completion; an exception is a systemic failure
        # (server down, out of memory) and propagates, so no shard is filled with fallback labels.
        completions = self.backend.generate(requests, self.sampling)
        out: dict[str, Completion] = {}
        for c in completions:
            out.setdefault(c.request_id, c)  # n=1: the first sample
        return out


def label_traces(
    traces: Sequence[tuple[str, str, str, Sequence[str]]],
    tax: Taxonomy,
    backend: LLMBackend | None,
    sampling: SamplingConfig,
    cfg: LabelingConfig,
    stats: LabelStats | MutableMapping[str, int] | None = None,
) -> Iterator[list[LabeledStepRecord]]:
    """Label ``(trace_id, problem_id, question, steps)`` tuples; yield one record list per trace.

    Method ``keyword`` (or no backend): keyword pre-label, else the default signal. Method ``llm``:
    one batched ``generate`` call for all traces, one for each retry round. ``stats`` receives the
    counters: a :class:`LabelStats` is updated in place; a mapping (e.g. a ``Counter``) gets the
    numeric counters added when the iteration ends.
    """
    labeler = Labeler(tax, backend, sampling, cfg)
    if isinstance(stats, LabelStats):
        labeler.stats = stats
    try:
        yield from labeler.label(traces)
    finally:
        if stats is not None and not isinstance(stats, LabelStats):
            for key, value in labeler.stats.as_dict().items():
                if isinstance(value, int):
                    stats[key] = stats.get(key, 0) + value


# ---------------------------------------------------------------------------------------------
# statistics for the quality report


def transition_matrix(sequences: Sequence[Sequence[str]], names: Sequence[str]) -> list[list[int]]:
    """``m[i][j]`` = number of times ``names[j]`` directly follows ``names[i]`` in a sequence."""
    pos = {n: i for i, n in enumerate(names)}
    m = [[0] * len(names) for _ in names]
    for seq in sequences:
        for a, b in zip(seq, seq[1:]):
            if a not in pos or b not in pos:
                raise ValueError(f"unknown signal {a if a not in pos else b!r} (names: {list(names)})")
            m[pos[a]][pos[b]] += 1
    return m


def cohens_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two labelings of the same items (1.0 when both use one same label throughout)."""
    if len(a) != len(b):
        raise ValueError(f"labelings differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("cohens_kappa of empty labelings")
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb.get(k, 0) for k in ca) / (n * n)
    if pe >= 1.0:
        return 1.0
    return (po - pe) / (1.0 - pe)


def label_quality_report(steps: Sequence[LabeledStepRecord], tax: Taxonomy) -> dict[str, Any]:
    """JSON-able quality summary of labeled steps (for ``quality.json`` and the stage artifact).

    ``keyword_coverage``: share of steps with a keyword pre-label (the paper reports ~74%);
    ``prelabel_agreement`` / ``prelabel_kappa``: agreement of the pre-label with the LLM label on
    LLM-labeled steps that had one (the paper reports ~87% agreement); ``transitions``: signal
    bigram counts over traces (rows: from, columns: to, in ``names`` order).
    """
    names = tax.names
    n = len(steps)
    by_trace: dict[str, list[LabeledStepRecord]] = {}
    for s in steps:
        by_trace.setdefault(s.trace_id, []).append(s)
    sequences = [[s.signal for s in sorted(v, key=lambda r: r.step_index)] for v in by_trace.values()]
    signal_counts = Counter(s.signal for s in steps)
    checked = [(s.prelabel, s.signal) for s in steps if s.source == "llm" and s.prelabel is not None]
    lengths: dict[str, list[int]] = {}
    for s in steps:
        lengths.setdefault(s.signal, []).append(len(s.text))
    return {
        "taxonomy_digest": tax.digest(),
        "names": names,
        "traces": len(by_trace),
        "steps": n,
        "steps_per_trace": (n / len(by_trace)) if by_trace else 0.0,
        "signal_counts": {k: signal_counts.get(k, 0) for k in names},
        "unknown_signals": sorted(k for k in signal_counts if k not in tax.by_name),
        "source_counts": dict(Counter(s.source for s in steps)),
        "keyword_coverage": (sum(s.prelabel is not None for s in steps) / n) if n else 0.0,
        "prelabel_checked": len(checked),
        "prelabel_agreement": (sum(a == b for a, b in checked) / len(checked)) if checked else None,
        "prelabel_kappa": cohens_kappa([a for a, _ in checked], [b for _, b in checked]) if checked else None,
        "mean_chars_per_signal": {k: (sum(v) / len(v)) for k, v in lengths.items() if k in tax.by_name},
        "first_signal_counts": dict(Counter(seq[0] for seq in sequences if seq)),
        "transitions": transition_matrix(
            [[x for x in seq if x in tax.by_name] for seq in sequences], names
        ),
    }
