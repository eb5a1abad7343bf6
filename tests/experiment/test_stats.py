"""Paired statistics against hand computations on fixed predictions."""

from __future__ import annotations

import itertools
import math

import polars as pl
import pytest

from rscaffold.experiment.stats import (
    aggregate_seeds,
    bootstrap_mean_ci,
    compare_to_reference,
    holm,
    mcnemar_exact,
    paired_comparison,
)


def test_mcnemar_exact_is_the_doubled_binomial_tail():
    # b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == pytest.approx(158 / 4096)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 3) == 1.0  # 2 * 42/64 > 1: capped
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_holm_adjusts_step_down_in_input_order():
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> max(.06, .04)=.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def _exact_bootstrap_quantiles(values, confidence=0.95):
    """The exact bootstrap distribution of the mean (all n^n equally likely resamples), its
    quantiles at the positions the seeded bootstrap takes them."""
    n = len(values)
    means = sorted(sum(values[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))
    total = len(means)
    alpha = 1 - confidence
    return means[int(alpha / 2 * (total - 1))], means[int((1 - alpha / 2) * (total - 1))]


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution():
    model = [True, True, True, False, True, True]
    reference = [False, True, False, False, True, False]
    diffs = [int(m) - int(r) for m, r in zip(model, reference, strict=True)]  # [1, 0, 1, 0, 0, 1]
    exact = _exact_bootstrap_quantiles(diffs)
    assert exact == (pytest.approx(1 / 6), pytest.approx(5 / 6))
    cmp = paired_comparison(model, reference, samples=20000, seed=7)
    assert (cmp.ci_low, cmp.ci_high) == (pytest.approx(exact[0]), pytest.approx(exact[1]))
    assert cmp.diff == pytest.approx(0.5) and (cmp.b, cmp.c) == (3, 0)
    assert cmp.p_value == pytest.approx(2 / 8)
    # seeded: the same interval every time; a constant difference has no spread
    assert bootstrap_mean_ci(diffs, 500, seed=3) == bootstrap_mean_ci(diffs, 500, seed=3)
    assert bootstrap_mean_ci([1.0, 1.0, 1.0], 100) == (1.0, 1.0)


def _table() -> pl.DataFrame:
    """12 problems, two seeds (cells s0, s1), the reference cot_sft and the scaffolded student."""
    answers = {
        ("s0", "cot_sft"): "110011001100",
        ("s0", "scaffolded"): "111111001000",
        ("s1", "cot_sft"): "101010101010",
        ("s1", "scaffolded"): "111010111010",
    }
    rows = []
    for (cell, model), bits in answers.items():
        for i, bit in enumerate(bits):
            rows.append(
                {
                    "cell": cell,
                    "seed": int(cell[1]),
                    "model": model,
                    "benchmark": "gsm8k",
                    "problem_id": f"p{i:02d}",
                    "correct": bit == "1",
                    "group": model,
                }
            )
    return pl.DataFrame(rows)


def test_comparisons_and_seed_aggregation_on_a_fixed_table():
    preds = _table()
    cmp = compare_to_reference(preds, "cot_sft", samples=1000, seed=0)
    scaf = {r["seed"]: r for r in cmp.filter(pl.col("model") == "scaffolded").iter_rows(named=True)}
    # seed 0: ref 110011001100 vs 111111001000: b = problems 2, 3 (model right only) = 2; c = problem 9 = 1
    assert (scaf[0]["b"], scaf[0]["c"]) == (2, 1)
    assert scaf[0]["accuracy"] == pytest.approx(7 / 12) and scaf[0]["reference_accuracy"] == pytest.approx(6 / 12)
    assert scaf[0]["diff"] == pytest.approx(1 / 12)
    assert scaf[0]["p_mcnemar"] == pytest.approx(1.0)  # 2 * (1 + 3) / 8 > 1
    # seed 1: ref 101010101010 vs 111010111010: b = problems 1, 7; c = 0
    assert (scaf[1]["b"], scaf[1]["c"]) == (2, 0)
    assert scaf[1]["p_mcnemar"] == pytest.approx(0.5)
    # Holm over the two comparisons: 0.5 -> 1.0, 1.0 -> 1.0
    assert scaf[1]["p_holm"] == pytest.approx(1.0) and scaf[1]["n_comparisons"] == 2
    ref_rows = cmp.filter(pl.col("model") == "cot_sft")
    assert ref_rows["p_mcnemar"].is_null().all() and ref_rows["n_comparisons"].is_null().all()

    agg = aggregate_seeds(preds, cmp, samples=1000, seed=0)
    row = agg.filter(pl.col("model") == "scaffolded").row(0, named=True)
    assert row["seeds"] == 2 and row["seed_list"] == [0, 1]
    assert row["accuracy_mean"] == pytest.approx((7 / 12 + 8 / 12) / 2)
    assert row["accuracy_sd"] == pytest.approx(math.sqrt(2 * (0.5 / 12) ** 2))  # sd of {7/12, 8/12}
    assert row["diff_mean"] == pytest.approx((1 / 12 + 2 / 12) / 2)
    assert row["diff_ci_low"] <= row["diff_mean"] <= row["diff_ci_high"]
    # the seed-averaged per-problem differences, bootstrapped with the same seed
    averaged = [
        (a + b) / 2
        for a, b in zip([0, 0, 1, 1, 0, 0, 0, 0, 0, -1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], strict=True)
    ]
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx(bootstrap_mean_ci(averaged, 1000, 0))


def test_duplicate_comparisons_of_one_group_count_once():
    preds = _table()
    copy = preds.filter(pl.col("cell") == "s0").with_columns(cell=pl.lit("s0-again"))
    cmp = compare_to_reference(pl.concat([preds, copy]), "cot_sft", samples=100)
    assert cmp.filter(pl.col("model") == "scaffolded")["n_comparisons"].to_list() == [2, 2, 2]
