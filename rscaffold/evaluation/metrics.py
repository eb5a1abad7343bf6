"""Scoring of model outputs and their aggregation per model and benchmark.

What one prediction gets (:func:`score_output`): the extracted final answer and whether it is
correct (multiple choice: the options are read back from the question, so an answer given as an
option's text counts too), and a consistency flag (:mod:`rscaffold.evaluation.consistency`).

Per model and benchmark (:func:`compute_metrics`): accuracy with a percentile bootstrap interval,
mean output tokens and steps, the unparseable share, the consistency rate over checked rows, and
for models that generate signals their agreement with the teacher's labeled traces
(:func:`rscaffold.evaluation.signals.transition_agreement`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from rscaffold.evalsets.answers import choice_options, extract_answer, is_correct
from rscaffold.evaluation.consistency import check_consistency
from rscaffold.evaluation.signals import signal_agreement
from rscaffold.records import MetricRecord, PredictionRecord, ProblemRecord
from rscaffold.segment import split_at_step_boundaries
from rscaffold.vocabulary import ALL_EVAL_MODELS


def score_output(
    model: str,
    benchmark: str,
    problem: ProblemRecord,
    *,
    output: str,
    answer_type: str,
    output_tokens: int,
    signals: Sequence[str],
    latency_s: float,
    options: Sequence[str] | None = None,
    decoding: str | None = None,
    n_steps: int | None = None,
    numeric: bool = False,
    signal_sources: Sequence[str] | None = None,
) -> PredictionRecord:
    """Extract the answer from one output, check it against the gold answer and for consistency.

    Multiple choice: ``options`` default to the ``"A. ..."`` lines of the question. ``numeric``:
    the benchmark's answers are numbers (see :func:`rscaffold.evalsets.answers.extract_answer`).
    ``signal_sources``: per step of the output, where its signal came from (``gate``, ``free``,
    ``none``).
    """
    if options is None and answer_type == "choice":
        options = choice_options(problem.question) or None
    predicted = extract_answer(output, answer_type, options=options, numeric=numeric)
    cons = check_consistency(output, predicted, answer_type)
    return PredictionRecord(
        model=model,
        benchmark=benchmark,
        problem_id=problem.problem_id,
        question=problem.question,
        gold_answer=problem.gold_answer,
        output=output,
        predicted_answer=predicted,
        correct=bool(predicted is not None and is_correct(predicted, problem.gold_answer, answer_type)),
        parsed=predicted is not None,
        output_tokens=output_tokens,
        signals=list(signals),
        latency_s=latency_s,
        decoding=decoding,
        n_steps=n_steps if n_steps is not None else len(split_at_step_boundaries(output)),
        consistent=cons.consistent,
        consistency_check=cons.check,
        consistency_evidence=cons.evidence,
        signal_sources=None if signal_sources is None else list(signal_sources),
    )


def bootstrap_ci(
    correct: Sequence[bool], samples: int = 1000, seed: int = 0, *, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct``."""
    n = len(correct)
    if n == 0:
        return 0.0, 0.0
    if samples == 0:
        acc = sum(correct) / n
        return acc, acc
    rng = random.Random(seed)
    values = [int(c) for c in correct]
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    lo = means[int((alpha / 2) * (samples - 1))]
    hi = means[int((1 - alpha / 2) * (samples - 1))]
    return lo, hi


def compute_metrics(
    predictions: Sequence[PredictionRecord],
    bootstrap_samples: int = 1000,
    seed: int = 0,
    *,
    teacher: Mapping[str, Any] | None = None,
) -> list[MetricRecord]:
    """One :class:`MetricRecord` per (model, benchmark); ``teacher``: see :func:`signal_agreement`."""
    groups: dict[tuple[str, str], list[PredictionRecord]] = defaultdict(list)
    for p in predictions:
        groups[(p.model, p.benchmark)].append(p)
    agreement = signal_agreement(predictions, teacher)
    out = []
    for (model, bench), preds in groups.items():
        correct = [p.correct for p in preds]
        lo, hi = bootstrap_ci(correct, bootstrap_samples, seed)
        n = len(preds)
        checked = [p.consistent for p in preds if p.consistent is not None]
        steps = [p.n_steps for p in preds if p.n_steps is not None]
        n_signals = sum(len(p.signals) for p in preds)
        agree = agreement.get(f"{model}/{bench}", {})
        out.append(
            MetricRecord(
                model=model,
                benchmark=bench,
                n=n,
                accuracy=sum(correct) / n,
                ci_low=lo,
                ci_high=hi,
                mean_output_tokens=sum(p.output_tokens for p in preds) / n,
                unparseable_rate=sum(1 for p in preds if not p.parsed) / n,
                consistency_checked=len(checked),
                consistency_rate=(sum(checked) / len(checked)) if checked else None,
                mean_steps=(sum(steps) / len(steps)) if steps else None,
                generated_signals=n_signals,
                signal_tv=agree.get("signal_tv"),
                transition_tv=agree.get("transition_tv"),
                transition_kl=agree.get("transition_kl"),
                transition_coverage=agree.get("transition_coverage"),
            )
        )
    out.sort(key=lambda m: (m.benchmark, _model_rank(m.model), m.model))
    return out


def _model_rank(model: str) -> int:
    return ALL_EVAL_MODELS.index(model) if model in ALL_EVAL_MODELS else len(ALL_EVAL_MODELS)


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 1)


def metrics_table(metrics: Sequence[MetricRecord]) -> list[dict[str, object]]:
    """Rows for a human table (percentages rounded), one per model and benchmark."""
    return [
        {
            "model": m.model,
            "benchmark": m.benchmark,
            "n": m.n,
            "accuracy_%": round(100 * m.accuracy, 1),
            "95%_CI": f"[{100 * m.ci_low:.1f}, {100 * m.ci_high:.1f}]",
            "mean_output_tokens": round(m.mean_output_tokens, 1),
            "unparseable_%": round(100 * m.unparseable_rate, 1),
            "consistent_%": _pct(m.consistency_rate),
            "transition_tv": None if m.transition_tv is None else round(m.transition_tv, 3),
        }
        for m in metrics
    ]
