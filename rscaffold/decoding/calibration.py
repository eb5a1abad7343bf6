"""Calibration of the gate on validation data, and how each guided-decoding variant runs
(:func:`plan_guided_decoding`: its settings and where each came from)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rscaffold.config import GuidedInferenceConfig
from rscaffold.decoding.policy import GuidedSettings, pruned_signals, resolve_guided
from rscaffold.decoding.reference import signal_distribution
from rscaffold.student import Student, boundary_signal_logits


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
    benchmark: str | Mapping[str, str] | None = None,
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
    gold_kept = torch.as_tensor([gold[i] for i in keep])
    # the decoder's distribution (pruned signals 0, the others renormalised)
    top, arg = signal_distribution(logits[keep].clone(), pruned_idx).max(dim=-1)
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
    fallback_guard: bool = True,
) -> tuple[GuidedSettings, dict[str, Any]]:
    """How one guided-decoding variant runs, and where each setting came from.

    ``gate`` / ``prune`` / ``fallback_guard`` False: the ablation without adaptive gating / without
    pruning / with free decoding that may emit a signal after an uncommitted gate. With the
    gate on and no ``cfg.confidence_threshold``, the threshold is calibrated on ``validation``
    (ExampleRecords; :func:`calibrate_gate`, under this variant's pruning) or, without any
    validation boundary, is ``cfg.calibration_precision``. Returns the settings and a JSON-able
    record: the settings, ``threshold_source`` (``config`` / ``calibrated`` / ``no validation
    data`` / ``no gate``), the calibration, ``prune_source``, ``max_step_tokens_source`` and
    ``fallback_source``.
    """
    pruned = pruned_signals(cfg, student, prune=prune)
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
        fallback_guard=fallback_guard,
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
    if not fallback_guard:
        fallback_source = "ablation (free decoding may emit a signal)"
    elif cfg.fallback_may_emit_signal:
        fallback_source = "config (free decoding may emit a signal)"
    else:
        fallback_source = "signal tokens suppressed in free decoding"
    return settings, {
        "settings": settings.to_dict(),
        "threshold_source": threshold_source,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "prune_source": prune_source,
        "max_step_tokens_source": cap_source,
        "fallback_source": fallback_source,
    }
