"""Dataset assembly: labeled traces -> one example row per trace, splits and statistics."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from rscaffold.config import DatasetConfig
from rscaffold.records import ExampleRecord, LabeledStepRecord, Step, TraceRecord


def assemble_examples(
    traces: Sequence[TraceRecord],
    steps: Sequence[LabeledStepRecord],
    cfg: DatasetConfig,
) -> tuple[list[ExampleRecord], dict[str, int]]:
    """Join traces with their labeled steps, filter, and split by problem.

    The split is made per *problem* (not per trace) so that samples of one problem never sit on
    both sides. Returns the examples and the counts of dropped traces by reason.
    """
    by_trace: dict[str, list[LabeledStepRecord]] = defaultdict(list)
    for s in steps:
        by_trace[s.trace_id].append(s)

    dropped: Counter[str] = Counter()
    rows: list[tuple[TraceRecord, list[LabeledStepRecord]]] = []
    for t in traces:
        ts = sorted(by_trace.get(t.trace_id, []), key=lambda s: s.step_index)
        if t.status != "ok":
            dropped["failed"] += 1
        elif cfg.only_correct and not t.correct:
            dropped["incorrect"] += 1
        elif len(ts) < cfg.min_steps:
            dropped["too_few_steps"] += 1
        else:
            rows.append((t, ts))

    problem_ids = sorted({t.problem_id for t, _ in rows})
    rng = random.Random(cfg.seed)
    rng.shuffle(problem_ids)
    n_val = int(round(len(problem_ids) * cfg.validation_fraction))
    if cfg.validation_fraction > 0 and n_val == 0 and len(problem_ids) > 1:
        n_val = 1
    validation = set(problem_ids[:n_val])

    examples = [
        ExampleRecord(
            trace_id=t.trace_id,
            problem_id=t.problem_id,
            split="validation" if t.problem_id in validation else "train",
            question=t.question,
            gold_answer=t.gold_answer,
            teacher_answer=t.predicted_answer,
            correct=t.correct,
            steps=[Step(index=s.step_index, signal=s.signal, text=s.text, source=s.source) for s in ts],
            signals=[s.signal for s in ts],
            n_steps=len(ts),
            answer_text=t.text.strip() or None,
        )
        for t, ts in rows
    ]
    examples.sort(key=lambda e: (e.split, e.problem_id, e.trace_id))
    return examples, dict(dropped)


def dataset_stats(examples: Sequence[ExampleRecord], signal_names: Sequence[str]) -> dict[str, Any]:
    """Row counts per split, signal counts, mean steps, and label sources."""
    splits = Counter(e.split for e in examples)
    signals: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for e in examples:
        signals.update(e.signals)
        sources.update(s.source for s in e.steps)
    n = len(examples)
    return {
        "rows": n,
        "splits": dict(sorted(splits.items())),
        "problems": len({e.problem_id for e in examples}),
        "mean_steps": round(sum(e.n_steps for e in examples) / n, 3) if n else 0.0,
        "signal_counts": {name: signals.get(name, 0) for name in signal_names},
        "label_sources": dict(sorted(sources.items())),
        "teacher_accuracy": round(sum(1 for e in examples if e.correct) / n, 4) if n else 0.0,
    }
