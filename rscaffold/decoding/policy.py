"""The rule of signal-guided decoding, in one place: every guided executor (the reference decoder
:mod:`~rscaffold.decoding.reference`, the KV-cached one :mod:`~rscaffold.decoding.cached` and the
served one :mod:`~rscaffold.decoding.served`) asks :class:`GuidedPolicy` what to do and keeps its
questions' state in :class:`GuidedRow`; they differ only in how they compute a distribution or a
token.

For each step of an answer:

1. the next-signal distribution (over the K signals) is computed at the end of the context;
2. *pruning*: the pruned signals (default: the taxonomy's non-essential ones, kept with the
   student) get probability 0 (the distribution is renormalised over the others) and their tokens
   are suppressed while the step is decoded, so a pruned kind of step is never started;
3. *adaptive gating*: when the top probability is at least the confidence threshold, that signal
   is committed (its token opens the step, ``source`` ``gate``); otherwise the step is decoded
   freely. Free decoding never emits a signal token by default: every signal token is suppressed
   while the step is decoded, so the step is text under no signal (``source`` ``none``) and ends at
   a step boundary, eos or its cap. With ``fallback_may_emit_signal`` (the
   ``scaffolded-freefallback`` ablation) free decoding draws from the whole vocabulary: a signal
   token as the step's first token opens the step (``source`` ``free``), a later one ends it;
4. the step ends where training taught it to end: the next signal token, eos, or a step boundary
   (:data:`STEP_END`: text, then a blank line; a step is never empty), or at the per-step cap
   (default: the longest step of the student's training data) or the total token budget.

**Budget.** Guided decoding has the same total token budget as plain decoding (committed signal
tokens count); an answer ends at eos, when the budget is used up, or after ``max_steps`` steps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rscaffold.config import GuidedInferenceConfig
from rscaffold.decoding.output import Generated
from rscaffold.vocabulary import STEP_BOUNDARY, STEP_SEPARATOR

SignalSource = str
"""Where a step's signal came from: ``gate`` (committed by the gate), ``free`` (emitted by free
decoding), ``none`` (the step has no signal)."""

# The end of a step: text, then a step boundary. Whitespace before a step's first text is not an
# end (no training step is empty), so a step cannot be closed before it has begun.
STEP_END = re.compile(r"\S[^\S\n]*" + STEP_BOUNDARY.pattern)


def step_text(decoded: str) -> str:
    """The text of a generated step body: leading whitespace dropped, cut at its end (text, then a
    step boundary), stripped."""
    return STEP_BOUNDARY.split(decoded.lstrip(), maxsplit=1)[0].strip()


@dataclass(frozen=True)
class GuidedSettings:
    """Signal-guided decoding as it runs, every switch resolved (see :func:`resolve_guided`).

    ``confidence_threshold``: the gate commits a signal whose probability is at least this (0:
    always, i.e. no gating). ``prune_signals``: never committed, their tokens suppressed.
    ``max_step_tokens``: the per-step safety cap (None: none; the budget still bounds a step).
    ``max_steps``: an optional bound on the number of steps (None: the token budget bounds it).
    ``fallback_may_emit_signal``: free decoding after an uncommitted gate draws from the whole
    vocabulary, signal tokens included (False: signal tokens are suppressed there).
    """

    confidence_threshold: float = 0.0
    prune_signals: tuple[str, ...] = ()
    max_step_tokens: int | None = None
    max_steps: int | None = None
    fallback_may_emit_signal: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence_threshold": self.confidence_threshold,
            "prune_signals": list(self.prune_signals),
            "max_step_tokens": self.max_step_tokens,
            "max_steps": self.max_steps,
            "fallback_may_emit_signal": self.fallback_may_emit_signal,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidedSettings:
        return cls(
            confidence_threshold=float(d["confidence_threshold"]),
            prune_signals=tuple(d.get("prune_signals") or ()),
            max_step_tokens=d.get("max_step_tokens"),
            max_steps=d.get("max_steps"),
            fallback_may_emit_signal=bool(d.get("fallback_may_emit_signal", False)),
        )


def resolve_guided(
    cfg: GuidedInferenceConfig | None,
    student: Any,
    *,
    threshold: float | None = None,
    gate: bool = True,
    prune: bool = True,
    fallback_guard: bool = True,
) -> GuidedSettings:
    """The settings guided decoding of ``student`` runs with, from the config and the student.

    * threshold: ``cfg.confidence_threshold`` when set; else ``threshold`` (a calibrated value,
      :func:`~rscaffold.decoding.calibration.calibrate_gate`); else ``cfg.calibration_precision``
      (no validation data: the student's probabilities taken at face value). ``gate=False``: 0
      (every signal committed).
    * pruned signals: ``cfg.prune_signals`` when set; else the student's non-essential signals
      (the taxonomy's ``essential: false``, saved with the student). ``prune=False``: none.
    * per-step cap: ``cfg.max_step_tokens`` when set; else the longest step of the student's
      training data (saved with the student; None for a student saved without it).
    * free decoding may emit a signal: ``cfg.fallback_may_emit_signal``, or ``fallback_guard=False``.
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
    cap = cfg.max_step_tokens if cfg.max_step_tokens is not None else student.longest_step_tokens
    return GuidedSettings(
        confidence_threshold=thr,
        prune_signals=tuple(pruned_signals(cfg, student, prune=prune)),
        max_step_tokens=cap,
        max_steps=cfg.max_steps,
        fallback_may_emit_signal=cfg.fallback_may_emit_signal or not fallback_guard,
    )


def pruned_signals(cfg: GuidedInferenceConfig, student: Any, *, prune: bool = True) -> list[str]:
    """The signals a variant prunes: ``cfg.prune_signals`` when set, else the student's
    non-essential ones; none without pruning."""
    if not prune:
        return []
    return list(cfg.prune_signals if cfg.prune_signals is not None else student.nonessential_signals)


@dataclass
class Step:
    """A step as the rule opened it: its signal, where that came from, the gate's top probability
    (None: every signal pruned) and the body tokens it may take."""

    signal: str | None = None
    source: SignalSource = "none"
    confidence: float | None = None
    budget: int = 0


@dataclass
class GuidedRow:
    """The decoding state of one question in guided mode (every executor keeps its rows in these)."""

    index: int
    prompt_ids: list[int]
    completion: str = ""  # the running completion in the training format (signal tokens inline)
    steps: list[str] = field(default_factory=list)
    step_signals: list[str | None] = field(default_factory=list)
    signal_sources: list[SignalSource] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)
    produced: int = 0  # tokens generated so far (committed signals, step bodies, eos)
    rounds: int = 0
    done: bool = False
    latency_s: float = 0.0

    def result(self) -> Generated:
        keep = [
            (t, s, src, c)
            for t, s, src, c in zip(self.steps, self.step_signals, self.signal_sources, self.confidences)
            if t or s
        ]
        return Generated(
            text=STEP_SEPARATOR.join(t for t, _, _, _ in keep if t),
            signals=[s for _, s, _, _ in keep if s is not None],
            output_tokens=self.produced,
            latency_s=self.latency_s,
            steps=[t for t, _, _, _ in keep],
            step_signals=[s for _, s, _, _ in keep],
            confidences=[c for _, _, _, c in keep],
            signal_sources=[src for _, _, src, _ in keep],
        )


class GuidedPolicy:
    """The guided-decoding rule for one student and one setting (see the module doc).

    ``signal_names`` / ``signal_token_ids`` / ``signal_tokens``: the student's K signals, their
    token ids and token strings (as they appear in the completion text).
    """

    def __init__(
        self,
        settings: GuidedSettings,
        *,
        signal_names: Sequence[str],
        signal_token_ids: Sequence[int],
        signal_tokens: Sequence[str],
        max_new_tokens: int,
    ):
        self.settings, self.max_new_tokens = settings, max_new_tokens
        self.names, self.ids = list(signal_names), list(signal_token_ids)
        if len(self.names) != len(self.ids) or len(self.names) != len(signal_tokens):
            raise ValueError("signal names, token ids and tokens must have the same length")
        unknown = sorted(set(settings.prune_signals) - set(self.names))
        if unknown:
            raise ValueError(f"prune_signals {unknown} are not signals of this student ({self.names})")
        pruned = set(settings.prune_signals)
        self.pruned_idx = [k for k, n in enumerate(self.names) if n in pruned]
        self.allowed_idx = [k for k, n in enumerate(self.names) if n not in pruned]
        self.pruned_ids = [self.ids[k] for k in self.pruned_idx]
        self.token_of = dict(zip(self.names, signal_tokens))
        self.id_of = dict(zip(self.names, self.ids))
        self.signal_of = dict(zip(self.ids, self.names))
        # what a step body must not produce: pruned signals always; every signal in a free step
        # unless free decoding may emit one
        self._free_suppressed = (
            list(self.pruned_ids)
            if settings.fallback_may_emit_signal
            else self.pruned_ids + [self.ids[k] for k in self.allowed_idx]
        )

    # -- the answer ---------------------------------------------------------------------------
    def finished(self, row: GuidedRow) -> bool:
        """No token left for another step."""
        return self.max_new_tokens - row.produced <= 0

    def step_budget(self, row: GuidedRow) -> int:
        """Tokens the next step body of ``row`` may take: what is left of the total budget, and at
        most the per-step safety cap."""
        left = self.max_new_tokens - row.produced
        cap = self.settings.max_step_tokens
        return left if cap is None else min(cap, left)

    # -- a step's start -----------------------------------------------------------------------
    def open_step(self, row: GuidedRow, probs: Sequence[float] | None, step: Step | None = None) -> Step:
        """The gate: ``probs`` is the next-signal distribution (K probabilities, the pruned ones 0;
        None when every signal is pruned). The top signal (the first on ties) is committed when its
        probability is at least the threshold: its token joins the row's completion and counts as
        an output token. Returns ``step`` (a new :class:`Step` when None: an executor may pass its
        own subclass) opened, with its body budget."""
        step = Step() if step is None else step
        if probs is not None:
            k = max(range(len(probs)), key=lambda j: (probs[j], -j))
            step.confidence = float(probs[k])
            if step.confidence >= self.settings.confidence_threshold:
                self._take(row, step, self.names[k], source="gate")
        step.budget = self.step_budget(row)
        return step

    def suppressed(self, step: Step) -> list[int]:
        """The token ids the body of ``step`` must not produce."""
        return self.pruned_ids if step.signal is not None else self._free_suppressed

    def free_signal_opens(self, step: Step, body_tokens: int) -> bool:
        """Whether a signal token that free decoding emits as the step's first token opens the step
        (then :meth:`take_free_signal`); otherwise a signal token ends the step."""
        return self.settings.fallback_may_emit_signal and step.signal is None and body_tokens == 0

    def take_free_signal(self, row: GuidedRow, step: Step, signal: str) -> None:
        """Free decoding opened ``step`` with ``signal``: it joins the completion, counts as an
        output token, and the body's budget is what is left."""
        self._take(row, step, signal, source="free")
        step.budget = self.step_budget(row)

    def _take(self, row: GuidedRow, step: Step, signal: str, *, source: SignalSource) -> None:
        step.signal, step.source = signal, source
        row.completion += self.token_of[signal]
        row.produced += 1

    # -- a step's end -------------------------------------------------------------------------
    def end_step(self, row: GuidedRow, step: Step, text: str, *, stop: str, tokens: int) -> None:
        """Record a step that has ended: its text, its signal and where that came from, the gate's
        top probability, why it stopped (``eos``, ``signal``, ``separator``, ``length``,
        ``budget``) and the output tokens its body used; the row is done at eos, when the budget
        is used up, or after ``max_steps`` steps."""
        row.produced += tokens
        row.steps.append(text)
        row.step_signals.append(step.signal)
        row.signal_sources.append(step.source)
        row.confidences.append(step.confidence)
        row.rounds += 1
        if stop == "eos":
            row.done = True
            return
        if stop == "signal" and not text and step.signal is None and not tokens:
            # free decoding stopped at a signal token before anything else, though it may not emit
            # one (a server's logit bias of -100 can be outweighed): the answer cannot go on
            row.done = True
            return
        if text or step.signal is not None:
            row.completion += text + STEP_SEPARATOR
        max_steps = self.settings.max_steps
        if stop == "budget" or (max_steps is not None and row.rounds >= max_steps):
            row.done = True
        elif self.finished(row):
            row.done = True  # no token left for another step


def signal_policy(settings: GuidedSettings, student: Any, *, max_new_tokens: int) -> GuidedPolicy:
    """The :class:`GuidedPolicy` of ``student`` (its signals and their tokens, as its tokenizer
    writes them) under ``settings``."""
    ids = list(student.signal_token_ids)
    return GuidedPolicy(
        settings,
        signal_names=student.signal_names,
        signal_token_ids=ids,
        signal_tokens=list(student.tokenizer.convert_ids_to_tokens(ids)),
        max_new_tokens=max_new_tokens,
    )
