"""Parsing a labeler's answer into one valid signal per step, with errors that say what is wrong
(the error text is quoted back to the LLM in a retry).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.vocabulary import THINK_BLOCK, THINK_CLOSE

MAX_REPORTED_PROBLEMS = 5  # per kind, in a parse error (the error is quoted back in retries)


class LabelParseError(ValueError):
    """A labeler answer that cannot be turned into one valid label per step."""


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
    body = THINK_BLOCK.sub("", text)
    if THINK_CLOSE in body.lower():  # an unterminated reasoning prefix
        body = body[body.lower().rfind(THINK_CLOSE) + len(THINK_CLOSE) :]
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
                    f'no complete JSON answer found (truncated or malformed?); expected {{"labels": [...]}} '
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
