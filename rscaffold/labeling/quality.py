"""Statistics of labeled steps for the quality report: signal shares, keyword coverage, agreement of
the keyword pre-labels with the LLM's labels (Cohen's kappa), signal transitions, and the
quality gate that flags degenerate labeling (:func:`quality_gate`).

A weak labeler can answer in perfectly valid form (constrained decoding guarantees that) and still
label nothing: a 135M model collapses to the taxonomy's order (step 1 the first signal, step 2
the second, ...) while the fallback rate says 0%. Two symptoms are measured on the LLM's labels:

* ``prelabel_kappa``: Cohen's kappa of the LLM labels against the keyword pre-labels on the steps
  that have one (the paper reports ~87% agreement; a labeler that ignores the text is near 0);
* labels that follow the step index: ``taxonomy_order_share``, the share of labels that are the
  taxonomy's signal at the step's position (step 1 the first signal, step 2 the second, ...; by
  chance about one in seven), and ``index_lambda``, Goodman-Kruskal's lambda of the label given
  the step index, i.e. how much knowing a step's position reduces the error of guessing its label
  beyond always guessing the most common label (1: each position has one label). Only positions
  with at least :data:`MIN_STEPS_PER_POSITION` LLM-labeled steps count for lambda.

None is judged on fewer than :data:`MIN_STEPS_FOR_VERDICT` steps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rscaffold.config import LabelingConfig
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.records import LabeledStepRecord

MIN_STEPS_FOR_VERDICT = 20
"""Fewer LLM-labeled steps (with a pre-label, for kappa) than this: no verdict."""
MIN_STEPS_PER_POSITION = 5
"""A step index enters the lambda only with at least this many LLM-labeled steps."""


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


def index_lambda(steps: Sequence[LabeledStepRecord]) -> tuple[float | None, int]:
    """Goodman-Kruskal lambda of the label given the step index over ``steps`` (positions with
    at least :data:`MIN_STEPS_PER_POSITION` steps), and the number of steps it was computed on.
    None when no position qualifies or every step has the same label."""
    by_pos: dict[int, Counter[str]] = {}
    for s in steps:
        by_pos.setdefault(s.step_index, Counter())[s.signal] += 1
    counts = [c for c in by_pos.values() if sum(c.values()) >= MIN_STEPS_PER_POSITION]
    n = sum(sum(c.values()) for c in counts)
    if not n:
        return None, 0
    overall: Counter[str] = Counter()
    for c in counts:
        overall.update(c)
    best_overall = max(overall.values())
    if best_overall == n:
        return None, n
    best_by_pos = sum(max(c.values()) for c in counts)
    return (best_by_pos - best_overall) / (n - best_overall), n


def taxonomy_order_share(steps: Sequence[LabeledStepRecord], names: Sequence[str]) -> float | None:
    """Share of ``steps`` whose label is the taxonomy's signal at their position
    (``names[step_index % K]``): near 1 when a labeler answers in the taxonomy's order."""
    if not steps:
        return None
    return sum(s.signal == names[s.step_index % len(names)] for s in steps) / len(steps)


LENGTH_BINS = (1, 10, 20, 40, 80, 160, 320)
"""Lower bounds of the trace-length bins (steps) of :func:`fallback_by_length`; the last is open."""


def fallback_by_length(by_trace: dict[str, list[LabeledStepRecord]]) -> list[dict[str, Any]]:
    """Per bin of trace length (:data:`LENGTH_BINS`, in steps): traces, the share of them with a
    fallback label (the LLM failed on a window of theirs), the share of their steps with one, and
    their mean number of label requests (windows). Empty bins are left out."""
    rows = []
    for j, lo in enumerate(LENGTH_BINS):
        hi = LENGTH_BINS[j + 1] if j + 1 < len(LENGTH_BINS) else None
        group = [v for v in by_trace.values() if len(v) >= lo and (hi is None or len(v) < hi)]
        if not group:
            continue
        steps = sum(len(v) for v in group)
        rows.append(
            {
                "steps": f"{lo}-{hi - 1}" if hi is not None else f"{lo}+",
                "traces": len(group),
                "fallback_traces": sum(any(s.source == "fallback" for s in v) for v in group),
                "fallback_trace_rate": sum(any(s.source == "fallback" for s in v) for v in group) / len(group),
                "fallback_step_rate": sum(s.source == "fallback" for v in group for s in v) / steps,
                "mean_windows": sum(v[0].windows for v in group) / len(group),
            }
        )
    return rows


def label_quality_report(steps: Sequence[LabeledStepRecord], tax: Taxonomy) -> dict[str, Any]:
    """JSON-able quality summary of labeled steps (for ``quality.json`` and the stage artifact).

    ``keyword_coverage``: share of steps with a keyword pre-label (the paper reports ~74%);
    ``prelabel_agreement`` / ``prelabel_kappa``: agreement of the pre-label with the LLM label on
    LLM-labeled steps that had one (the paper reports ~87% agreement); ``index_lambda`` /
    ``taxonomy_order_share``: how much the LLM labels follow the step index (see the module
    docstring); ``transitions``: signal bigram counts over traces (rows: from, columns: to, in
    ``names`` order); ``fallback_by_length``: the fallback rate by trace length
    (:func:`fallback_by_length`); ``windows_per_trace``: how many traces took how many label
    requests (a trace longer than one request holds is labeled in windows of steps).
    """
    names = tax.names
    n = len(steps)
    by_trace: dict[str, list[LabeledStepRecord]] = {}
    for s in steps:
        by_trace.setdefault(s.trace_id, []).append(s)
    sequences = [[s.signal for s in sorted(v, key=lambda r: r.step_index)] for v in by_trace.values()]
    signal_counts = Counter(s.signal for s in steps)
    checked = [(s.prelabel, s.signal) for s in steps if s.source == "llm" and s.prelabel is not None]
    llm_steps = [s for s in steps if s.source == "llm"]
    lam, lam_n = index_lambda(llm_steps)
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
        "llm_steps": len(llm_steps),
        "index_lambda": lam,
        "index_lambda_steps": lam_n,
        "taxonomy_order_share": taxonomy_order_share(llm_steps, names),
        "mean_chars_per_signal": {k: (sum(v) / len(v)) for k, v in lengths.items() if k in tax.by_name},
        "first_signal_counts": dict(Counter(seq[0] for seq in sequences if seq)),
        "fallback_by_length": fallback_by_length(by_trace),
        "windows_per_trace": dict(sorted(Counter(v[0].windows for v in by_trace.values()).items())),
        "transitions": transition_matrix([[x for x in seq if x in tax.by_name] for seq in sequences], names),
    }


def quality_gate(report: dict[str, Any], cfg: LabelingConfig) -> dict[str, Any]:
    """The verdict on a quality report (see the module docstring), as a JSON-able dict.

    ``degenerate``: a symptom passed its reporting threshold (``cfg.degenerate_kappa``,
    ``cfg.degenerate_order_share``, ``cfg.degenerate_index_lambda``); ``reasons``: one sentence
    per symptom; ``failed``: the sentences for the thresholds that fail the stage
    (``cfg.min_kappa``, ``cfg.max_order_share``, ``cfg.max_index_lambda``), empty when those are
    unset or met. Too little data gives no
    verdict on a symptom (``judged`` says which were judged).
    """
    reasons: list[str] = []
    failed: list[str] = []
    judged: list[str] = []
    kappa, checked = report.get("prelabel_kappa"), int(report.get("prelabel_checked") or 0)
    if kappa is not None and checked >= MIN_STEPS_FOR_VERDICT:
        judged.append("kappa")
        text = f"Cohen's kappa of the LLM labels against the keyword pre-labels is {kappa:.2f} on {checked} steps"
        if kappa < cfg.degenerate_kappa:
            reasons.append(f"{text} (below {cfg.degenerate_kappa}): the labels barely follow the steps' text")
        if cfg.min_kappa is not None and kappa < cfg.min_kappa:
            failed.append(f"{text}, below labeling.min_kappa={cfg.min_kappa}")
    order, n_llm = report.get("taxonomy_order_share"), int(report.get("llm_steps") or 0)
    if order is not None and n_llm >= MIN_STEPS_FOR_VERDICT:
        judged.append("taxonomy_order_share")
        text = f"{order:.0%} of the {n_llm} LLM labels are the taxonomy's signal at the step's position"
        if order >= cfg.degenerate_order_share:
            reasons.append(
                f"{text} (at least {cfg.degenerate_order_share:.0%}; by chance about {1 / len(report['names']):.0%}): "
                "the labels follow the taxonomy's order, not the steps"
            )
        if cfg.max_order_share is not None and order > cfg.max_order_share:
            failed.append(f"{text}, above labeling.max_order_share={cfg.max_order_share}")
    lam, lam_n = report.get("index_lambda"), int(report.get("index_lambda_steps") or 0)
    if lam is not None and lam_n >= MIN_STEPS_FOR_VERDICT:
        judged.append("index_lambda")
        text = f"the step index predicts the LLM labels with lambda {lam:.2f} on {lam_n} steps"
        if lam >= cfg.degenerate_index_lambda:
            reasons.append(f"{text} (at least {cfg.degenerate_index_lambda}): the labels follow the step index")
        if cfg.max_index_lambda is not None and lam > cfg.max_index_lambda:
            failed.append(f"{text}, above labeling.max_index_lambda={cfg.max_index_lambda}")
    return {"degenerate": bool(reasons), "reasons": reasons, "failed": failed, "judged": judged}
