"""Decoding for students: plain greedy generation and signal-guided generation (DESIGN 1.3).

``plain``: batched greedy decoding with left padding, from the student prompt
(:func:`rscaffold.prompts.render_prompt`) to eos or ``max_new_tokens``.

``guided``: the student alternates between predicting the next signal and generating the step
under it. For each step

1. the next-signal distribution is computed at the last position (token objective: softmax over
   the K signal-token logits; head objective: the signal head on the last hidden state);
2. *pruning*: the pruned signals (default: the taxonomy's non-essential ones, kept with the
   student) are masked out (the distribution is renormalised over the others) and their tokens
   are suppressed during free decoding, so a pruned kind of step is never started;
3. *adaptive gating*: if the top probability is at least the confidence threshold (default:
   calibrated on the validation split, :func:`calibrate_gate`) that signal token is committed;
   otherwise the step is decoded freely (no signal forced; if the model itself emits a signal
   token first, that signal is kept);
4. the step is generated greedily until it ends where training taught it to end: the next signal
   token, eos, or the step boundary (a blank line, :data:`rscaffold.vocabulary.STEP_BOUNDARY`,
   the segmenter's rule) after the step's text (a step is never empty, as in training). A
   per-step safety cap (default: the longest step of the student's training data, kept with the
   student) closes a step that runs past every training step; the cap never cuts a step shorter
   than the training data's.

**Budget.** Guided decoding has the same total token budget as plain decoding: decoding stops at
eos or when ``max_new_tokens`` output tokens (committed signal tokens included) are used. The
number of steps is bounded by that budget only (``guided.max_steps`` is an optional extra
bound, off by default). The running completion is kept as text in the training format
(``<sig>step\\n\\n<sig>step...``) and re-tokenized at each step, so the context the student
sees is tokenized exactly as in training.

Guided decoding is batched like plain decoding: up to ``batch_size`` questions are decoded
together, each with its own state (completion so far, steps, token budget). Every round does one
step for every active question: one forward pass over the left-padded contexts scores the next
signal of all of them, then one batched ``generate`` call decodes all their step bodies, each row
stopping on its own (eos, signal token, step boundary, its own token budget). A question that
finishes leaves the batch and the next waiting question takes its place (continuous batching),
so short answers do not wait for long ones. Where each row stopped is recomputed from its tokens
with the same stopping rules ``generate`` applies (the rows of a finished sequence are padded),
so under greedy decoding every question gets exactly what it gets when decoded alone
(``batch_size=1``), up to floating-point differences from padding.

**KV cache.** The reference decoder (``kv_cache=False``) re-encodes each question's whole context
at every step, so its cost grows with the square of the output length. The default keeps each
question's keys and values in a :class:`~rscaffold.kv_cache.RowCache` and runs one token per
forward pass, with no rounds: the rows of the batch move on independently. In each forward pass
a row inside a step feeds its last chosen token (or the signal token that opens the step) and
gets its next token; a row whose step has just ended (or that has just joined the batch) records
the step as the reference does, re-tokenizes its completion (as the reference sees it; only the
text from its last signal token on is tokenized again, which gives the same ids with a fast
tokenizer whose signal tokens take no whitespace around them), takes back
what its cache holds past the common prefix with that context and feeds the rest (usually the
last step's few tokens: re-tokenizing a step's text can differ from the generated ids near its
end), in the same forward pass as the other rows' single tokens; its last hidden state gives its
next-signal distribution (and, with no signal committed, its first token). A row that finishes
hands its place in the batch to the next waiting question at once. One LM-head call and one
argmax serve the whole batch per forward pass, and the step-boundary check decodes a row's last
tokens only when they hold the two newlines a step end needs. Under greedy decoding both give
the same outputs (tested on tiny models with every stopping path and hundreds of output
tokens); only models whose every layer attends to the full context use the cache (others fall
back to re-encoding).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rscaffold.config import GuidedInferenceConfig
from rscaffold.kv_cache import RowCache, supports_row_cache
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, render_prompt
from rscaffold.segment import split_at_step_boundaries
from rscaffold.student import Student, backbone_of, boundary_signal_logits, causal_lm_of, signal_logits
from rscaffold.vocabulary import STEP_BOUNDARY, STEP_SEPARATOR


@dataclass
class Generated:
    """One output. ``text``: the steps joined by blank lines, signal tokens removed.

    ``signals``: the signals that open steps in this output, in order (committed by the gate or
    emitted by the model). ``output_tokens``: tokens the model produced after the prompt (signal
    tokens and the final eos included; padding, and in guided mode a signal token that ended a
    step and was discarded, excluded); never more than ``max_new_tokens``. ``latency_s``: wall
    time spent on this question (a batch's time, in guided mode each round's time, with the KV
    cache each forward pass's time, is split evenly over the questions in it).
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


@dataclass(frozen=True)
class GuidedSettings:
    """Signal-guided decoding as it runs, every switch resolved (see :func:`resolve_guided`).

    ``confidence_threshold``: the gate commits a signal whose probability is at least this (0:
    always, i.e. no gating). ``prune_signals``: never committed, their tokens suppressed.
    ``max_step_tokens``: the per-step safety cap (None: none; the budget still bounds a step).
    ``max_steps``: an optional bound on the number of steps (None: the token budget bounds it).
    """

    confidence_threshold: float = 0.0
    prune_signals: tuple[str, ...] = ()
    max_step_tokens: int | None = None
    max_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence_threshold": self.confidence_threshold,
            "prune_signals": list(self.prune_signals),
            "max_step_tokens": self.max_step_tokens,
            "max_steps": self.max_steps,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidedSettings:
        return cls(
            confidence_threshold=float(d["confidence_threshold"]),
            prune_signals=tuple(d.get("prune_signals") or ()),
            max_step_tokens=d.get("max_step_tokens"),
            max_steps=d.get("max_steps"),
        )


def resolve_guided(
    cfg: GuidedInferenceConfig | None,
    student: Student,
    *,
    threshold: float | None = None,
    gate: bool = True,
    prune: bool = True,
) -> GuidedSettings:
    """The settings guided decoding of ``student`` runs with, from the config and the student.

    * threshold: ``cfg.confidence_threshold`` when set; else ``threshold`` (a calibrated value,
      :func:`calibrate_gate`); else ``cfg.calibration_precision`` (no validation data: the
      student's probabilities taken at face value). ``gate=False``: 0 (every signal committed).
    * pruned signals: ``cfg.prune_signals`` when set; else the student's non-essential signals
      (the taxonomy's ``essential: false``, saved with the student). ``prune=False``: none.
    * per-step cap: ``cfg.max_step_tokens`` when set; else the longest step of the student's
      training data (saved with the student; None for a student saved without it).
    """
    cfg = cfg or GuidedInferenceConfig()
    if not gate:
        thr = 0.0
    elif cfg.confidence_threshold is not None:
        thr = float(cfg.confidence_threshold)
    elif threshold is not None:
        thr = float(threshold)
    else:
        thr = float(cfg.calibration_precision)
    pruned = (cfg.prune_signals if cfg.prune_signals is not None else student.nonessential_signals) if prune else []
    cap = cfg.max_step_tokens if cfg.max_step_tokens is not None else student.longest_step_tokens
    return GuidedSettings(
        confidence_threshold=thr, prune_signals=tuple(pruned), max_step_tokens=cap, max_steps=cfg.max_steps
    )


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
        settings = guided if isinstance(guided, GuidedSettings) else resolve_guided(guided, student)
        unknown = sorted(set(settings.prune_signals) - set(signal_names))
        if unknown:
            raise ValueError(f"prune_signals {unknown} are not signals of this student ({signal_names})")
        pruned_idx = [k for k, n in enumerate(signal_names) if n in set(settings.prune_signals)]
        setup = _GuidedSetup(
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            guided=settings,
            signal_names=signal_names,
            signal_token_ids=signal_token_ids,
            head=student.head,
            signal_of=dict(zip(signal_token_ids, signal_names)),
            token_of={n: tokenizer.convert_ids_to_tokens(i) for n, i in zip(signal_names, signal_token_ids)},
            pruned_idx=pruned_idx,
            pruned_ids=[signal_token_ids[k] for k in pruned_idx],
        )
        if kv_cache and supports_row_cache(model):
            return _generate_guided_cached(
                model, questions, setup=setup, batch_size=batch_size, system_prompt=system_prompt
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
    return _signal_probs(model, hidden, signal_token_ids, head=head, pruned=pruned)


def _signal_probs(model, hidden: torch.Tensor, signal_token_ids, *, head, pruned: Sequence[int]) -> torch.Tensor | None:
    """The next-signal distribution ``(B, K)`` from last hidden states ``(B, H)``; pruned
    signals get 0; None when every signal is pruned."""
    return _probs_of_signal_logits(signal_logits(model, hidden, list(signal_token_ids), head=head), pruned)


def _probs_of_signal_logits(logits: torch.Tensor, pruned: Sequence[int]) -> torch.Tensor | None:
    """:func:`_signal_probs` from the signal logits ``(B, K)`` (float32; changed in place)."""
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

    def end_step(
        self,
        text: str,
        *,
        signal: str | None,
        confidence: float | None,
        stop: str,
        tokens: int,
        max_new_tokens: int,
        max_steps: int | None,
    ) -> None:
        """Record a step that has ended: its text, the signal that opened it, the gate's top
        probability, why it stopped (``eos``, ``signal``, ``separator``, ``length``, ``budget``)
        and the output tokens it used; the row is done at eos, when the budget is used up, or
        after ``max_steps`` steps. Every guided decoder (in-process, on the KV cache, through a
        server) keeps its rows' steps with this."""
        self.produced += tokens
        self.steps.append(text)
        self.step_signals.append(signal)
        self.confidences.append(confidence)
        self.rounds += 1
        if stop == "eos":
            self.done = True
            return
        if text or signal is not None:
            self.completion += text + STEP_SEPARATOR
        if stop == "budget" or (max_steps is not None and self.rounds >= max_steps):
            self.done = True
        elif max_new_tokens - self.produced <= 0:
            self.done = True  # no token left for another step

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
    guided: GuidedSettings
    signal_names: list[str]
    signal_token_ids: list[int]
    head: Any
    signal_of: dict[int, str]
    token_of: dict[str, str]
    pruned_idx: list[int]
    pruned_ids: list[int]


# The end of a step: text, then a step boundary. Whitespace before a step's first text is not an
# end (no training step is empty), so a step cannot be closed before it has begun.
_STEP_END = re.compile(r"\S[^\S\n]*" + STEP_BOUNDARY.pattern)


def step_text(decoded: str) -> str:
    """The text of a generated step body: leading whitespace dropped, cut at its end (text, then a
    step boundary), stripped."""
    return STEP_BOUNDARY.split(decoded.lstrip(), maxsplit=1)[0].strip()


class StepBoundaryStop:
    """A ``generate`` stopping criterion: a row stops once its generated text (the tokens after
    position ``start``) ends a step: some text, then a step boundary
    (:data:`~rscaffold.vocabulary.STEP_BOUNDARY`). Whitespace before the step's first text does not
    end it, as no training step is empty (otherwise a student that answers a forced signal with a
    blank line would spend its budget on empty steps).

    Only the last ``window`` generated tokens are decoded at each check (a step end is a character
    and a few whitespace characters, and a row stops at its first one), so a check costs the same
    at any step length. It is a pure function of the sequence, so where a row stopped can be found
    again by applying it to each prefix.
    """

    window = 8

    def __init__(self, tokenizer, start: int):
        self.tokenizer = tokenizer
        self.start = start

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        lo = max(self.start, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, lo:].tolist(), skip_special_tokens=True)
        return torch.tensor([bool(_STEP_END.search(t)) for t in tails], device=input_ids.device)


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


def _step_budget(su: _GuidedSetup, row: _GuidedRow) -> int:
    """Tokens the next step body of ``row`` may take: what is left of the total budget, and at
    most the per-step safety cap."""
    left = su.max_new_tokens - row.produced
    cap = su.guided.max_step_tokens
    return left if cap is None else min(cap, left)


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
    results = _generate_steps(model, ctxs, [_step_budget(su, r) for r in live], su=su, dev=dev)
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
            model, [ctxs[b] for b in again], [_step_budget(su, live[b]) for b in again], su=su, dev=dev
        )
        for b, res in zip(again, redone):
            results[b] = res
    for b, r in enumerate(live):
        body, stop, _ = results[b]
        r.end_step(
            step_text(tok.decode(body, skip_special_tokens=True)),
            signal=signals[b],
            confidence=confs[b],
            stop=stop,
            tokens=len(body) + (1 if stop == "eos" else 0),
            max_new_tokens=su.max_new_tokens,
            max_steps=guided.max_steps,
        )


def _generate_steps(
    model, ctxs: list[list[int]], budgets: list[int], *, su: _GuidedSetup, dev
) -> list[tuple[list[int], str, int | None]]:
    """Greedy-decode one step body after each context, all rows in one ``generate`` call.

    Returns per row (body ids, why it stopped, stop token). Why: ``"eos"``, ``"signal"`` (a signal
    token began the next step; it is not in the body and is returned as the stop token),
    ``"separator"`` (the step boundary that ends a step), ``"length"`` (the row's token budget:
    the rest of the total budget or the per-step cap), ``"budget"`` (no tokens left).

    ``generate`` runs to the largest budget and pads rows that finished; each row's own stop is
    found again by applying, token by token, the rules ``generate`` applied (eos/signal ids, the
    step boundary in the generated text, the row's budget), so a row's result does not depend on
    the other rows.
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
    boundary = StepBoundaryStop(tok, start=width)
    gen = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=longest,
        eos_token_id=[eos, *su.signal_token_ids],
        stopping_criteria=StoppingCriteriaList([boundary]),
        suppress_tokens=list(su.pruned_ids) or None,
        **_greedy_kwargs(tok),
    )
    new = gen[:, width:].tolist()
    n_new = gen.shape[1] - width
    # fired[b][t]: the generated text of row b holds a step boundary once new token t is in
    fired = [[False] * n_new for _ in todo]
    for t in range(n_new):
        hit = boundary(gen[:, : width + t + 1]).tolist()
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
            stop = "separator" if _STEP_END.search(tok.decode(body, skip_special_tokens=True)) else "length"
            results[b] = (body, stop, None)
    return results


# ---------------------------------------------------------------------------------------------
# guided decoding on a KV cache: the same algorithm as _generate_guided / _guided_round /
# _generate_steps, one token per forward pass on a RowCache instead of re-encoding the context,
# each row on its own schedule (no rounds)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n, chunk = 0, 256
    end = min(len(a), len(b))
    while n + chunk <= end and a[n : n + chunk] == b[n : n + chunk]:  # whole chunks, compared in C
        n += chunk
    for x, y in zip(a[n:end], b[n:end]):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _StepState:
    """One row's step on the cache, from its signal to its end."""

    budget: int
    signal: str | None = None  # the signal that opened the step (committed or emitted by the model)
    confidence: float | None = None  # the gate's top probability (None: every signal pruned)
    body: list[int] = field(default_factory=list)
    newlines: list[int] = field(default_factory=list)  # per body token: the newlines in its text
    stop: str | None = None  # set when the step ended: eos / signal / separator / length / budget
    pending: int | None = None  # the token to feed next (the committed signal, or the last chosen token)


@torch.no_grad()
def _generate_guided_cached(
    model, questions, *, setup: _GuidedSetup, batch_size: int, system_prompt: str
) -> list[Generated]:
    """:func:`_generate_guided` on a :class:`RowCache`, each row on its own schedule.

    Every forward pass feeds each row of the batch what it needs next: a row inside a step feeds
    its last chosen token (or the signal token that opens the step); a row whose step has just
    ended (or that has just joined) feeds its context — the prompt and the completion
    re-tokenized, as the reference decoder sees it — from where it differs from what the cache
    holds (usually the last step's few tokens; one ``extend`` takes a different number of tokens
    per row). The last hidden state of a row that fed its context gives its next-signal
    distribution (and, with no signal committed, its first token); the other rows' give their
    next token. A row that finishes hands its place to the next waiting question at once.
    """
    su = setup
    tok, guided = su.tokenizer, su.guided
    dev = _device(model)
    cache = RowCache(dev)
    backbone = backbone_of(model)
    lm_head = causal_lm_of(model).get_output_embeddings()
    waiting = deque(range(len(questions)))
    out: list[Generated | None] = [None] * len(questions)
    rows: list[_GuidedRow] = []
    # per row: its step being decoded; None: the row starts a step (feeds its context) next
    steps: list[_StepState | None] = []
    suppress = list(su.pruned_ids)
    eos = tok.eos_token_id
    signal_ids = set(su.signal_token_ids)
    window = StepBoundaryStop.window
    newlines: dict[int, int] = {}  # token id -> the newlines in its text
    retokenize = _Retokenizer(tok, su.signal_token_ids)
    anchors: list[tuple[int, list[int]] | None] = []  # per row: see _Retokenizer
    signal_index = torch.as_tensor(su.signal_token_ids, dtype=torch.long, device=dev)

    def admit() -> _GuidedRow | None:
        while waiting:
            i = waiting.popleft()
            prompt = render_prompt(questions[i], tok, system_prompt)
            r = _GuidedRow(index=i, prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"])
            if su.max_new_tokens > 0:
                return r
            out[i] = r.result()  # no budget: no step
        return None

    while True:
        while len(rows) < batch_size:
            r = admit()
            if r is None:
                break
            rows.append(r)
            steps.append(None)
            anchors.append(None)
            cache.add_rows(1)
        if not rows:
            break
        t0 = time.perf_counter()
        new: list[list[int]] = []
        starts: list[int] = []
        for b, r in enumerate(rows):
            st = steps[b]
            if st is not None:
                new.append([st.pending])
                continue
            starts.append(b)
            ids, anchors[b] = retokenize(r.completion, anchors[b])
            ctx = r.prompt_ids + ids
            # keep at least the last token out, to have its hidden state
            n = min(_common_prefix(cache.tokens[b], ctx), len(ctx) - 1)
            cache.truncate(b, n)
            new.append(ctx[n:])
        hidden = cache.extend(backbone, new)
        # every row's next-token logits, in one call (with a signal head, only where needed)
        logits = lm_head(hidden) if su.head is None else None
        # rows whose next token is chosen from their last hidden state
        choose = [b for b, st in enumerate(steps) if st is not None]
        if starts:
            if logits is None:
                sig_logits = signal_logits(model, hidden[starts], su.signal_token_ids, head=su.head)
            else:  # signal_logits without the head: the LM head's logits at the signal tokens
                sig_logits = logits[starts].index_select(-1, signal_index).float()
            probs = _probs_of_signal_logits(sig_logits, su.pruned_idx)
            if probs is not None:
                top, arg = probs.max(dim=-1)
                tops, args = top.tolist(), arg.tolist()
            for j, b in enumerate(starts):
                r = rows[b]
                st = _StepState(budget=0)
                if probs is not None:
                    st.confidence = tops[j]
                    if st.confidence >= guided.confidence_threshold:
                        k = args[j]
                        st.signal = su.signal_names[k]
                        r.completion += su.token_of[st.signal]
                        r.produced += 1
                        st.pending = su.signal_token_ids[k]
                st.budget = _step_budget(su, r)
                steps[b] = st
                if st.budget <= 0:
                    st.stop, st.pending = "budget", None
                elif st.pending is None:
                    choose.append(b)
        if choose:
            # (with the LM head's logits at hand, every row's argmax: no copy of the chosen rows)
            scores = (lm_head(hidden[choose]) if logits is None else logits).float()
            if suppress:
                scores[:, suppress] = float("-inf")
            best = scores.argmax(dim=-1).tolist()
            chosen = best if logits is None else [best[b] for b in choose]
            for b, t in zip(choose, chosen):
                st = steps[b]
                st.pending = None
                if t == eos:
                    st.stop = "eos"
                elif t in signal_ids:
                    if st.signal is None and not st.body:
                        # free decoding opened the step with a signal of the model's own choosing
                        r = rows[b]
                        st.signal = su.signal_of[t]
                        r.completion += su.token_of[st.signal]
                        r.produced += 1
                        st.budget = _step_budget(su, r)
                        if st.budget <= 0:
                            st.stop = "budget"
                        else:
                            st.pending = t
                    else:
                        st.stop = "signal"
                else:
                    st.body.append(t)
                    nl = newlines.get(t)
                    if nl is None:
                        nl = newlines[t] = tok.decode([t], skip_special_tokens=True).count("\n")
                    st.newlines.append(nl)
                    # StepBoundaryStop's check on the body's last `window` tokens. A step end holds
                    # two newlines and decoding never makes a newline that no token's own text
                    # holds, so the tail is decoded only when its tokens hold two.
                    if (
                        sum(st.newlines[-window:]) >= 2
                        and _STEP_END.search(tok.decode(st.body[-window:], skip_special_tokens=True))
                    ) or len(st.body) >= st.budget:
                        st.stop = (
                            "separator" if _STEP_END.search(tok.decode(st.body, skip_special_tokens=True)) else "length"
                        )
                    else:
                        st.pending = t
        for b, r in enumerate(rows):
            st = steps[b]
            if st.stop is None:
                continue
            _end_step(r, st, su)
            steps[b] = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        share = (time.perf_counter() - t0) / len(rows)
        keep: list[int] = []
        for b, r in enumerate(rows):
            r.latency_s += share
            if not r.done:
                keep.append(b)
                continue
            out[r.index] = r.result()
            nxt = admit()
            if nxt is not None:
                # the next question takes this row (the cache keeps what it shares with its
                # context, the system prompt)
                rows[b], steps[b], anchors[b] = nxt, None, None
                keep.append(b)
        if len(keep) < len(rows):
            cache.keep_rows(keep)
            rows = [rows[b] for b in keep]
            steps = [steps[b] for b in keep]
            anchors = [anchors[b] for b in keep]
        if cache.holes() * 4 > cache.rows * cache.width:
            cache.compact()
    return [g for g in out if g is not None]


class _Retokenizer:
    """The token ids of a growing completion, as ``tokenizer(completion)`` gives them, re-tokenizing
    only its text from its last signal token on.

    A signal token is a special token that takes no whitespace around it (no lstrip / rstrip /
    single_word, not normalized): a fast tokenizer splits the text at it before normalizing and
    pre-tokenizing the pieces, so the ids before it do not depend on the text after it, and the
    piece after it is tokenized alike whatever precedes it (that piece starts past the text's
    start either way, as the signal token is kept in the re-tokenized text). Each call returns the
    ids and an anchor for the next call on the same completion grown: (the offset of its last
    signal token, the ids before it). Other tokenizers re-tokenize the whole completion.
    """

    def __init__(self, tokenizer, signal_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.signal_ids = set(signal_token_ids)
        added = getattr(tokenizer, "added_tokens_decoder", {})

        def plain(i: int) -> bool:
            a = added.get(i)
            return a is not None and not any(
                getattr(a, f, True) for f in ("lstrip", "rstrip", "single_word", "normalized")
            )

        self.split = bool(getattr(tokenizer, "is_fast", False)) and all(plain(i) for i in self.signal_ids)

    def __call__(
        self, text: str, anchor: tuple[int, list[int]] | None
    ) -> tuple[list[int], tuple[int, list[int]] | None]:
        if not text:
            return [], None
        if not self.split:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], None
        start, head = anchor if anchor is not None else (0, [])
        enc = self.tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True)
        part = enc["input_ids"]
        if start and not (part and part[0] in self.signal_ids):  # not the anchor (cannot happen)
            return self(text, None)
        for j in range(len(part) - 1, -1, -1):
            if part[j] in self.signal_ids:
                anchor = (start + enc["offset_mapping"][j][0], head + part[:j])
                break
        return head + part, anchor


def _end_step(r: _GuidedRow, st: _StepState, su: _GuidedSetup) -> None:
    """Record the step ``st`` of ``r`` that has ended (:meth:`_GuidedRow.end_step`)."""
    r.end_step(
        step_text(su.tokenizer.decode(st.body, skip_special_tokens=True)),
        signal=st.signal,
        confidence=st.confidence,
        stop=st.stop,
        tokens=len(st.body) + (1 if st.stop == "eos" else 0),
        max_new_tokens=su.max_new_tokens,
        max_steps=su.guided.max_steps,
    )


# ---------------------------------------------------------------------------------------------
# calibration of the gate on validation data


def choose_threshold(confidences: Sequence[float], correct: Sequence[bool], precision: float) -> float:
    """The gate threshold that maximises ``#correct - precision * #committed`` over the given
    predictions when those with confidence at least the threshold are committed.

    Equivalently: commit a prediction where, among validation predictions at least as
    confident, the share of right ones is at least ``precision``. Returns the lowest confidence
    still committed; 1.0 when no committed set does better than committing nothing.
    """
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct differ in length")
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    best, best_threshold, total = 0.0, 1.0, 0.0
    for pos, i in enumerate(order):
        total += float(bool(correct[i])) - precision
        last_of_tie = pos + 1 == len(order) or confidences[order[pos + 1]] < confidences[i]
        if last_of_tie and total > best:
            best, best_threshold = total, float(confidences[i])
    return best_threshold


@dataclass
class GateCalibration:
    """The calibrated gate of one decoding variant: its threshold and what it does on the
    validation boundaries it was chosen on (``boundaries``: scored boundaries, those whose gold
    signal is pruned left out; ``committed``: those the threshold commits; accuracies of the
    argmax signal over all of them and over the committed ones)."""

    threshold: float
    precision: float
    boundaries: int
    committed: int
    accuracy: float | None
    committed_accuracy: float | None
    pruned_signals: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "precision": self.precision,
            "boundaries": self.boundaries,
            "committed": self.committed,
            "accuracy": self.accuracy,
            "committed_accuracy": self.committed_accuracy,
            "pruned_signals": list(self.pruned_signals),
        }


def calibrate_gate(
    student: Student,
    examples: Sequence[Any],
    *,
    prune_signals: Sequence[str] = (),
    precision: float = 0.5,
    benchmark: str | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
) -> GateCalibration | None:
    """Calibrate the confidence threshold on validation examples (teacher-forced).

    At every gold step boundary the student's next-signal distribution is computed exactly as
    the decoder computes it (the ``prune_signals`` masked out, renormalised); its top probability
    is the confidence and the prediction is right when its argmax is the gold signal. Boundaries
    whose gold signal is pruned are left out (the decoder never produces it). The threshold is
    :func:`choose_threshold` over these. Returns None when there is no boundary to calibrate on.
    """
    logits, gold = boundary_signal_logits(
        student, examples, benchmark=benchmark, max_length=max_length, batch_size=batch_size
    )
    pruned_idx = [k for k, n in enumerate(student.signal_names) if n in set(prune_signals)]
    keep = [i for i, g in enumerate(gold) if g not in set(pruned_idx)]
    if not keep or len(pruned_idx) == len(student.signal_names):
        return None
    logits = logits[keep].clone()
    gold_kept = torch.as_tensor([gold[i] for i in keep])
    if pruned_idx:
        logits[:, pruned_idx] = float("-inf")
    top, arg = torch.softmax(logits, dim=-1).max(dim=-1)
    right = (arg == gold_kept).tolist()
    conf = top.tolist()
    threshold = choose_threshold(conf, right, precision)
    committed = [r for c, r in zip(conf, right) if c >= threshold]
    return GateCalibration(
        threshold=threshold,
        precision=precision,
        boundaries=len(conf),
        committed=len(committed),
        accuracy=sum(right) / len(right),
        committed_accuracy=(sum(committed) / len(committed)) if committed else None,
        pruned_signals=[student.signal_names[k] for k in pruned_idx],
    )


def plan_guided_decoding(
    cfg: GuidedInferenceConfig,
    student: Student,
    validation: Sequence[Any],
    *,
    gate: bool = True,
    prune: bool = True,
) -> tuple[GuidedSettings, dict[str, Any]]:
    """How one guided-decoding variant runs, and where each setting came from.

    ``gate`` / ``prune`` False: the ablation without adaptive gating / without pruning. With the
    gate on and no ``cfg.confidence_threshold``, the threshold is calibrated on ``validation``
    (ExampleRecords; :func:`calibrate_gate`, under this variant's pruning) or, without any
    validation boundary, is ``cfg.calibration_precision``. Returns the settings and a JSON-able
    record: the settings, ``threshold_source`` (``config`` / ``calibrated`` / ``no validation
    data`` / ``no gate``), the calibration, ``prune_source`` and ``max_step_tokens_source``.
    """
    pruned = (cfg.prune_signals if cfg.prune_signals is not None else student.nonessential_signals) if prune else []
    calibration = None
    if not gate:
        threshold_source = "no gate"
    elif cfg.confidence_threshold is not None:
        threshold_source = "config"
    else:
        calibration = (
            calibrate_gate(
                student,
                validation,
                prune_signals=pruned,
                precision=cfg.calibration_precision,
                benchmark=student.prompt_benchmark,
                max_length=student.meta.get("max_length"),
            )
            if validation
            else None
        )
        threshold_source = "calibrated" if calibration is not None else "no validation data"
    settings = resolve_guided(
        cfg,
        student,
        threshold=calibration.threshold if calibration is not None else None,
        gate=gate,
        prune=prune,
    )
    if not prune:
        prune_source = "no pruning"
    elif cfg.prune_signals is not None:
        prune_source = "config"
    else:
        prune_source = "taxonomy (essential: false)"
    if cfg.max_step_tokens is not None:
        cap_source = "config"
    elif settings.max_step_tokens is not None:
        cap_source = "longest training step"
    else:
        cap_source = "none (not recorded with the student)"
    return settings, {
        "settings": settings.to_dict(),
        "threshold_source": threshold_source,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "prune_source": prune_source,
        "max_step_tokens_source": cap_source,
    }
