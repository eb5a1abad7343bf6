"""`rscaffold serve` (rscaffold_flows.serve): the deployments it builds, the command without a
server, and against a REAL Prefect server (the `server` fixture, tests/flows/conftest.py): it
registers its deployments with the schedule and the config, runs a started stage run, and pauses
its deployments when interrupted."""

from __future__ import annotations

import contextlib
import signal
import subprocess

import pytest
import yaml
from helpers import BIN_DIR, fast_config, log_tail, stage_manifests, stop_process, wait_for

from rscaffold.config import PipelineConfig, load_config

SERVED = ("rscaffold-pipeline/nightly-served", "rscaffold-stage/stage-served")


def test_served_deployments(tmp_path, monkeypatch):
    from prefect.client.schemas.schedules import CronSchedule
    from rscaffold_flows.serve import ServeError, served_deployments

    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides={"run": {"artifacts_dir": "out"}})
    pipeline, stage = served_deployments(cfg, cron="15 2 * * 1-5", timezone="Europe/Berlin")
    assert (pipeline.name, pipeline.entrypoint) == ("nightly-served", "rscaffold_flows.pipeline.rscaffold_pipeline")
    assert (stage.name, stage.entrypoint) == ("stage-served", "rscaffold_flows.pipeline.rscaffold_stage")
    (schedule,) = pipeline.schedules
    assert isinstance(schedule.schedule, CronSchedule)
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 2 * * 1-5", "Europe/Berlin")
    assert not stage.schedules
    served_cfg = PipelineConfig.model_validate(pipeline.parameters["config"])
    assert served_cfg.run.artifacts_dir == str(tmp_path / "out")  # made absolute at serve time
    assert served_cfg.model_copy(update={"run": cfg.run}) == cfg
    assert stage.parameters["stage"] == "evaluation" and stage.parameters["downstream"] is False
    assert served_deployments(cfg, cron=None)[0].schedules == []
    with pytest.raises(ServeError, match="invalid schedule"):
        served_deployments(cfg, cron="61 * * * *")


def test_serve_command_needs_a_server():
    from prefect.settings import temporary_settings
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    with temporary_settings(restore_defaults={"api.url"}):
        result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "start one with `prefect server start`" in " ".join(result.output.split())


@pytest.mark.slow
def test_rscaffold_serve(server, tiny_model_dir, smollm2_dir, tmp_path):
    """(e) `rscaffold serve`: deployments with the schedule and config, a run executed, paused on exit."""
    from prefect.deployments import run_deployment
    from rscaffold_flows.serve import deployment_parameters

    cfg = fast_config(tiny_model_dir, smollm2_dir, tmp_path / "served-artifacts")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN_DIR / "rscaffold"), "serve", "--config", str(config_file), "--cron", "30 4 * * *"],
            cwd=tmp_path,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with server.api():
            client = server.client()

            def registered():
                if proc.poll() is not None:
                    raise AssertionError(f"rscaffold serve exited with {proc.returncode}:\n{log_tail(log)}")
                with contextlib.suppress(Exception):  # not (yet) there: ObjectNotFound
                    return [client.read_deployment_by_name(name) for name in SERVED]

            nightly, _stage = wait_for(registered, 90, "rscaffold serve to register both deployments", interval=1)
            (schedule,) = client.read_deployment_schedules(nightly.id)
            assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 4 * * *", "UTC", True)
            assert nightly.parameters["config"] == deployment_parameters(cfg)["config"]

            # A run started from the API is executed by the serving process.
            run = run_deployment(
                "rscaffold-stage/stage-served", parameters={"stage": "problems"}, timeout=120, poll_interval=1
            )
            assert run.state.is_completed(), f"{run.state!r}\n{log_tail(log)}"
            assert stage_manifests(cfg)["problems"] is not None

            # Ctrl-C: serve pauses its deployments, so no scheduled run waits for a server that is gone.
            stop_process(proc, signal.SIGINT, grace_s=30)
            assert proc.returncode == 0, log_tail(log)
            assert client.read_deployment(nightly.id).paused, log_tail(log)
    finally:
        stop_process(proc)
