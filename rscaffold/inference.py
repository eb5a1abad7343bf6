"""Decoding for students: plain greedy generation and signal-guided generation (DESIGN 1.3).

``plain``: batched greedy decoding with left padding, from the student prompt
(:func:`rscaffold.prompts.render_prompt`) to eos or ``max_new_tokens``.

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

Guided decoding is batched like plain decoding: up to ``batch_size`` questions are decoded
together, each with its own state (completion so far, steps, token budget). Every round does one
step for every active question: one forward pass over the left-padded contexts scores the next
signal of all of them, then one batched ``generate`` call decodes all their step bodies, each row
stopping on its own (eos, signal token, blank line, its own token budget). A question that
finishes leaves the batch and the next waiting question takes its place (continuous batching),
so short answers do not wait for long ones. Where each row stopped is recomputed from its tokens
with the same stopping rules ``generate`` applies (the rows of a finished sequence are padded),
so under greedy decoding every question gets exactly what it gets when decoded alone
(``batch_size=1``), up to floating-point differences from padding. Each step still re-encodes
the context without reusing the KV cache (a simplicity choice that costs speed, not quality).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rscaffold.config import GuidedInferenceConfig
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, render_prompt
from rscaffold.student import Student, backbone_of, signal_logits
from rscaffold.vocabulary import STEP_SEPARATOR


@dataclass
class Generated:
    """One output. ``text``: the steps joined by blank lines, signal tokens removed.

    ``signals``: the signals that open steps in this output, in order (committed by the gate or
    emitted by the model). ``output_tokens``: tokens the model produced after the prompt (signal
    tokens and the final eos included; padding, and in guided mode a signal token that ended a
    step and was discarded, excluded); never more than ``max_new_tokens``. ``latency_s``: wall
    time spent on this question (a batch's time, in guided mode each round's time, is split
    evenly over the questions in it).
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
    student: Student,
    questions: Sequence[str],
    *,
    mode: Literal["plain", "guided"] = "plain",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    guided: GuidedInferenceConfig | None = None,
) -> list[Generated]:
    """Answers of ``student`` to ``questions`` (the user messages), one :class:`Generated` each.

    ``mode="guided"`` needs a scaffolded student (signal names and token ids). ``batch_size``:
    questions decoded together, in both modes (outputs do not depend on it).
    """
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
            return _generate_plain(
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
        guided = guided or GuidedInferenceConfig()
        unknown = sorted(set(guided.prune_signals) - set(signal_names))
        if unknown:
            raise ValueError(f"prune_signals {unknown} are not signals of this student ({signal_names})")
        pruned_idx = [k for k, n in enumerate(signal_names) if n in set(guided.prune_signals)]
        setup = _GuidedSetup(
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            guided=guided,
            signal_names=signal_names,
            signal_token_ids=signal_token_ids,
            head=student.head,
            signal_of=dict(zip(signal_token_ids, signal_names)),
            token_of={n: tokenizer.convert_ids_to_tokens(i) for n, i in zip(signal_names, signal_token_ids)},
            pruned_idx=pruned_idx,
            pruned_ids=[signal_token_ids[k] for k in pruned_idx],
            stop_criteria=_step_stop_criteria(tokenizer),
        )
        return _generate_guided(model, questions, setup=setup, batch_size=batch_size, system_prompt=system_prompt)
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
def _generate_plain(model, tokenizer, questions, *, max_new_tokens, batch_size, signal_of, system_prompt):
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


def _left_pad(ctxs: Sequence[Sequence[int]], pad_id: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of token lists."""
    width = max(len(c) for c in ctxs)
    ids = torch.full((len(ctxs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ctxs), width), dtype=torch.long)
    for b, c in enumerate(ctxs):
        if c:
            ids[b, width - len(c) :] = torch.as_tensor(list(c), dtype=torch.long)
            mask[b, width - len(c) :] = 1
    return ids.to(dev), mask.to(dev)


@torch.no_grad()
def next_signal_distributions(
    model, ctxs: Sequence[Sequence[int]], signal_token_ids, *, head=None, pruned: Sequence[int] = (), pad_id: int = 0
) -> torch.Tensor | None:
    """Probabilities over the K signals for the next step of each context, ``(B, K)`` float32.

    The contexts are left-padded into one forward pass (positions counted from each row's first
    real token, as in ``generate``). Pruned indices get probability 0; returns None when every
    signal is pruned.
    """
    dev = _device(model)
    input_ids, mask = _left_pad(ctxs, pad_id, dev)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone_of(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state[
        :, -1
    ]
    logits = signal_logits(model, hidden, list(signal_token_ids), head=head)
    if pruned:
        logits[:, list(pruned)] = float("-inf")
        if torch.isinf(logits).all():
            return None
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def next_signal_distribution(
    model, input_ids: torch.Tensor, signal_token_ids, *, head=None, pruned: Sequence[int] = ()
) -> torch.Tensor | None:
    """Probabilities over the K signals for the next step of ``input_ids`` (1, L); pruned indices get 0.

    Returns None when every signal is pruned.
    """
    probs = next_signal_distributions(model, [input_ids[0].tolist()], signal_token_ids, head=head, pruned=pruned)
    return None if probs is None else probs[0]


@dataclass
class _GuidedRow:
    """The decoding state of one question in guided mode."""

    index: int
    prompt_ids: list[int]
    completion: str = ""  # the running completion in the training format (signal tokens inline)
    steps: list[str] = field(default_factory=list)
    step_signals: list[str | None] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)
    produced: int = 0  # tokens generated so far (committed signals, step bodies, eos)
    rounds: int = 0
    done: bool = False
    latency_s: float = 0.0

    def result(self) -> Generated:
        keep = [(t, s, c) for t, s, c in zip(self.steps, self.step_signals, self.confidences) if t or s]
        return Generated(
            text=STEP_SEPARATOR.join(t for t, _, _ in keep if t),
            signals=[s for _, s, _ in keep if s is not None],
            output_tokens=self.produced,
            latency_s=self.latency_s,
            steps=[t for t, _, _ in keep],
            step_signals=[s for _, s, _ in keep],
            confidences=[c for _, _, c in keep],
        )


@dataclass
class _GuidedSetup:
    tokenizer: Any
    max_new_tokens: int
    guided: GuidedInferenceConfig
    signal_names: list[str]
    signal_token_ids: list[int]
    head: Any
    signal_of: dict[int, str]
    token_of: dict[str, str]
    pruned_idx: list[int]
    pruned_ids: list[int]
    stop_criteria: Any


def _step_stop_criteria(tokenizer):
    """What ``generate()`` builds for ``stop_strings=[STEP_SEPARATOR]``, built once: passed to
    ``generate`` and reused to find where each row stopped."""
    from transformers import StopStringCriteria

    return StopStringCriteria(tokenizer=tokenizer, stop_strings=[STEP_SEPARATOR])


@torch.no_grad()
def _generate_guided(model, questions, *, setup: _GuidedSetup, batch_size: int, system_prompt: str) -> list[Generated]:
    tokenizer = setup.tokenizer
    dev = _device(model)
    waiting = deque(range(len(questions)))
    active: list[_GuidedRow] = []
    out: list[Generated | None] = [None] * len(questions)
    while waiting or active:
        while waiting and len(active) < batch_size:
            i = waiting.popleft()
            prompt = render_prompt(questions[i], tokenizer, system_prompt)
            active.append(_GuidedRow(index=i, prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        t0 = time.perf_counter()
        _guided_round(model, active, setup, dev=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        share = (time.perf_counter() - t0) / len(active)
        for row in active:
            row.latency_s += share
            if row.done:
                out[row.index] = row.result()
        active = [r for r in active if not r.done]
    return [g for g in out if g is not None]


def _guided_round(model, rows: list[_GuidedRow], su: _GuidedSetup, *, dev) -> None:
    """One step for every row: predict (and gate) its signal, then generate the step under it."""
    tok, guided = su.tokenizer, su.guided
    for r in rows:
        if su.max_new_tokens - r.produced <= 0:
            r.done = True
    live = [r for r in rows if not r.done]
    if not live:
        return
    ctxs = [
        list(r.prompt_ids) + (tok(r.completion, add_special_tokens=False)["input_ids"] if r.completion else [])
        for r in live
    ]
    probs = next_signal_distributions(
        model, ctxs, su.signal_token_ids, head=su.head, pruned=su.pruned_idx, pad_id=tok.pad_token_id
    )
    signals: list[str | None] = [None] * len(live)
    confs: list[float | None] = [None] * len(live)
    if probs is not None:
        top, arg = probs.max(dim=-1)
        for b, r in enumerate(live):
            confs[b] = float(top[b])
            if confs[b] >= guided.confidence_threshold:
                k = int(arg[b])
                signals[b] = su.signal_names[k]
                r.completion += su.token_of[signals[b]]
                ctxs[b].append(su.signal_token_ids[k])
                r.produced += 1
    budgets = [min(guided.max_step_tokens, su.max_new_tokens - r.produced) for r in live]
    results = _generate_steps(model, ctxs, budgets, su=su, dev=dev)
    # Free decoding that opened the step with a signal of the model's own choosing: keep that
    # signal and generate the step under it.
    again = [b for b, (body, stop, _) in enumerate(results) if signals[b] is None and stop == "signal" and not body]
    for b in again:
        stop_id = results[b][2]
        signals[b] = su.signal_of[stop_id]
        live[b].completion += su.token_of[signals[b]]
        ctxs[b].append(stop_id)
        live[b].produced += 1
    if again:
        redone = _generate_steps(
            model,
            [ctxs[b] for b in again],
            [min(guided.max_step_tokens, su.max_new_tokens - live[b].produced) for b in again],
            su=su,
            dev=dev,
        )
        for b, res in zip(again, redone):
            results[b] = res
    for b, r in enumerate(live):
        body, stop, _ = results[b]
        r.produced += len(body) + (1 if stop == "eos" else 0)
        text = tok.decode(body, skip_special_tokens=True)
        if STEP_SEPARATOR in text:
            text = text.split(STEP_SEPARATOR, 1)[0]
        text = text.strip()
        r.steps.append(text)
        r.step_signals.append(signals[b])
        r.confidences.append(confs[b])
        r.rounds += 1
        if stop == "eos":
            r.done = True
            continue
        if text or signals[b] is not None:
            r.completion += text + STEP_SEPARATOR
        if stop == "budget" or r.rounds >= guided.max_steps:
            r.done = True


def _generate_steps(
    model, ctxs: list[list[int]], budgets: list[int], *, su: _GuidedSetup, dev
) -> list[tuple[list[int], str, int | None]]:
    """Greedy-decode one step body after each context, all rows in one ``generate`` call.

    Returns per row (body ids, why it stopped, stop token). Why: ``"eos"``, ``"signal"`` (a signal
    token began the next step; it is not in the body and is returned as the stop token),
    ``"separator"`` (the blank line that ends a step), ``"length"`` (the row's token budget, or a
    stop string that did not decode to a blank line), ``"budget"`` (no tokens left).

    ``generate`` runs to the largest budget and pads rows that finished; each row's own stop is
    found again by applying, token by token, the rules ``generate`` applied (eos/signal ids, the
    blank-line stop string over the whole sequence, the row's budget), so a row's result does not
    depend on the other rows.
    """
    from transformers import StoppingCriteriaList

    tok = su.tokenizer
    results: list[tuple[list[int], str, int | None]] = [([], "budget", None) for _ in ctxs]
    todo = [b for b, n in enumerate(budgets) if n > 0]
    if not todo:
        return results
    eos = tok.eos_token_id
    input_ids, mask = _left_pad([ctxs[b] for b in todo], tok.pad_token_id, dev)
    width = input_ids.shape[1]
    longest = max(budgets[b] for b in todo)
    gen = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=longest,
        eos_token_id=[eos, *su.signal_token_ids],
        # stop_strings=[STEP_SEPARATOR], with the criterion built once instead of on every call
        stopping_criteria=StoppingCriteriaList([su.stop_criteria]),
        suppress_tokens=list(su.pruned_ids) or None,
        **_greedy_kwargs(tok),
    )
    new = gen[:, width:].tolist()
    n_new = gen.shape[1] - width
    # fired[b][t]: the stop string ends at new token t of row b (checked over the whole sequence)
    fired = [[False] * n_new for _ in todo]
    for t in range(n_new):
        hit = su.stop_criteria(gen[:, : width + t + 1], None).tolist()
        for j in range(len(todo)):
            fired[j][t] = bool(hit[j])
    sig = set(su.signal_token_ids)
    for j, b in enumerate(todo):
        row = new[j]
        body: list[int] | None = None
        for t in range(min(len(row), budgets[b])):
            tid = row[t]
            if tid == eos:
                results[b] = (row[:t], "eos", tid)
                break
            if tid in sig:
                results[b] = (row[:t], "signal", tid)
                break
            if fired[j][t] or t + 1 == budgets[b]:
                body = row[: t + 1]
                break
        else:
            body = row[: budgets[b]]
        if body is not None:
            stop = "separator" if STEP_SEPARATOR in tok.decode(body, skip_special_tokens=True) else "length"
            results[b] = (body, stop, None)
    return results
