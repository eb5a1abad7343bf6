"""Decoding for students: plain greedy generation and signal-guided generation (DESIGN 1.3).

``plain``: batched greedy decoding with left padding, from the student prompt
(:func:`rscaffold.training.format.render_prompt`) to eos or ``max_new_tokens``.

``guided``: the student alternates between predicting the next signal and generating the step
under it. For each step

1. the next-signal distribution is computed at the last position (token objective: softmax over
   the K signal-token logits; head objective: the signal head on the last hidden state);
2. *pruning*: signals listed in ``guided.prune_signals`` are masked out (the distribution is
   renormalised over the others) and their tokens are suppressed during free decoding, so a
   pruned kind of step is never started;
3. *adaptive gating*: if the top probability is at least ``guided.confidence_threshold`` that
   signal token is committed; otherwise the step is decoded freely (no signal forced; if the
   model itself emits a signal token first, that signal is kept);
4. the step is generated greedily until the blank line that ends a step, a signal token, eos, or
   ``guided.max_step_tokens`` (a step cut there is closed with a blank line).

Decoding stops at eos, after ``guided.max_steps`` steps, or when ``max_new_tokens`` output tokens
(committed signal tokens included) are used. The running completion is kept as text in the
training format (``<sig>step\\n\\n<sig>step...``) and re-tokenized at each step, so the context
the student sees is tokenized exactly as in training.

Guided decoding runs one question at a time (``batch_size`` applies to plain mode only), and each
step re-encodes the context without reusing the KV cache; both are simplicity choices that cost
speed, not quality.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rscaffold.config import GuidedInferenceConfig
from rscaffold.training.format import STEP_SEPARATOR, STUDENT_SYSTEM_PROMPT, render_prompt
from rscaffold.training.student import Student, backbone_of, signal_logits


@dataclass
class Generated:
    """One output. ``text``: the steps joined by blank lines, signal tokens removed.

    ``signals``: the signals that open steps in this output, in order (committed by the gate or
    emitted by the model). ``output_tokens``: tokens the model produced after the prompt (signal
    tokens and the final eos included; padding, and in guided mode a signal token that ended a
    step and was discarded, excluded); never more than ``max_new_tokens``. ``latency_s``: wall
    time spent on this question (a batch's time is split evenly over its questions).
    ``steps`` / ``step_signals`` / ``confidences``: per step, its text, the signal that opened it
    (None: no signal) and, in guided mode, the gate's top probability (None in plain mode or when
    every signal was pruned).
    """

    text: str
    signals: list[str]
    output_tokens: int
    latency_s: float
    steps: list[str] = field(default_factory=list)
    step_signals: list[str | None] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)


def generate(
    student_or_model: Student | Any,
    tokenizer: Any | None = None,
    questions: Sequence[str] = (),
    mode: Literal["plain", "guided"] = "plain",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    guided: GuidedInferenceConfig | None = None,
    signal_names: Sequence[str] | None = None,
    signal_token_ids: Sequence[int] | None = None,
    signal_head: torch.nn.Module | None = None,
    system_prompt: str | None = None,
) -> list[Generated]:
    """Generate answers for ``questions`` with a :class:`Student` (or a model + tokenizer + signal info).

    With a ``Student`` its tokenizer, signal names/ids, head and system prompt are used unless
    given explicitly, and ``generate(student, questions, ...)`` (questions in the tokenizer's
    place) is accepted. ``mode="guided"`` needs signal names and ids (a scaffolded student).
    """
    if isinstance(tokenizer, (list, tuple)) and not questions and all(isinstance(q, str) for q in tokenizer):
        questions, tokenizer = tokenizer, None
    if isinstance(student_or_model, Student):
        s = student_or_model
        model = s.model
        tokenizer = tokenizer or s.tokenizer
        signal_names = list(signal_names if signal_names is not None else s.signal_names)
        signal_token_ids = list(signal_token_ids if signal_token_ids is not None else s.signal_token_ids)
        signal_head = signal_head if signal_head is not None else s.head
        system_prompt = system_prompt or s.system_prompt
    else:
        model = student_or_model
        signal_names = list(signal_names or [])
        signal_token_ids = list(signal_token_ids or [])
    if mode not in ("plain", "guided"):
        raise ValueError(f"mode must be 'plain' or 'guided', got {mode!r}")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed")
    system_prompt = system_prompt or STUDENT_SYSTEM_PROMPT
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
            return _generate_plain(model, tokenizer, questions, max_new_tokens, batch_size, signal_names, signal_token_ids, system_prompt)
        else:
            if not signal_token_ids:
                raise ValueError("guided decoding needs a scaffolded student (signal names and token ids)")
            guided = guided or GuidedInferenceConfig()
            unknown = sorted(set(guided.prune_signals) - set(signal_names))
            if unknown:
                raise ValueError(f"prune_signals {unknown} are not signals of this student ({signal_names})")
            return [
                _generate_guided(model, tokenizer, q, max_new_tokens, guided, signal_names, signal_token_ids, signal_head, system_prompt)
                for q in questions
            ]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _greedy_kwargs(tokenizer) -> dict[str, Any]:
    # Override sampling settings a saved generation_config may carry.
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)


def split_output(ids: Sequence[int], tokenizer, signal_of: dict[int, str]) -> tuple[list[str], list[str | None]]:
    """Split generated ids (no eos/padding) into step texts and the signal that opens each step."""
    steps: list[str] = []
    step_signals: list[str | None] = []
    segment: list[int] = []
    current: str | None = None

    def flush():
        text = tokenizer.decode(segment, skip_special_tokens=True)
        parts = [p.strip() for p in text.split(STEP_SEPARATOR)]
        parts = [p for p in parts if p]
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


@torch.no_grad()
def _generate_plain(model, tokenizer, questions, max_new_tokens, batch_size, signal_names, signal_token_ids, system_prompt):
    signal_of = dict(zip(signal_token_ids, signal_names))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    dev = _device(model)
    out: list[Generated] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(questions), batch_size):
            chunk = questions[i : i + batch_size]
            prompts = [render_prompt(q, tokenizer, system_prompt) for q in chunk]
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(dev)
            t0 = time.perf_counter()
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos, **_greedy_kwargs(tokenizer))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_q = (time.perf_counter() - t0) / len(chunk)
            new = gen[:, enc["input_ids"].shape[1] :].tolist()
            for row in new:
                n = len(row)
                if eos in row:
                    n = row.index(eos) + 1
                elif pad != eos:
                    while n and row[n - 1] == pad:
                        n -= 1
                body = [t for t in row[:n] if t != eos]
                steps, step_signals = split_output(body, tokenizer, signal_of)
                out.append(
                    Generated(
                        text=STEP_SEPARATOR.join(steps),
                        signals=[s for s in step_signals if s is not None],
                        output_tokens=n,
                        latency_s=per_q,
                        steps=steps,
                        step_signals=step_signals,
                        confidences=[None] * len(steps),
                    )
                )
    finally:
        tokenizer.padding_side = old_side
    return out


@torch.no_grad()
def next_signal_distribution(model, input_ids: torch.Tensor, signal_token_ids, head=None, pruned: Sequence[int] = ()) -> torch.Tensor | None:
    """Probabilities over the K signals for the next step of ``input_ids`` (1, L); pruned indices get 0.

    Returns None when every signal is pruned.
    """
    hidden = backbone_of(model)(input_ids=input_ids).last_hidden_state[:, -1]
    logits = signal_logits(model, hidden, list(signal_token_ids), head)[0]
    if pruned:
        logits[list(pruned)] = float("-inf")
        if torch.isinf(logits).all():
            return None
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def _generate_guided(model, tokenizer, question, max_new_tokens, guided: GuidedInferenceConfig, signal_names, signal_token_ids, head, system_prompt) -> Generated:
    t0 = time.perf_counter()
    dev = _device(model)
    eos = tokenizer.eos_token_id
    signal_of = dict(zip(signal_token_ids, signal_names))
    token_of = {n: tokenizer.convert_ids_to_tokens(i) for n, i in zip(signal_names, signal_token_ids)}
    pruned_idx = [k for k, n in enumerate(signal_names) if n in set(guided.prune_signals)]
    pruned_ids = [signal_token_ids[k] for k in pruned_idx]
    prompt_ids = tokenizer(render_prompt(question, tokenizer, system_prompt), add_special_tokens=False)["input_ids"]

    completion = ""  # the running completion in the training format (signal tokens inline)
    steps: list[str] = []
    step_signals: list[str | None] = []
    confidences: list[float | None] = []
    produced = 0  # tokens generated so far (committed signals, step bodies, eos)

    for _ in range(guided.max_steps):
        budget = max_new_tokens - produced
        if budget <= 0:
            break
        ctx = list(prompt_ids) + (tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else [])
        probs = next_signal_distribution(model, torch.tensor([ctx], device=dev), signal_token_ids, head, pruned_idx)
        signal: str | None = None
        conf: float | None = None
        if probs is not None:
            conf, k = (float(x) for x in probs.max(dim=-1))
            if conf >= guided.confidence_threshold:
                signal = signal_names[int(k)]
                completion += token_of[signal]
                ctx.append(signal_token_ids[int(k)])
                produced += 1
        body, stop, stop_id = _generate_step(model, tokenizer, ctx, min(guided.max_step_tokens, max_new_tokens - produced), signal_token_ids, pruned_ids, dev)
        if signal is None and stop == "signal" and not body:
            # Free decoding opened the step with a signal of the model's own choosing: keep it.
            signal = signal_of[stop_id]
            completion += token_of[signal]
            ctx.append(stop_id)
            produced += 1
            body, stop, stop_id = _generate_step(model, tokenizer, ctx, min(guided.max_step_tokens, max_new_tokens - produced), signal_token_ids, pruned_ids, dev)
        produced += len(body) + (1 if stop == "eos" else 0)
        text = tokenizer.decode(body, skip_special_tokens=True)
        if STEP_SEPARATOR in text:
            text = text.split(STEP_SEPARATOR, 1)[0]
        text = text.strip()
        steps.append(text)
        step_signals.append(signal)
        confidences.append(conf)
        if stop == "eos":
            break
        if text or signal is not None:
            completion += text + STEP_SEPARATOR
        if stop == "budget":
            break

    keep = [(t, s, c) for t, s, c in zip(steps, step_signals, confidences) if t or s]
    return Generated(
        text=STEP_SEPARATOR.join(t for t, _, _ in keep if t),
        signals=[s for _, s, _ in keep if s is not None],
        output_tokens=produced,
        latency_s=time.perf_counter() - t0,
        steps=[t for t, _, _ in keep],
        step_signals=[s for _, s, _ in keep],
        confidences=[c for _, _, c in keep],
    )


def _generate_step(model, tokenizer, ctx: list[int], max_tokens: int, signal_token_ids, suppress_ids, dev) -> tuple[list[int], str, int | None]:
    """Greedy-decode one step body after ``ctx``; returns (body ids, why it stopped, stop token).

    Why: ``"eos"``, ``"signal"`` (a signal token began the next step; it is not in the body and is
    returned as the stop token), ``"separator"`` (the blank line that ends a step), ``"length"``
    (``max_tokens`` reached), ``"budget"`` (no tokens left).
    """
    if max_tokens <= 0:
        return [], "budget", None
    eos = tokenizer.eos_token_id
    input_ids = torch.tensor([ctx], device=dev)
    gen = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_tokens,
        eos_token_id=[eos, *signal_token_ids],
        stop_strings=[STEP_SEPARATOR],
        tokenizer=tokenizer,
        suppress_tokens=list(suppress_ids) or None,
        **_greedy_kwargs(tokenizer),
    )
    new = gen[0, len(ctx) :].tolist()
    sig = set(signal_token_ids)
    for j, t in enumerate(new):
        if t == eos:
            return new[:j], "eos", t
        if t in sig:
            return new[:j], "signal", t
    if STEP_SEPARATOR in tokenizer.decode(new, skip_special_tokens=True):
        return new, "separator", None
    return new, "length", None
