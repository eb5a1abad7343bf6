"""Stage 2 of the paper's labeling, the request: one chat request per trace that shows every step
with its keyword pre-label and asks the LLM to confirm, correct or assign each signal.

The answer format is JSON (``{"labels": [...]}``, with a JSON schema for backends that constrain
decoding to it) or, when the JSON answer would not fit ``max_new_tokens``, compact lines
``<step>: <signal name>`` (a closed set of lines that local backends enforce token by token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.llm.base import ChatRequest, Completion

# Prompt budget (characters). Steps are truncated in the prompt only; records keep the full text.
PROMPT_STEP_CHARS = 400  # at most this much of one step
PROMPT_MIN_STEP_CHARS = 60  # ... but never less than this, however many steps
PROMPT_STEPS_BUDGET_CHARS = 6000  # all steps of one trace together
PROMPT_QUESTION_CHARS = 600
RETRY_ANSWER_CHARS = 1500  # how much of a failed answer is quoted back in a retry
TRUNCATION_MARK = " [...]"

# Rough output-token cost of one answer entry, used to pick the answer format that fits
# ``sampling.max_new_tokens`` (small local labelers get ~160 new tokens).
_JSON_TOKENS_PER_STEP = 18
_JSON_RATIONALE_TOKENS_PER_STEP = 40
_LINES_TOKENS_PER_STEP = 8

AnswerFormat = Literal["json", "lines"]


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


def _format_instructions(n: int, tax: Taxonomy, with_rationale: bool, *, fmt: AnswerFormat) -> str:
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
    *,
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
    lines = [
        f"[{i}] (pre-label: {pre or 'none'}) {_truncate(step, width)}"
        for i, (step, pre) in enumerate(zip(steps, prelabels), 1)
    ]
    user = (
        f"Signals:\n{signals}\n\n"
        f"Question: {_truncate(question, PROMPT_QUESTION_CHARS)}\n\n"
        f"Steps:\n" + "\n".join(lines) + "\n\n"
        "Give every step exactly one signal from the list. Keep a pre-label that fits the step, "
        "correct one that does not, and label the steps marked none.\n"
        + _format_instructions(n, tax, with_rationale, fmt=answer_format)
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
