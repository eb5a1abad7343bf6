"""Statistics of labeled steps for the quality report: signal shares, keyword coverage, agreement of
the keyword pre-labels with the LLM's labels (Cohen's kappa), signal transitions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.records import LabeledStepRecord


def transition_matrix(sequences: Sequence[Sequence[str]], names: Sequence[str]) -> list[list[int]]:
    """``m[i][j]`` = number of times ``names[j]`` directly follows ``names[i]`` in a sequence."""
    pos = {n: i for i, n in enumerate(names)}
    m = [[0] * len(names) for _ in names]
    for seq in sequences:
        for a, b in zip(seq, seq[1:]):
            if a not in pos or b not in pos:
                raise ValueError(f"unknown signal {a if a not in pos else b!r} (names: {list(names)})")
            m[pos[a]][pos[b]] += 1
    return m


def cohens_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two labelings of the same items (1.0 when both use one same label throughout)."""
    if len(a) != len(b):
        raise ValueError(f"labelings differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("cohens_kappa of empty labelings")
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb.get(k, 0) for k in ca) / (n * n)
    if pe >= 1.0:
        return 1.0
    return (po - pe) / (1.0 - pe)


def label_quality_report(steps: Sequence[LabeledStepRecord], tax: Taxonomy) -> dict[str, Any]:
    """JSON-able quality summary of labeled steps (for ``quality.json`` and the stage artifact).

    ``keyword_coverage``: share of steps with a keyword pre-label (the paper reports ~74%);
    ``prelabel_agreement`` / ``prelabel_kappa``: agreement of the pre-label with the LLM label on
    LLM-labeled steps that had one (the paper reports ~87% agreement); ``transitions``: signal
    bigram counts over traces (rows: from, columns: to, in ``names`` order).
    """
    names = tax.names
    n = len(steps)
    by_trace: dict[str, list[LabeledStepRecord]] = {}
    for s in steps:
        by_trace.setdefault(s.trace_id, []).append(s)
    sequences = [[s.signal for s in sorted(v, key=lambda r: r.step_index)] for v in by_trace.values()]
    signal_counts = Counter(s.signal for s in steps)
    checked = [(s.prelabel, s.signal) for s in steps if s.source == "llm" and s.prelabel is not None]
    lengths: dict[str, list[int]] = {}
    for s in steps:
        lengths.setdefault(s.signal, []).append(len(s.text))
    return {
        "taxonomy_digest": tax.digest(),
        "names": names,
        "traces": len(by_trace),
        "steps": n,
        "steps_per_trace": (n / len(by_trace)) if by_trace else 0.0,
        "signal_counts": {k: signal_counts.get(k, 0) for k in names},
        "unknown_signals": sorted(k for k in signal_counts if k not in tax.by_name),
        "source_counts": dict(Counter(s.source for s in steps)),
        "keyword_coverage": (sum(s.prelabel is not None for s in steps) / n) if n else 0.0,
        "prelabel_checked": len(checked),
        "prelabel_agreement": (sum(a == b for a, b in checked) / len(checked)) if checked else None,
        "prelabel_kappa": cohens_kappa([a for a, _ in checked], [b for _, b in checked]) if checked else None,
        "mean_chars_per_signal": {k: (sum(v) / len(v)) for k, v in lengths.items() if k in tax.by_name},
        "first_signal_counts": dict(Counter(seq[0] for seq in sequences if seq)),
        "transitions": transition_matrix([[x for x in seq if x in tax.by_name] for seq in sequences], names),
    }
