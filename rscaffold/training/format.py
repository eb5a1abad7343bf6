"""The student's text format: how a question and its labelled steps become (prompt, completion).

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

import inspect
import logging
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

STUDENT_SYSTEM_PROMPT = "Solve the problem step by step. End with 'The answer is N.'"
STEP_SEPARATOR = "\n\n"


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
            raise ValueError(
                f"step signal {signal!r} is not in the taxonomy ({sorted(signal_tokens)})"
            ) from None
        parts.append(token + text)
    return STEP_SEPARATOR.join(parts) + tokenizer.eos_token


def render_example(
    question: str,
    steps: Sequence[tuple[str, str]],
    tokenizer,
    signal_tokens: Mapping[str, str] | None,
    system_prompt: str = STUDENT_SYSTEM_PROMPT,
) -> tuple[str, str]:
    """``(prompt, completion)`` for one example; ``steps`` are ``(signal name, step text)`` pairs.

    ``signal_tokens`` (signal name -> token such as ``"<sig:contrast>"``) gives the scaffolded
    completion; ``None`` gives the plain CoT completion.
    """
    return render_prompt(question, tokenizer, system_prompt), render_completion(steps, tokenizer, signal_tokens)


def _add_special(tokenizer, tokens: list[str]) -> int:
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:  # transformers >= 5
        return tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer.add_special_tokens(
        {"additional_special_tokens": tokens}, replace_additional_special_tokens=False
    )


def add_signal_tokens(tokenizer, model, signal_tokens: Sequence[str]) -> list[int]:
    """Add the signal tokens as special tokens, grow the embeddings, return their ids (same order).

    Idempotent: tokens the tokenizer already has (a checkpoint being resumed) keep their ids and
    rows. Only rows created here are initialised.

    New rows (input embedding and, if untied, output embedding) are set to the *mean* of the
    existing rows. A random row can have a norm and direction unlike any trained token, so its
    logit ``h . e_new`` can start far above the others and the first steps of training then spend
    their gradient undoing that (and generation is perturbed before any training). The mean row
    gives a logit equal to the average logit, which bounds how much the new tokens change the
    model's next-token distribution (Hewitt, "Initializing new word embeddings for pretrained
    language models", 2021). All signal rows start identical; the signal loss breaks the symmetry
    because each signal appears in different contexts. We set the mean exactly rather than use
    ``resize_token_embeddings(mean_resizing=True)``, which samples around the mean with the full
    covariance (costly for large vocabularies, and random).
    """
    import torch

    tokens = list(signal_tokens)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"signal tokens must be distinct: {tokens}")
    _add_special(tokenizer, tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = tokenizer.unk_token_id
    for tok, i in zip(tokens, ids):
        if i is None or (unk is not None and i == unk):
            raise ValueError(f"signal token {tok!r} was not added to the tokenizer")
        if len(tokenizer(tok, add_special_tokens=False).input_ids) != 1:
            raise ValueError(f"signal token {tok!r} does not tokenize to a single id")

    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old_rows:] = emb[:old_rows].mean(dim=0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[old_rows:] = out.weight[:old_rows].mean(dim=0, keepdim=True)
                if getattr(out, "bias", None) is not None:
                    out.bias[old_rows:] = out.bias[:old_rows].mean()
        log.info("added %d signal tokens; embeddings %d -> %d rows", len(tokens), old_rows, len(tokenizer))
    missing = [i for i in ids if i >= model.get_input_embeddings().weight.shape[0]]
    if missing:
        raise ValueError(f"signal token ids {missing} are outside the model's embedding matrix")
    return list(ids)
