"""The CLI validates everything before any stage starts (no Prefect run is created)."""

import yaml
from rscaffold_flows.cli import app
from typer.testing import CliRunner

from rscaffold.vocabulary import STAGES

runner = CliRunner()


def test_run_help_documents_options():
    out = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert out.exit_code == 0
    for opt in ("--config", "--refresh", "--artifacts-dir"):
        assert opt in out.output
    assert "null, [lists], {maps}" in " ".join(out.output.replace("│", " ").split())  # not eaten as markup


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


def test_set_overrides_show_in_show_config_and_are_validated():
    out = runner.invoke(
        app, ["show-config", "--set", "training.max_steps=200", "--set", "teacher.sampling.temperature=0.6"]
    )
    assert out.exit_code == 0, out.output
    shown = yaml.safe_load(out.output)
    assert shown["training"]["max_steps"] == 200 and shown["teacher"]["sampling"]["temperature"] == 0.6
    out = runner.invoke(app, ["show-config", "--set", "training.max_stepz=3"])
    assert out.exit_code == 2 and "training.max_stepz" in out.output and "unknown key" in out.output
    # the override is named (not the config file), with the closest key
    assert "from --set training.max_stepz; did you mean training.max_steps?" in " ".join(out.output.split())
    out = runner.invoke(app, ["show-config", "--set", "teacher.llm.concurency=3"])
    assert "did you mean teacher.llm.concurrency?" in " ".join(out.output.split())
    out = runner.invoke(app, ["fingerprints", "--set", "training.max_steps=many"])
    assert out.exit_code == 2 and "training.max_steps" in out.output


def test_set_changes_the_fingerprints(tmp_path):
    plain = runner.invoke(app, ["fingerprints", "--artifacts-dir", str(tmp_path)])
    changed = runner.invoke(app, ["fingerprints", "--artifacts-dir", str(tmp_path), "--set", "training.max_steps=7"])
    assert plain.exit_code == changed.exit_code == 0

    def table(output: str) -> dict[str, str]:
        return {w[0]: w[1] for w in map(str.split, output.splitlines()) if len(w) > 1 and w[0] in STAGES}

    fp, fp2 = table(plain.output), table(changed.output)
    assert len(fp) == len(STAGES)
    assert fp["dataset"] == fp2["dataset"] and fp["training"] != fp2["training"]


def test_version():
    import rscaffold

    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"rscaffold {rscaffold.__version__}"


def test_training_args_are_checked_before_any_stage(tmp_path):
    out = runner.invoke(app, ["show-config", "--set", "training.args.learning_rate=0.1"])
    assert out.exit_code == 2
    assert "training.args.learning_rate is set by rscaffold itself from training.learning_rate" in " ".join(
        out.output.split()
    )
    out = runner.invoke(app, ["fingerprints", "--artifacts-dir", str(tmp_path), "--set", "training.args.optimm=x"])
    assert out.exit_code == 2 and "training.args.optimm: not an argument of TRL's SFTConfig" in " ".join(
        out.output.split()
    )
    out = runner.invoke(
        app,
        [
            "show-config",
            "--set",
            "training.max_steps=null",
            "--set",
            "training.epochs=2",
            "--set",
            "training.args={optim: adafactor}",
        ],
    )
    shown = yaml.safe_load(out.output)["training"]
    assert shown["max_steps"] is None and shown["epochs"] == 2 and shown["args"] == {"optim": "adafactor"}


def test_experiment_dry_run_prints_cells_and_cost_and_runs_nothing(tmp_path, monkeypatch, tiny_model_dir, smollm2_dir):
    import rscaffold_flows.experiment
    from helpers import tiny_config_dict

    def must_not_run(*a, **k):  # test guard: a dry run starts no flow
        raise AssertionError("flow started")

    monkeypatch.setattr(rscaffold_flows.experiment, "rscaffold_experiment", must_not_run)
    grid = tmp_path / "grid.yaml"
    cfg = tiny_config_dict(tiny_model_dir, smollm2_dir, tmp_path / "artifacts")
    axes = {"training.signal_loss_weight": [0.5, 1.0], "training.seed": [0, 1]}
    grid.write_text(yaml.safe_dump({"config": cfg, "axes": axes}, sort_keys=False))
    out = runner.invoke(app, ["experiment", "--config", str(grid), "--dry-run"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "4 cell(s)" in out.output and "signal_loss_weight=0.5,seed=1" in out.output
    assert "teacher: 1 run(s), up to 8 request(s)" in out.output
    # 4 scaffolded students, and each baseline once per seed
    assert "training runs: 8 student(s) to train (cot_sft, scaffolded, short_cot), 0 reused" in out.output
    assert "evaluations: 4 to run" in out.output
    assert not (tmp_path / "artifacts").exists()

    grid.write_text(yaml.safe_dump({"config": cfg, "axes": {"training.no_such": [1]}}))
    out = runner.invoke(app, ["experiment", "--config", str(grid), "--dry-run"])
    assert out.exit_code == 2 and "training.no_such" in out.output


def test_a_run_with_every_output_complete_starts_no_flow_and_a_damaged_one_does(
    tmp_path, monkeypatch, tiny_model_dir, smollm2_dir
):
    """Re-running a finished config checks the outputs against their manifests and stops there:
    no temporary Prefect server, no flow run. A damaged output means work, so the flow runs."""
    from pathlib import Path

    import rscaffold_flows.pipeline
    from helpers import tiny_config_dict

    from rscaffold.config import config_from_dict
    from rscaffold.stages.evaluation import run_evaluation
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.problems import run_problems

    raw = tiny_config_dict(tiny_model_dir, smollm2_dir, tmp_path / "artifacts")
    raw["training"].update(student=str(tiny_model_dir), tiny=None, tokenizer=None)
    raw["evaluation"]["models"] = ["base"]  # the problems and the evaluation: all it needs
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = config_from_dict(raw)
    fps = plan_fingerprints(cfg)
    evaluation = run_evaluation(cfg, fps, problems=run_problems(cfg, fps))

    flows: list[dict] = []
    monkeypatch.setattr(rscaffold_flows.pipeline, "rscaffold_pipeline", lambda **kw: flows.append(kw) or {})
    out = runner.invoke(app, ["run", "--config", str(tmp_path / "cfg.yaml")], terminal_width=250)
    assert out.exit_code == 0, out.output
    assert "nothing to run" in out.output and fps["evaluation"] in out.output and not flows

    (Path(evaluation.path) / "metrics.parquet").write_bytes(b"damaged")
    out = runner.invoke(app, ["run", "--config", str(tmp_path / "cfg.yaml")], terminal_width=250)
    assert out.exit_code == 0, out.output
    assert "nothing to run" not in out.output and len(flows) == 1
