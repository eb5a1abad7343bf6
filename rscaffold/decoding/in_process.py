"""Decoding a loaded student in this process: plain (:mod:`~rscaffold.decoding.plain`) or
signal-guided, on the KV cache (:mod:`~rscaffold.decoding.cached`) or by re-encoding
(:mod:`~rscaffold.decoding.reference`), both under :class:`~rscaffold.decoding.policy.GuidedPolicy`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from rscaffold.config import GuidedInferenceConfig
from rscaffold.decoding.output import Generated
from rscaffold.decoding.policy import GuidedSettings, resolve_guided, signal_policy
from rscaffold.kv_cache import supports_row_cache
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT
from rscaffold.student import Student


def generate(
    student: Student,
    questions: Sequence[str],
    *,
    mode: Literal["plain", "guided"] = "plain",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    guided: GuidedInferenceConfig | GuidedSettings | None = None,
    kv_cache: bool = True,
) -> list[Generated]:
    """Answers of ``student`` to ``questions`` (the user messages), one :class:`Generated` each.

    ``mode="guided"`` needs a scaffolded student (signal names and token ids); ``guided`` is a
    config (resolved against the student by :func:`resolve_guided`) or resolved settings. Both
    modes share the total budget ``max_new_tokens``. ``batch_size``: questions decoded together,
    in both modes (outputs do not depend on it). ``kv_cache``: guided decoding keeps each
    question's KV cache across signal prediction, step generation and steps (models whose
    attention is not full fall back to re-encoding); False re-encodes the whole context at every
    step (the reference decoder: the same outputs under greedy decoding, quadratic cost).
    """
    from rscaffold.decoding.cached import generate_guided_cached
    from rscaffold.decoding.plain import generate_plain
    from rscaffold.decoding.reference import generate_guided_reference

    if mode not in ("plain", "guided"):
        raise ValueError(f"mode must be 'plain' or 'guided', got {mode!r}")
    model, tokenizer = student.model, student.tokenizer
    signal_names, signal_token_ids = list(student.signal_names), list(student.signal_token_ids)
    system_prompt = student.system_prompt or STUDENT_SYSTEM_PROMPT
    if len(signal_names) != len(signal_token_ids):
        raise ValueError("signal_names and signal_token_ids must have the same length")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    questions = list(questions)
    if not questions:
        return []
    was_training = model.training
    model.eval()
    try:
        if mode == "plain":
            return generate_plain(
                model,
                tokenizer,
                questions,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                signal_of=dict(zip(signal_token_ids, signal_names)),
                system_prompt=system_prompt,
            )
        if not signal_token_ids:
            raise ValueError("guided decoding needs a scaffolded student (signal names and token ids)")
        settings = guided if isinstance(guided, GuidedSettings) else resolve_guided(guided, student)
        policy = signal_policy(settings, student, max_new_tokens=max_new_tokens)
        run = generate_guided_cached if kv_cache and supports_row_cache(model) else generate_guided_reference
        return run(
            model,
            questions,
            tokenizer=tokenizer,
            policy=policy,
            head=student.head,
            batch_size=batch_size,
            system_prompt=system_prompt,
        )
    finally:
        model.train(was_training)
