"""The CLI validates everything before any stage starts (no Prefect run is created)."""

import yaml
from rscaffold_flows.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def test_run_help_documents_options():
    out = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert out.exit_code == 0
    for opt in ("--config", "--refresh", "--artifacts-dir"):
        assert opt in out.output


def test_bad_config_stops_before_any_stage(tmp_path, monkeypatch):
    import rscaffold_flows.pipeline

    def must_not_run(*a, **k):  # test guard: the flow must not start on a bad config
        raise AssertionError("flow started")

    monkeypatch.setattr(rscaffold_flows.pipeline, "rscaffold_pipeline", must_not_run)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"teacher": {"llm": {"backend": "nope"}}, "training": {"max_stepz": 3}}))
    out = runner.invoke(app, ["run", "--config", str(bad)])
    assert out.exit_code == 2
    assert "teacher.llm.backend" in out.output and "training.max_stepz" in out.output


def test_missing_config_file_and_missing_inputs(tmp_path):
    out = runner.invoke(app, ["run", "--config", str(tmp_path / "missing.yaml")])
    assert out.exit_code == 2 and "not found" in out.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"problems": {"eval": "nowhere.jsonl"}}))
    out = runner.invoke(app, ["run", "--config", str(cfg)])
    assert out.exit_code == 2 and "problems.eval" in out.output


def test_unknown_refresh_stage(tmp_path):
    out = runner.invoke(app, ["run", "--refresh", "teachers"])
    assert out.exit_code == 2 and "unknown stage" in out.output


def test_show_config_and_fingerprints(tmp_path):
    out = runner.invoke(app, ["show-config"])
    assert out.exit_code == 0 and "signal_loss_weight" in out.output
    out = runner.invoke(app, ["fingerprints", "--artifacts-dir", str(tmp_path)])
    assert out.exit_code == 0
    assert all(
        stage in out.output for stage in ("problems", "teacher", "labeling", "dataset", "training", "evaluation")
    )
    assert "missing" in out.output
