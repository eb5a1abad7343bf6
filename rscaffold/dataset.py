"""Dataset assembly: labeled traces -> one example row per trace, splits and statistics.

The assembly is columnar (polars): a lazy scan of the teacher's traces and of the labeled steps,
the steps grouped by trace (ordered by step index) and joined to their trace, the filters, then a
split by problem. At 100k traces x 30 steps (millions of step rows) no Python object is made per
row; ``benchmarks/dataset_assembly.py`` measures it against the earlier row-by-row assembly.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from rscaffold.config import DatasetConfig
from rscaffold.records import TraceRecord

log = logging.getLogger(__name__)

KEEP_CHOICES = ("finished", "correct", "all")
# The ExampleRecord columns, in order (rscaffold.records), as the assembly produces them.
_EXAMPLE_COLUMNS = (
    "trace_id",
    "problem_id",
    "split",
    "question",
    "gold_answer",
    "teacher_answer",
    "correct",
    "steps",
    "signals",
    "n_steps",
    "answer_text",
    "source_id",
    "source",
)


def validation_problems(problem_ids: Iterable[str], fraction: float, seed: int = 0) -> set[str]:
    """The problems held out for validation: the ``round(fraction * n)`` problems (at least one
    when ``fraction > 0`` and there are two or more) with the smallest seeded sha256 of their id.

    Deterministic (independent of row order, process and platform) and by problem, so the samples
    of one problem never sit on both sides.
    """
    ids = sorted(set(problem_ids))
    n_val = int(round(len(ids) * fraction))
    if fraction > 0 and n_val == 0 and len(ids) > 1:
        n_val = 1
    if n_val == 0:
        return set()
    ranked = sorted(ids, key=lambda pid: (hashlib.sha256(f"{seed}:{pid}".encode()).digest(), pid))
    return set(ranked[:n_val])


def assemble_examples(
    traces_path: str | Path,
    steps_path: str | Path,
    cfg: DatasetConfig,
    *,
    keep: str = "finished",
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Join the teacher's traces (``traces.parquet``) with their labeled steps
    (``labeled_steps.parquet``), filter, and split by problem.

    Returns the examples, one row per kept trace with the columns of
    :class:`~rscaffold.records.ExampleRecord` (steps ordered by index; rows ordered by split,
    problem and trace), and the counts of dropped traces by reason: ``failed`` (the request
    failed), ``truncated`` (the teacher hit its token limit; kept only with ``keep="all"``), ``no_answer`` / ``incorrect`` (``keep="correct"`` as in :func:`select_traces`, or
    ``cfg.only_correct``), ``too_few_steps`` (fewer than ``cfg.min_steps`` labeled steps).
    """
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_CHOICES)}, got {keep!r}")
    correct = pl.col("correct").fill_null(False)
    keep_correct = keep == "correct"
    drop_reason = (
        pl.when(pl.col("status") != "ok")
        .then(pl.lit("failed"))
        .when(pl.lit(keep != "all") & pl.col("truncated").fill_null(False))
        .then(pl.lit("truncated"))
        .when(pl.lit(keep_correct) & ~correct & pl.col("predicted_answer").is_null())
        .then(pl.lit("no_answer"))
        .when(pl.lit(keep_correct or cfg.only_correct) & ~correct)
        .then(pl.lit("incorrect"))
        .when(pl.col("n_steps") < cfg.min_steps)
        .then(pl.lit("too_few_steps"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    scanned = pl.scan_parquet(traces_path)
    traces = scanned.select(
        "trace_id",
        "problem_id",
        # the user's own problem id (absent from traces written before it was kept)
        pl.col("source_id")
        if "source_id" in scanned.collect_schema().names()
        else pl.lit(None, pl.String).alias("source_id"),
        # the problem's benchmark (absent from traces written before it was kept)
        pl.col("source") if "source" in scanned.collect_schema().names() else pl.lit(None, pl.String).alias("source"),
        "question",
        "gold_answer",
        "predicted_answer",
        "correct",
        "status",
        "truncated",
        # the teacher's visible final answer text (what the short-CoT student learns), null when blank
        pl.col("text").str.strip_chars().replace("", None).alias("answer_text"),
    )
    by_step = pl.col("step_index")
    steps = (
        pl.scan_parquet(steps_path)
        .select("trace_id", "step_index", "signal", "text", "source")
        .group_by("trace_id")
        .agg(
            pl.struct(by_step.alias("index"), "signal", "text", "source").sort_by(by_step).alias("steps"),
            pl.col("signal").sort_by(by_step).alias("signals"),
            pl.len().cast(pl.Int64).alias("n_steps"),
        )
    )
    joined = (
        traces.join(steps, on="trace_id", how="left")
        .with_columns(pl.col("n_steps").fill_null(0))
        .with_columns(drop_reason.alias("_drop"))
        .collect()
    )
    dropped = {
        reason: int(count)
        for reason, count in joined.get_column("_drop").drop_nulls().value_counts().iter_rows()
        if count
    }
    kept = joined.filter(pl.col("_drop").is_null())
    validation = validation_problems(
        kept.get_column("problem_id").unique().to_list(), cfg.validation_fraction, cfg.seed
    )
    examples = (
        kept.with_columns(
            pl.when(pl.col("problem_id").is_in(list(validation)))
            .then(pl.lit("validation"))
            .otherwise(pl.lit("train"))
            .alias("split"),
            pl.col("predicted_answer").alias("teacher_answer"),
        )
        .select(_EXAMPLE_COLUMNS)
        .sort("split", "problem_id", "trace_id")
    )
    return examples, dict(sorted(dropped.items()))


def dataset_stats(examples: pl.DataFrame, signal_names: Sequence[str]) -> dict[str, Any]:
    """Row counts per split, signal counts, mean steps, and label sources of assembled examples."""
    n = examples.height
    signals = Counter(dict(examples.get_column("signals").explode().drop_nulls().value_counts().iter_rows()))
    sources = examples.get_column("steps").explode().drop_nulls().struct.field("source").value_counts().iter_rows()
    splits = examples.get_column("split").value_counts().iter_rows()
    return {
        "rows": n,
        "splits": dict(sorted((k, int(v)) for k, v in splits)),
        "problems": examples.get_column("problem_id").n_unique(),
        "mean_steps": round(int(examples.get_column("n_steps").sum()) / n, 3) if n else 0.0,
        "signal_counts": {name: int(signals.get(name, 0)) for name in signal_names},
        "label_sources": dict(sorted((k, int(v)) for k, v in sources)),
        "teacher_accuracy": round(int(examples.get_column("correct").fill_null(False).sum()) / n, 4) if n else 0.0,
    }


def select_traces(traces: Sequence[TraceRecord], keep: str) -> tuple[list[TraceRecord], dict[str, int]]:
    """Filter traces for the dataset: ``keep="finished"`` keeps every successful trace that ended
    before the teacher's token limit, ``"correct"`` the finished ones whose answer checks out,
    ``"all"`` every successful one (cut-off and incorrect ones included). Failed traces are always
    dropped.

    Returns ``(kept, dropped_reasons)`` with reasons ``failed``, ``truncated`` (the teacher hit its
    token limit: finish reason ``length`` or an unclosed reasoning block), ``no_answer``, ``incorrect``.
    """
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_CHOICES)}, got {keep!r}")
    kept: list[TraceRecord] = []
    dropped: Counter = Counter()
    for t in traces:
        if t.status != "ok":
            dropped["failed"] += 1
        elif keep != "all" and t.truncated:
            dropped["truncated"] += 1
        elif keep == "correct" and not t.correct:
            dropped["no_answer" if t.predicted_answer is None else "incorrect"] += 1
        else:
            kept.append(t)
    log_truncated(
        dropped.get("truncated", 0), sum(t.status == "ok" and t.truncated for t in kept), len(traces), keep=keep
    )
    return kept, dict(dropped)


def log_truncated(dropped: int, kept: int, total: int, *, keep: str) -> None:
    """One log line on the traces that hit the teacher's token limit: how many were dropped or kept."""
    if keep == "all":
        (log.warning if kept else log.info)(
            "teacher.keep=all: %d of %d traces hit the teacher's token limit and are kept (unfinished reasoning)",
            kept,
            total,
        )
    else:
        log.info(
            "teacher.keep=%s: dropped %d of %d traces that hit the teacher's token limit (teacher.keep: all keeps them)",
            keep,
            dropped,
            total,
        )


def length_summary(lengths: Iterable[int], max_length: int | None = None) -> dict[str, Any]:
    """The distribution of example lengths in tokens: ``count``, ``mean``, ``p50``, ``p90``,
    ``p99``, ``max`` (nearest-rank percentiles, so each is a length that occurs), and with
    ``max_length`` how many examples are longer (``over_max_length``) and their share."""
    s = pl.Series("tokens", list(lengths), dtype=pl.Int64)
    n = s.len()
    out: dict[str, Any] = {"count": n}
    if n:
        out.update(
            mean=round(float(s.mean()), 1),
            **{f"p{q}": int(s.quantile(q / 100, interpolation="higher")) for q in (50, 90, 99)},
            max=int(s.max()),
        )
    else:
        out.update(mean=None, p50=None, p90=None, p99=None, max=None)
    if max_length is not None:
        over = int((s > max_length).sum()) if n else 0
        out.update(max_length=max_length, over_max_length=over, over_share=round(over / n, 4) if n else 0.0)
    return out
