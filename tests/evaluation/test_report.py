"""The evaluation report (rscaffold.evaluation.report), and its regeneration from the Parquet files
alone with `rscaffold report`."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import TOY_TEACHER, png_size, prediction, sample_predictions

from rscaffold.evaluation.metrics import compute_metrics
from rscaffold.evaluation.report import accuracy_table, find_evaluation_dir, render_report, write_report
from rscaffold.records import MetricRecord, PredictionRecord
from rscaffold.store import write_records


def _write_eval_dir(d: Path, predictions, finished_at: float) -> Path:
    d.mkdir(parents=True)
    write_records(d / "predictions.parquet", predictions, PredictionRecord)
    write_records(d / "metrics.parquet", compute_metrics(predictions, 200, 0, teacher=TOY_TEACHER), MetricRecord)
    (d / "manifest.json").write_text(json.dumps({"finished_at": finished_at}))
    return d


def test_report_regenerated_from_parquet(tmp_path):
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    root = tmp_path / "artifacts"
    old = _write_eval_dir(root / "evaluation" / "aaaa", sample_predictions()[:12], finished_at=1.0)
    new = _write_eval_dir(root / "evaluation" / "bbbb", sample_predictions(), finished_at=2.0)
    (root / "training").mkdir()
    report, chart = write_report(new)
    text = report.read_text()
    w, h = png_size(chart)
    assert w > 300 and h > 200
    # one table, models x benchmarks, accuracy with its interval
    assert "| model | gsm8k | strategyqa |" in text
    row = accuracy_table(compute_metrics(sample_predictions(), 200, 0))[0]
    assert row["model"] == "base" and f"| base | {row['gsm8k']} | {row['strategyqa']} |" in text
    assert "![accuracy per model and benchmark](accuracy.png)" in text
    assert "math_equation" in text and "Inconsistent examples" in text and "transition TV" in text
    # deterministic: the same files give the same report
    report.unlink()
    chart.unlink()
    assert write_report(new)[0].read_text() == text
    # built in a work directory, the report names the directory it is published as
    published = write_report(new, published=root / "evaluation" / "cccc")[0].read_text()
    assert f"Generated from `{root / 'evaluation' / 'cccc'}`" in published and str(new) not in published
    write_report(new)

    # the command accepts the directory itself, the artifacts root and its evaluation/ folder
    assert find_evaluation_dir(new) == new.resolve()
    assert find_evaluation_dir(root) == new.resolve() == find_evaluation_dir(root / "evaluation")
    (new / "report.md").unlink()
    res = CliRunner().invoke(app, ["report", str(root)])
    assert res.exit_code == 0, res.output
    assert "newest evaluation" in res.output and "bbbb" in res.output.replace("\n", "") and (new / "report.md").exists()
    assert not (old / "report.md").exists()
    res = CliRunner().invoke(app, ["report", str(old)])
    assert res.exit_code == 0 and "newest" not in res.output and (old / "report.md").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2


def test_render_report_without_signals_or_checks():
    preds = [prediction("base", "commonsenseqa", i, i == 0) for i in range(3)]
    text = render_report(compute_metrics(preds, 0), preds, chart=None)
    assert "| base | 33.3 [33.3, 33.3] |" in text and "No model generated signals." in text and "![" not in text


def test_report_shows_where_each_models_signals_came_from(tmp_path):
    from rscaffold.store import read_records

    preds = [
        prediction("scaffolded", "gsm8k", 0, True, signals=["A"]).model_copy(
            update={"signal_sources": ["gate", "none", "none", "none"]}
        ),
        prediction("scaffolded-freefallback", "gsm8k", 0, True, signals=["A", "B"]).model_copy(
            update={"signal_sources": ["gate", "free"]}
        ),
        prediction("base", "gsm8k", 0, True),  # recorded no sources (an older file)
    ]
    write_records(tmp_path / "p.parquet", preds, PredictionRecord)
    assert [p.signal_sources for p in read_records(tmp_path / "p.parquet", PredictionRecord)] == [
        ["gate", "none", "none", "none"],
        ["gate", "free"],
        None,
    ]
    text = render_report(compute_metrics(preds, 0), preds, chart=None)
    assert "## Signal sources" in text
    assert "| scaffolded | gsm8k | 4 | 25.0 | 0.0 | 75.0 |" in text
    assert "| scaffolded-freefallback | gsm8k | 2 | 50.0 | 50.0 | 0.0 |" in text
    assert "| base | gsm8k |" not in text.split("## Signal sources")[1].split("##")[0]
