"""Paired statistics of an experiment: every model against a reference model on the same problems.

Every model of a cell answers the same problems, so a comparison is paired by problem:

* the accuracy difference ``model - reference``;
* a paired bootstrap interval of it (problems resampled with replacement, the model's and the
  reference's answers to a problem staying together; percentile interval, seeded);
* the exact McNemar test: under "no difference" each discordant problem (one right, the other
  wrong) is equally likely to go either way, so the two-sided p-value is the binomial tail of the
  smaller discordant count, doubled (capped at 1);
* the Holm correction over every comparison reported (their number is stated next to the p-values).

Seeds: a model trained with several seeds (rows that differ only in ``seed``) is summarised as the
mean and the sample standard deviation over seeds; its interval is the paired bootstrap of the
seed-averaged difference (each problem's difference averaged over the seeds, problems resampled).

The exact binomial tail is a few lines of :func:`math.comb` (exact integers, no floating-point
tail approximation), so the package needs no statistics library for it; the bootstrap resamples
with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

PREDICTION_COLUMNS = ("cell", "seed", "model", "benchmark", "problem_id", "correct")


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (model right and the
    reference wrong, and the reverse): ``min(1, 2 * P[X <= min(b, c)])`` with X ~ Binomial(b + c, 1/2);
    1.0 without discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def bootstrap_mean_ci(
    values: Sequence[float], samples: int = 2000, seed: int = 0, *, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per problem): ``samples``
    resamples of all the values with replacement (numpy's default generator seeded with ``seed``);
    the bounds are the sorted resample means at ``int(q * (samples - 1))`` for q = (1 - confidence)/2
    and its complement, as the evaluation's per-model intervals are taken."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // n)  # resamples per batch: bounded memory for long benchmarks
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    means.sort()
    alpha = 1 - confidence
    return float(means[int((alpha / 2) * (samples - 1))]), float(means[int((1 - alpha / 2) * (samples - 1))])


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (in their order): the i-th smallest becomes
    ``max over j <= i of min(1, (m - j + 1) * p_(j))``, m the number of p-values."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class PairedComparison:
    n: int
    accuracy: float
    reference_accuracy: float
    diff: float
    ci_low: float
    ci_high: float
    b: int  # the model right, the reference wrong
    c: int  # the model wrong, the reference right
    p_value: float


def paired_comparison(
    model: Sequence[bool], reference: Sequence[bool], *, samples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> PairedComparison:
    """Compare two models' correctness on the same problems (index i: problem i for both)."""
    if len(model) != len(reference):
        raise ValueError(f"paired by problem: {len(model)} answers vs {len(reference)}")
    m = np.asarray(model, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    n = len(m)
    b = int((m & ~r).sum())
    c = int((~m & r).sum())
    lo, hi = bootstrap_mean_ci(m.astype(float) - r.astype(float), samples, seed, confidence=confidence)
    acc = float(m.mean()) if n else 0.0
    ref = float(r.mean()) if n else 0.0
    return PairedComparison(n, acc, ref, acc - ref, lo, hi, b, c, mcnemar_exact(b, c))


def _check_columns(predictions: pl.DataFrame, extra: tuple[str, ...] = ()) -> None:
    missing = [c for c in (*PREDICTION_COLUMNS, *extra) if c not in predictions.columns]
    if missing:
        raise ValueError(f"the predictions table lacks column(s) {missing}")


def _paired(predictions: pl.DataFrame, cell: str, model: str, *, reference: str, benchmark: str) -> pl.DataFrame:
    """problem_id, correct (the model), ref (the reference) of one cell and benchmark, joined by problem."""
    rows = predictions.filter((pl.col("cell") == cell) & (pl.col("benchmark") == benchmark))
    mine = rows.filter(pl.col("model") == model).select("problem_id", "correct")
    ref = rows.filter(pl.col("model") == reference).select("problem_id", pl.col("correct").alias("ref"))
    if mine["problem_id"].is_duplicated().any() or ref["problem_id"].is_duplicated().any():
        raise ValueError(f"cell {cell}, {benchmark}: a problem is answered twice by {model} or {reference}")
    return mine.join(ref, on="problem_id", how="inner").sort("problem_id")


def compare_to_reference(
    predictions: pl.DataFrame,
    reference: str,
    *,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pl.DataFrame:
    """One row per cell x model x benchmark: accuracy, and against ``reference`` in the same cell:
    the difference, its paired bootstrap interval, the discordant counts, the exact McNemar
    p-value, the Holm-adjusted p-value and the number of comparisons it was adjusted over (the
    reference's own rows have no test).

    ``predictions``: columns cell, seed, model, benchmark, problem_id, correct; an optional
    ``group`` column names the model variant of a row (rows of one group and seed are the same
    model answering the same problems, e.g. a baseline shared by cells that vary what it does not
    depend on): such a comparison is counted once in the correction.
    """
    _check_columns(predictions)
    has_group = "group" in predictions.columns
    keys = predictions.select("cell", "seed", "model", "benchmark", *(["group"] if has_group else [])).unique(
        maintain_order=True
    )
    rows = []
    for row in keys.iter_rows(named=True):
        cell, model, bench = row["cell"], row["model"], row["benchmark"]
        if model == reference:
            ref = predictions.filter(
                (pl.col("cell") == cell) & (pl.col("benchmark") == bench) & (pl.col("model") == model)
            )["correct"]
            acc = float(ref.mean()) if len(ref) else 0.0
            rows.append({**row, "n": len(ref), "accuracy": acc, "reference": reference, "reference_accuracy": acc})
            continue
        pair = _paired(predictions, cell, model, reference=reference, benchmark=bench)
        if pair.height == 0:
            raise ValueError(f"cell {cell}, {bench}: no problem answered by both {model} and {reference}")
        cmp = paired_comparison(
            pair["correct"].to_list(), pair["ref"].to_list(), samples=samples, seed=seed, confidence=confidence
        )
        rows.append(
            {
                **row,
                "n": cmp.n,
                "accuracy": cmp.accuracy,
                "reference": reference,
                "reference_accuracy": cmp.reference_accuracy,
                "diff": cmp.diff,
                "diff_ci_low": cmp.ci_low,
                "diff_ci_high": cmp.ci_high,
                "b": cmp.b,
                "c": cmp.c,
                "p_mcnemar": cmp.p_value,
            }
        )
    schema = {
        "cell": pl.String,
        "seed": pl.Int64,
        "model": pl.String,
        "benchmark": pl.String,
        **({"group": pl.String} if has_group else {}),
        "n": pl.Int64,
        "accuracy": pl.Float64,
        "reference": pl.String,
        "reference_accuracy": pl.Float64,
        "diff": pl.Float64,
        "diff_ci_low": pl.Float64,
        "diff_ci_high": pl.Float64,
        "b": pl.Int64,
        "c": pl.Int64,
        "p_mcnemar": pl.Float64,
    }
    out = pl.DataFrame(rows, schema=schema)
    # Holm over the distinct comparisons
    ident = ["group" if has_group else "cell", "seed", "model", "benchmark"]
    tests = out.filter(pl.col("p_mcnemar").is_not_null()).unique(subset=ident, keep="first", maintain_order=True)
    adjusted = tests.select(*ident).with_columns(p_holm=pl.Series(holm(tests["p_mcnemar"].to_list()), dtype=pl.Float64))
    out = out.join(adjusted, on=ident, how="left", nulls_equal=True)
    return out.with_columns(
        n_comparisons=pl.when(pl.col("p_holm").is_not_null()).then(pl.lit(tests.height)).otherwise(None)
    )


def aggregate_seeds(
    predictions: pl.DataFrame,
    comparisons: pl.DataFrame,
    *,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pl.DataFrame:
    """One row per group x model x benchmark (``predictions`` and ``comparisons`` need the
    ``group`` column): the seeds, the mean and sample standard deviation over seeds of the accuracy
    and of the difference to the reference, the paired bootstrap interval of the seed-averaged
    difference, and the largest Holm-adjusted p-value over the seeds. A group evaluated in several
    cells with the same seed counts that seed once (the first cell)."""
    _check_columns(predictions, ("group",))
    firsts = comparisons.unique(subset=["group", "seed", "model", "benchmark"], keep="first", maintain_order=True)
    rows = []
    for (group, model, bench), part in firsts.group_by(["group", "model", "benchmark"], maintain_order=True):
        part = part.sort("seed")
        acc = part["accuracy"].to_list()
        row = {
            "group": group,
            "model": model,
            "benchmark": bench,
            "reference": part["reference"][0],
            "seeds": part.height,
            "seed_list": [int(s) for s in part["seed"].to_list()],
            "accuracy_mean": float(np.mean(acc)),
            "accuracy_sd": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
            "diff_mean": None,
            "diff_sd": None,
            "diff_ci_low": None,
            "diff_ci_high": None,
            "p_holm_max": None,
        }
        if part["diff"].null_count() == 0:
            diffs = part["diff"].to_list()
            per_problem = None
            for cell in part["cell"].to_list():
                pair = _paired(predictions, cell, model, reference=part["reference"][0], benchmark=bench)
                d = pair.select("problem_id", (pl.col("correct").cast(pl.Float64) - pl.col("ref")).alias(cell))
                per_problem = d if per_problem is None else per_problem.join(d, on="problem_id", how="inner")
            assert per_problem is not None
            averaged = per_problem.drop("problem_id").mean_horizontal().to_list()
            lo, hi = bootstrap_mean_ci(averaged, samples, seed, confidence=confidence)
            row.update(
                diff_mean=float(np.mean(diffs)),
                diff_sd=float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
                diff_ci_low=lo,
                diff_ci_high=hi,
                p_holm_max=float(part["p_holm"].max()),
            )
        rows.append(row)
    return pl.DataFrame(
        rows,
        schema={
            "group": pl.String,
            "model": pl.String,
            "benchmark": pl.String,
            "reference": pl.String,
            "seeds": pl.Int64,
            "seed_list": pl.List(pl.Int64),
            "accuracy_mean": pl.Float64,
            "accuracy_sd": pl.Float64,
            "diff_mean": pl.Float64,
            "diff_sd": pl.Float64,
            "diff_ci_low": pl.Float64,
            "diff_ci_high": pl.Float64,
            "p_holm_max": pl.Float64,
        },
    )
