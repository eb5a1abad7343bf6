"""What a decoder returns (:class:`Generated`), and how a plain output splits into steps."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from rscaffold.segment import split_at_step_boundaries


@dataclass
class Generated:
    """One output. ``text``: the steps joined by blank lines, signal tokens removed.

    ``signals``: the signals that open steps in this output, in order (committed by the gate or
    emitted by the model). ``output_tokens``: tokens the model produced after the prompt (signal
    tokens and the final eos included; padding, and in guided mode a signal token that ended a
    step and was discarded, excluded); never more than ``max_new_tokens``. ``latency_s``: wall
    time spent on this question (a batch's time, in guided mode each round's time, with the KV
    cache each forward pass's time, is split evenly over the questions in it).
    ``steps`` / ``step_signals`` / ``confidences`` / ``signal_sources``: per step, its text, the
    signal that opened it (None: no signal), in guided mode the gate's top probability (None in
    plain mode or when every signal was pruned), and where its signal came from: ``gate``
    (committed by the gate), ``free`` (emitted by the model's own decoding) or ``none``.
    """

    text: str
    signals: list[str]
    output_tokens: int
    latency_s: float
    steps: list[str] = field(default_factory=list)
    step_signals: list[str | None] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)
    signal_sources: list[str] = field(default_factory=list)


def free_sources(step_signals: Sequence[str | None]) -> list[str]:
    """The signal sources of steps the model decoded on its own (plain decoding)."""
    return ["none" if s is None else "free" for s in step_signals]


def split_output(ids: Sequence[int], tokenizer, signal_of: dict[int, str]) -> tuple[list[str], list[str | None]]:
    """Split generated ids (no eos/padding) into step texts and the signal that opens each step.

    The decoder's step rule: a step starts at a signal token and ends at the next signal token or
    at a step boundary (:func:`~rscaffold.segment.split_at_step_boundaries`, the segmenter's rule).
    """
    steps: list[str] = []
    step_signals: list[str | None] = []
    segment: list[int] = []
    current: str | None = None

    def flush():
        parts = split_at_step_boundaries(tokenizer.decode(segment, skip_special_tokens=True))
        for j, p in enumerate(parts):
            steps.append(p)
            step_signals.append(current if j == 0 else None)

    for t in ids:
        if t in signal_of:
            flush()
            segment, current = [], signal_of[t]
        else:
            segment.append(t)
    flush()
    return steps, step_signals


def split_signals(text: str, signal_of_token: dict[str, str]) -> tuple[list[str], list[str | None]]:
    """:func:`split_output` for text: steps and the signal that opens each, a step starting at a
    signal token (its text) and ending at the next one or a step boundary."""
    if not signal_of_token:
        steps = split_at_step_boundaries(text)
        return steps, [None] * len(steps)
    parts = re.split("(" + "|".join(re.escape(t) for t in signal_of_token) + ")", text)
    steps: list[str] = []
    step_signals: list[str | None] = []
    current: str | None = None
    for k, part in enumerate(parts):
        if k % 2:
            current = signal_of_token[part]
            continue
        for j, p in enumerate(split_at_step_boundaries(part)):
            steps.append(p)
            step_signals.append(current if j == 0 else None)
    return steps, step_signals
