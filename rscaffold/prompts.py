"""Prompts and text formats shared by the teacher, training and evaluation.

**One prompt builder per benchmark family.** The user message that asks for a step-by-step
answer in the family's answer format is built by :func:`benchmark_prompt` (the template of the
benchmark's family, :data:`FAMILY_TEMPLATES`, filled by :func:`fill_prompt`). The teacher's
request, the students' training prompts and the evaluation prompts all go through it, so a
student is asked at evaluation exactly what it was trained on (for the training family) and every
family gets its own answer instruction (a yes/no question never gets the math one). The system
prompts carry no answer format (:data:`STUDENT_SYSTEM_PROMPT`).

The instructions name the answer's *form* in words ("'The answer is' followed by the final
number") instead of a placeholder ("'The answer is N.'"): small models copy placeholders.

Templates are filled by plain replacement of ``{question}`` (:func:`fill_prompt`); every other
brace is literal, so ``\\boxed{}`` in a template is safe (no ``str.format`` pitfalls).

A user's own problems (``problems.format: custom``) get the template of their answer
type's family (:data:`FAMILY_TEMPLATES`, ``text`` for short free-text answers).

The student's text format: how a question and its labelled steps become (prompt, completion).

This format is fixed; the evaluation code relies on it.

* prompt: the tokenizer's chat template over a system message (:data:`STUDENT_SYSTEM_PROMPT`)
  and the user message (the question, through :func:`benchmark_prompt` when the benchmark is
  given), with the generation prompt (the assistant header).
* scaffolded completion: for each step ``signal_token + step_text``, the steps joined with
  ``"\\n\\n"`` (:data:`rscaffold.vocabulary.STEP_SEPARATOR`), then the tokenizer's eos token
  (``<|im_end|>`` for SmolLM2)::

      <sig:reasoning>Tom has 3 apples.\\n\\n<sig:conclusion>The answer is 3.<|im_end|>

  A step never contains a step boundary (:data:`rscaffold.vocabulary.STEP_BOUNDARY`): the
  segmenter guarantees it and :func:`render_completion` checks it, so the decoder, which ends a
  step at the first boundary, parses a completion back into exactly its steps.
* plain completion (the CoT-SFT baselines): the same without the signal tokens.

Signal tokens are added to the tokenizer as *special* tokens, so the tokenizer never splits
them and ``decode(..., skip_special_tokens=True)`` removes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from rscaffold.vocabulary import STEP_BOUNDARY, STEP_SEPARATOR

log = logging.getLogger(__name__)

STUDENT_SYSTEM_PROMPT = "You are a careful tutor. Think step by step."
"""The students' system message, for every benchmark family (the answer format is in the user
message, :func:`benchmark_prompt`)."""

QUESTION_FIELD = "{question}"


def fill_prompt(template: str, question: str) -> str:
    """``template`` with ``{question}`` replaced by ``question``; every other brace is literal.

    The one way a prompt template is filled (teacher, training, evaluation): plain replacement,
    so ``\\boxed{}`` or JSON in a template needs no escaping and cannot raise.
    """
    if QUESTION_FIELD not in template:
        raise ValueError(f"a prompt template must contain {QUESTION_FIELD!r}: {template!r}")
    return template.replace(QUESTION_FIELD, question)


def render_prompt(question: str, tokenizer, system_prompt: str = STUDENT_SYSTEM_PROMPT) -> str:
    """The chat-templated prompt (system + user message + assistant header), as text.

    ``question`` is the user message as sent (see :func:`student_user_message`).
    """
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def student_user_message(question: str, family: str | None) -> str:
    """The user message a student gets for ``question``: the benchmark family's prompt
    (:func:`benchmark_prompt`), or the bare question when ``family`` is None."""
    return question if family is None else benchmark_prompt(family, question)


def example_benchmark(benchmark: str | Mapping[str, str] | None, source: str | None) -> str | None:
    """The benchmark (or family) whose prompt one example gets: ``benchmark`` itself, or when it
    maps each problem source to its family (a mix of benchmarks) the family of ``source``."""
    if benchmark is None or isinstance(benchmark, str):
        return benchmark
    try:
        return benchmark[source or ""]
    except KeyError:
        raise ValueError(
            f"an example of benchmark {source!r} in a mix of {sorted(benchmark)}: no prompt family for it"
        ) from None


def check_step_text(text: str) -> None:
    """Raise if ``text`` holds a step boundary: the decoder would read it as two steps."""
    if STEP_BOUNDARY.search(text):
        raise ValueError(
            f"a step contains a step boundary (a blank line), so the decoder would split it: {text[:80]!r}"
        )


def render_completion(
    steps: Sequence[tuple[str, str]],
    tokenizer,
    signal_tokens: Mapping[str, str] | None,
) -> str:
    """The completion text: ``[signal_token +] step`` joined by blank lines, then eos.

    ``signal_tokens`` maps signal name to its token; ``None`` renders the plain (baseline) form.
    A step holding a step boundary is an error (see the module docstring).
    """
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; the completion format needs one")
    parts = []
    for signal, text in steps:
        check_step_text(text)
        if signal_tokens is None:
            parts.append(text)
            continue
        try:
            token = signal_tokens[signal]
        except KeyError:
            raise ValueError(f"step signal {signal!r} is not in the taxonomy ({sorted(signal_tokens)})") from None
        parts.append(token + text)
    return STEP_SEPARATOR.join(parts) + tokenizer.eos_token


def render_example(
    question: str,
    steps: Sequence[tuple[str, str]],
    tokenizer,
    *,
    signal_tokens: Mapping[str, str] | None,
    system_prompt: str = STUDENT_SYSTEM_PROMPT,
    family: str | None = None,
) -> tuple[str, str]:
    """``(prompt, completion)`` for one example; ``steps`` are ``(signal name, step text)`` pairs.

    ``signal_tokens`` (signal name -> token such as ``"<sig:contrast>"``) gives the scaffolded
    completion; ``None`` gives the plain CoT completion. ``family``: the user message is that
    benchmark family's prompt (as at evaluation); None: the bare question.
    """
    prompt = render_prompt(student_user_message(question, family), tokenizer, system_prompt)
    return prompt, render_completion(steps, tokenizer, signal_tokens)


# ---------------------------------------------------------------------------------------------
# benchmark-family prompt templates (the user message; '{question}', other braces are literal)

PROMPT_MATH = (
    "{question}\n\nSolve the problem step by step, with a blank line between steps. "
    "On the last line, write 'The answer is' followed by the final number."
)
PROMPT_MATH_LATEX = (
    "{question}\n\nSolve the problem step by step, with a blank line between steps. "
    "On the last line, write 'The answer is' followed by the final answer in simplest form "
    "(LaTeX is fine)."
)
PROMPT_YESNO = (
    "{question}\n\nThink step by step, with a blank line between steps. "
    "On the last line, write 'The answer is yes.' or 'The answer is no.'"
)
PROMPT_CHOICE = (
    "{question}\n\nThink step by step, with a blank line between steps. "
    "On the last line, write 'The answer is' followed by the letter of the correct option."
)
PROMPT_TEXT = (
    "{question}\n\nThink step by step, with a blank line between steps. "
    "On the last line, write 'The answer is' followed by the short answer (a few words)."
)

FAMILY_TEMPLATES: dict[str, str] = {
    "math": PROMPT_MATH,
    "math_latex": PROMPT_MATH_LATEX,
    "yesno": PROMPT_YESNO,
    "choice": PROMPT_CHOICE,
    "text": PROMPT_TEXT,
}
"""The prompt template of each benchmark family."""


def benchmark_template(family: str) -> str:
    """The prompt template of a benchmark family (``math``, ``yesno``, ``text``, ...; each
    benchmark names its family on its registry entry, :data:`rscaffold.evalsets.loaders.BENCHMARKS`)."""
    try:
        return FAMILY_TEMPLATES[family]
    except KeyError:
        raise ValueError(f"unknown prompt family {family!r}; known: {', '.join(FAMILY_TEMPLATES)}") from None


def benchmark_prompt(family: str, question: str, template: str | None = None) -> str:
    """The user message for ``question`` of a benchmark of ``family``: the family's template (or
    ``template``, a user-set override such as ``teacher.prompt_template``) filled by :func:`fill_prompt`.

    The one prompt builder of the teacher, the training data and the evaluation."""
    return fill_prompt(template if template is not None else benchmark_template(family), question)
