"""Scoring of model outputs: answer checking, accuracy with bootstrap intervals, report tables."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from rscaffold.benchmarks.answers import extract_answer, is_correct
from rscaffold.records import MetricRecord, PredictionRecord, ProblemRecord

MODEL_ORDER = ("base", "cot_sft", "scaffolded")


def score_output(
    model: str,
    benchmark: str,
    problem: ProblemRecord,
    output: str,
    answer_type: str,
    output_tokens: int,
    signals: Sequence[str],
    latency_s: float,
) -> PredictionRecord:
    """Extract the answer from one output and check it against the gold answer."""
    predicted = extract_answer(output, answer_type)
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
    )


def bootstrap_ci(correct: Sequence[bool], samples: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
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


def compute_metrics(predictions: Sequence[PredictionRecord], bootstrap_samples: int = 1000, seed: int = 0) -> list[MetricRecord]:
    groups: dict[tuple[str, str], list[PredictionRecord]] = defaultdict(list)
    for p in predictions:
        groups[(p.model, p.benchmark)].append(p)
    out = []
    for (model, bench), preds in groups.items():
        correct = [p.correct for p in preds]
        lo, hi = bootstrap_ci(correct, bootstrap_samples, seed)
        n = len(preds)
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
            )
        )
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    out.sort(key=lambda m: (m.benchmark, order.get(m.model, 99), m.model))
    return out


def signal_distribution(predictions: Sequence[PredictionRecord]) -> dict[str, dict[str, int]]:
    """Counts of generated signals per model (scaffolded outputs only carry signals)."""
    dist: dict[str, Counter[str]] = defaultdict(Counter)
    for p in predictions:
        dist[p.model].update(p.signals)
    return {m: dict(c.most_common()) for m, c in dist.items() if c}


def metrics_table(metrics: Sequence[MetricRecord]) -> list[dict[str, object]]:
    """Rows for a human table (percentages rounded)."""
    return [
        {
            "model": m.model,
            "benchmark": m.benchmark,
            "n": m.n,
            "accuracy_%": round(100 * m.accuracy, 1),
            "95%_CI": f"[{100 * m.ci_low:.1f}, {100 * m.ci_high:.1f}]",
            "mean_output_tokens": round(m.mean_output_tokens, 1),
            "unparseable_%": round(100 * m.unparseable_rate, 1),
        }
        for m in metrics
    ]


def render_markdown_report(metrics: Sequence[MetricRecord], signals: dict[str, dict[str, int]] | None = None) -> str:
    rows = metrics_table(metrics)
    lines = ["# rscaffold evaluation", ""]
    if rows:
        headers = list(rows[0])
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "---|" * len(headers))
        for r in rows:
            lines.append("| " + " | ".join(str(r[h]) for h in headers) + " |")
    if signals:
        lines += ["", "## Generated signals", ""]
        for model, counts in signals.items():
            lines.append(f"- **{model}**: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    return "\n".join(lines) + "\n"
