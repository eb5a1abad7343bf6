"""The experiment report from evaluation outputs (written here as the evaluation stage writes them)."""

from __future__ import annotations

import polars as pl
import pytest
from helpers import PNG_SIGNATURE

from rscaffold.evaluation.metrics import compute_metrics
from rscaffold.experiment.grid import expand_experiment
from rscaffold.experiment.report import write_experiment_report
from rscaffold.records import MetricRecord, PredictionRecord
from rscaffold.store import write_records

MODELS = ["short_cot", "cot_sft", "scaffolded"]


def _evaluation(path, correct: dict[str, str]):
    preds = [
        PredictionRecord(
            model=model,
            benchmark="gsm8k",
            problem_id=f"p{i}",
            question="q",
            gold_answer="1",
            output="1" if bit == "1" else "2",
            correct=bit == "1",
            parsed=True,
            output_tokens=3,
            signals=[],
            latency_s=0.1,
        )
        for model, bits in correct.items()
        for i, bit in enumerate(bits)
    ]
    path.mkdir(parents=True)
    write_records(path / "predictions.parquet", preds, PredictionRecord)
    write_records(path / "metrics.parquet", compute_metrics(preds, 100, 0), MetricRecord)
    return path


def test_report_shares_baseline_rows_and_counts_each_comparison_once(tmp_path):
    exp = expand_experiment(
        {
            "name": "demo",
            "config": {"run": {"artifacts_dir": str(tmp_path / "artifacts")}, "evaluation": {"models": MODELS}},
            "axes": {"training.signal_loss_weight": [0.5, 1.0], "training.seed": [0, 1]},
            "bootstrap_samples": 200,
        },
        base=tmp_path,
    )
    # the baselines answer the same in both weights' cells of a seed (they are the same model)
    baselines = {
        0: {"short_cot": "10000000", "cot_sft": "11000000"},
        1: {"short_cot": "00000001", "cot_sft": "11100000"},
    }
    scaffolded = {(0.5, 0): "11110000", (0.5, 1): "11110000", (1.0, 0): "11111100", (1.0, 1): "11111110"}
    evaluations = {
        c.id: _evaluation(
            tmp_path / "ev" / c.id,
            {
                **baselines[c.config.training.seed],
                "scaffolded": scaffolded[(c.config.training.signal_loss_weight, c.config.training.seed)],
            },
        )
        for c in exp.cells
    }
    files = write_experiment_report(exp, evaluations)
    assert files["report"].parent == tmp_path / "artifacts" / "experiments" / "demo"

    results = pl.read_parquet(files["results"])
    assert results.height == 4 * 3
    # an integer axis (the seed) stays integer, a number axis is float
    assert (results.schema["training.seed"], results.schema["training.signal_loss_weight"]) == (pl.Int64, pl.Float64)
    assert results["n_comparisons"].drop_nulls().unique().to_list() == [6]  # short_cot x 2 seeds + scaffolded x 4
    row = results.filter((pl.col("cell") == "signal_loss_weight=1.0,seed=1") & (pl.col("model") == "scaffolded"))
    assert row["diff"][0] == pytest.approx(7 / 8 - 3 / 8) and (row["b"][0], row["c"][0]) == (4, 0)
    assert row["p_mcnemar"][0] == pytest.approx(2 / 16)

    summary = pl.read_parquet(files["summary"])
    assert summary["label"].to_list() == [
        "short_cot",
        "cot_sft",
        "scaffolded (signal_loss_weight=0.5)",
        "scaffolded (signal_loss_weight=1.0)",
    ]
    top = summary.filter(pl.col("label") == "scaffolded (signal_loss_weight=1.0)").row(0, named=True)
    assert top["accuracy_mean"] == pytest.approx((6 / 8 + 7 / 8) / 2)
    assert top["diff_mean"] == pytest.approx(((6 - 2) / 8 + (7 - 3) / 8) / 2)

    report = files["report"].read_text()
    assert "| scaffolded (signal_loss_weight=1.0) | 81.2 ± 8.8 (+50.0 [" in report
    assert "| cot_sft | 31.2 ± 8.8 (reference) |" in report
    assert "Holm's correction over all 6 comparisons" in report
    assert files["plot"].read_bytes()[:8] == PNG_SIGNATURE
