"""Prompts and text formats shared by the teacher, training and evaluation.

Benchmark-family prompt templates (the user message that asks for a step-by-step answer in the
family's answer format): :data:`PROMPT_MATH`, :data:`PROMPT_MATH_LATEX`, :data:`PROMPT_YESNO`,
:data:`PROMPT_CHOICE`, :data:`PROMPT_TEXT` (a user's own problems with short free-text answers).

The student's text format: how a question and its labelled steps become (prompt, completion).

This format is fixed; the evaluation code relies on it.

* prompt: the tokenizer's chat template over a system message (:data:`STUDENT_SYSTEM_PROMPT`)
  and the question as the user message, with the generation prompt (the assistant header).
* scaffolded completion: for each step ``signal_token + step_text``, the steps joined with
  ``"\\n\\n"``, then the tokenizer's eos token (``<|im_end|>`` for SmolLM2)::

      <sig:reasoning>Tom has 3 apples.\\n\\n<sig:conclusion>The answer is 3.<|im_end|>

* plain completion (the CoT-SFT baseline): the same without the signal tokens.

Signal tokens are added to the tokenizer as *special* tokens, so the tokenizer never splits
them and ``decode(..., skip_special_tokens=True)`` removes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from rscaffold.vocabulary import STEP_SEPARATOR

log = logging.getLogger(__name__)

STUDENT_SYSTEM_PROMPT = "Solve the problem step by step. End with 'The answer is N.'"


def render_prompt(question: str, tokenizer, system_prompt: str = STUDENT_SYSTEM_PROMPT) -> str:
    """The chat-templated prompt (system + user question + assistant header), as text."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_completion(
    steps: Sequence[tuple[str, str]],
    tokenizer,
    signal_tokens: Mapping[str, str] | None,
) -> str:
    """The completion text: ``[signal_token +] step`` joined by blank lines, then eos.

    ``signal_tokens`` maps signal name to its token; ``None`` renders the plain (baseline) form.
    """
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; the completion format needs one")
    parts = []
    for signal, text in steps:
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
) -> tuple[str, str]:
    """``(prompt, completion)`` for one example; ``steps`` are ``(signal name, step text)`` pairs.

    ``signal_tokens`` (signal name -> token such as ``"<sig:contrast>"``) gives the scaffolded
    completion; ``None`` gives the plain CoT completion.
    """
    return render_prompt(question, tokenizer, system_prompt), render_completion(steps, tokenizer, signal_tokens)


# ---------------------------------------------------------------------------------------------
# benchmark-family prompt templates (the user message; '{question}' and no other braces)

PROMPT_MATH = (
    "{question}\n\nSolve the problem step by step, with a blank line between steps. "
    "Put the final answer on the last line as 'The answer is N.', where N is the final number."
)
PROMPT_MATH_LATEX = (
    "{question}\n\nSolve the problem step by step, with a blank line between steps. "
    "Put the final answer on the last line as 'The answer is X.', where X is the final answer in "
    "simplest form (LaTeX is fine)."
)
PROMPT_YESNO = (
    "{question}\n\nThink step by step, with a blank line between steps. "
    "Put the final answer on the last line as 'The answer is yes.' or 'The answer is no.'"
)
PROMPT_CHOICE = (
    "{question}\n\nThink step by step, with a blank line between steps. "
    "Put the final answer on the last line as 'The answer is X.', where X is the letter of the "
    "correct option."
)
PROMPT_TEXT = (
    "{question}\n\nThink step by step, with a blank line between steps. "
    "Put the final answer on the last line as 'The answer is X.', where X is the short answer (a few words)."
)
