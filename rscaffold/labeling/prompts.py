"""Stage 2 of the paper's labeling, the request: one chat request per trace that shows every step
with its keyword pre-label and asks the LLM to confirm, correct or assign each signal.

Every step is shown with its full text. A trace whose steps and answer do not fit one request
(``labeling.context_tokens``, ``labeling.max_window_steps``) is labeled in windows of consecutive
steps (:func:`plan_windows`); a window after the first also shows the end of the steps before it as
context. The answer budget follows the steps a request labels (:func:`answer_budget`).

The answer format is JSON (``{"labels": [...]}``, with a JSON schema for backends that constrain
decoding to it) or, when the JSON answer would not fit ``max_new_tokens``, compact lines
``<step>: <signal name>`` (a closed set of lines that local backends enforce token by token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.llm.base import ChatRequest, Completion

# Width of a step in the one-line previews of :func:`step_prompt_chars` (reports and benchmarks);
# the request itself shows every step whole.
PROMPT_STEP_CHARS = 400
PROMPT_MIN_STEP_CHARS = 60
PROMPT_STEPS_BUDGET_CHARS = 6000
PROMPT_QUESTION_CHARS = 600
RETRY_ANSWER_CHARS = 1500  # how much of a failed answer is quoted back in a retry
TRUNCATION_MARK = " [...]"
# Room kept in every request for the chat template's tokens and for a retry's quoted answer and error.
PROMPT_OVERHEAD_TOKENS = 48
RETRY_EXTRA_TOKENS = 800

# Output-token cost of one answer entry (measured on SmolLM2's tokenizer with the default
# taxonomy: a ``12: Verification and Reflection`` line is 9-10 tokens), used to pick the answer
# format that fits ``sampling.max_new_tokens`` and to size the answer budget of longer requests.
_JSON_TOKENS_PER_STEP = 18
_JSON_RATIONALE_TOKENS_PER_STEP = 40
_LINES_TOKENS_PER_STEP = 10
_ANSWER_OVERHEAD_TOKENS = 8
ANSWER_BUDGET_STEP = 128  # answer budgets above sampling.max_new_tokens are rounded up to this

AnswerFormat = Literal["json", "lines"]


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(TRUNCATION_MARK))].rstrip() + TRUNCATION_MARK


def prompt_fixed_text(question: str, tax: Taxonomy, *, n_steps: int, with_rationale: bool, context: str) -> str:
    """A label request's text besides its step lines (system message, signals, question, window
    note with ``context``, instructions), for estimating its length."""
    probe = build_label_request(
        "probe",
        question,
        [],
        prelabels=[],
        tax=tax,
        with_rationale=with_rationale,
        window=Window(0, 2, 0, max(1, n_steps), max(1, n_steps), context=context),
    )
    return "\n".join(m["content"] for m in probe.messages)


def step_prompt_chars(n_steps: int) -> int:
    """A one-line preview width per step for a trace of ``n_steps`` steps (reports; the label
    request shows steps whole)."""
    if n_steps <= 0:
        return PROMPT_STEP_CHARS
    return max(PROMPT_MIN_STEP_CHARS, min(PROMPT_STEP_CHARS, PROMPT_STEPS_BUDGET_CHARS // n_steps))


def answer_budget(n_steps: int, fmt: AnswerFormat, *, with_rationale: bool, base: int) -> int:
    """``max_new_tokens`` of a request that labels ``n_steps`` steps in ``fmt``: ``base``
    (``labeling.sampling.max_new_tokens``) when the answer fits it, else the answer's estimated
    length rounded up to :data:`ANSWER_BUDGET_STEP` (few distinct budgets: one batch each)."""
    if fmt == "json":
        per_step = _JSON_RATIONALE_TOKENS_PER_STEP if with_rationale else _JSON_TOKENS_PER_STEP
    else:
        per_step = _LINES_TOKENS_PER_STEP
    need = _ANSWER_OVERHEAD_TOKENS + per_step * n_steps
    if need <= base:
        return base
    return -(-need // ANSWER_BUDGET_STEP) * ANSWER_BUDGET_STEP


def _step_line(i: int, step: str, prelabel: str | None, *, limit: int | None = None) -> str:
    text = " ".join(step.split())
    if limit is not None:
        text = _truncate(text, limit)
    return f"[{i}] (pre-label: {prelabel or 'none'}) {text}"


def plan_windows(
    steps: Sequence[str],
    prelabels: Sequence[str | None],
    *,
    fixed_tokens: int,
    context_tokens: int,
    max_steps: int,
    answer_tokens: Callable[[int], int],
    count_tokens: Callable[[str], int],
) -> list[tuple[int, int, int | None]]:
    """Windows of consecutive steps ``(start, end, step_limit)`` (0-based, end exclusive), each one
    request: its step lines (numbered from 1, measured by ``count_tokens``) plus ``fixed_tokens``
    (the rest of the prompt, the context, room for a retry) fit ``context_tokens`` less its answer
    budget (``answer_tokens(n)``); at most ``max_steps`` steps. A step that alone does not fit is
    a window of its own, shown cut to about what fits (``step_limit`` characters; else None)."""
    out: list[tuple[int, int, int | None]] = []

    def room(n: int) -> int:
        return context_tokens - PROMPT_OVERHEAD_TOKENS - RETRY_EXTRA_TOKENS - answer_tokens(n) - fixed_tokens

    least = count_tokens(_step_line(1, "x" * PROMPT_MIN_STEP_CHARS, None)) + 1
    if steps and room(1) < least:
        need = context_tokens - room(1) + least
        raise ValueError(
            f"labeling.context_tokens={context_tokens} is too small for a label request: its instructions, "
            f"taxonomy and question take about {fixed_tokens} tokens and its answer {answer_tokens(1)}, leaving "
            f"no room for a step; raise labeling.context_tokens to at least {need} (or use a labeler with a "
            "larger context window)"
        )
    start, used = 0, 0
    for i, (step, pre) in enumerate(zip(steps, prelabels)):
        n = i - start + 1
        line = _step_line(n, step, pre)
        cost = count_tokens(line) + 1
        if n > 1 and (n > max_steps or used + cost > room(n)):
            out.append((start, i, None))
            start, used, n = i, 0, 1
            line = _step_line(1, step, pre)
            cost = count_tokens(line) + 1
        used += cost
        if n == 1 and used > room(1):  # one step longer than a request holds: cut in the prompt
            chars_per_token = len(line) / max(1, cost)
            limit = max(PROMPT_MIN_STEP_CHARS, int(room(1) * chars_per_token) - len(_step_line(1, "", pre)))
            out.append((i, i + 1, limit))
            start, used = i + 1, 0
    if start < len(steps):
        out.append((start, len(steps), None))
    return out


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


def _format_instructions(n: int, tax: Taxonomy, with_rationale: bool, *, fmt: AnswerFormat) -> str:
    if fmt == "lines":
        return (
            f"Answer with exactly {n} lines, one per step, in order, each `<step number>: <signal name>`, "
            f"for example `1: {tax.names[0]}`. No other text."
        )
    entry = '{"step": 1, "signal": "<name>"' + (', "rationale": "<a few words>"' if with_rationale else "") + "}"
    return f'Answer with JSON only: {{"labels": [{entry}, ...]}} with exactly {n} entries, steps 1 to {n}.'


@dataclass(frozen=True)
class Window:
    """Steps ``start..end-1`` of a trace of ``total`` steps, labeled by request ``index`` of
    ``count``; ``context``: the end of the steps before it, shown but not labeled; ``step_limit``:
    a step cut to this many characters (one longer than a request holds), else None."""

    index: int
    count: int
    start: int
    end: int
    total: int
    context: str = ""
    step_limit: int | None = None


def window_context(steps: Sequence[str], start: int, chars: int) -> str:
    """The last ``chars`` characters of the steps before ``start`` (whitespace normalised)."""
    if start <= 0 or chars <= 0:
        return ""
    text = " ".join(" ".join(steps[:start]).split())
    return text if len(text) <= chars else "[...] " + text[-chars:].lstrip()


def _window_text(w: Window) -> str:
    if w.count <= 1:
        return ""
    text = (
        f"This trace is long and labeled in parts. This is part {w.index + 1} of {w.count}: steps "
        f"{w.start + 1} to {w.end} of {w.total}, numbered 1 to {w.end - w.start} below.\n"
    )
    if w.context:
        text += f"The steps before them end with (context only, do not label): {w.context}\n"
    return text + "\n"


def build_label_request(
    trace_id: str,
    question: str,
    steps: Sequence[str],
    *,
    prelabels: Sequence[str | None],
    tax: Taxonomy,
    with_rationale: bool = False,
    answer_format: AnswerFormat = "json",
    window: Window | None = None,
) -> ChatRequest:
    """One request that labels ``steps`` (every step of one trace, or the steps of ``window``),
    numbered from 1 in the prompt, each shown whole (unless ``window.step_limit``)."""
    if len(prelabels) != len(steps):
        raise ValueError(f"{len(steps)} steps but {len(prelabels)} pre-labels")
    n = len(steps)
    signals = "\n".join(f"- {s.name}: {s.definition}" for s in tax.signals)
    limit = window.step_limit if window is not None else None
    lines = [_step_line(i, step, pre, limit=limit) for i, (step, pre) in enumerate(zip(steps, prelabels), 1)]
    user = (
        f"Signals:\n{signals}\n\n"
        f"Question: {_truncate(question, PROMPT_QUESTION_CHARS)}\n\n"
        + (_window_text(window) if window is not None else "")
        + "Steps:\n"
        + "\n".join(lines)
        + "\n\n"
        "Give every step exactly one signal from the list. Keep a pre-label that fits the step, "
        "correct one that does not, and label the steps marked none.\n"
        + _format_instructions(n, tax, with_rationale, fmt=answer_format)
    )
    suffix = f":w{window.index + 1}of{window.count}" if window is not None and window.count > 1 else ""
    return ChatRequest(
        request_id=f"{trace_id}:label{suffix}",
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
    *,
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
                + _format_instructions(n_steps, tax, with_rationale, fmt=answer_format),
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
