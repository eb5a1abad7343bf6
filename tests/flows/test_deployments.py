"""Deployments against a REAL Prefect server: the project file, schedules, workers, retries, resume.

A `prefect server start` subprocess (the `server` fixture, tests/flows/conftest.py) runs for the
module. Against it:

(a) `prefect deploy --all --prefect-file deployments/prefect.yaml` creates both deployments; the
    cron schedule is read back through the API and the scheduler creates its runs;
(b) a `prefect worker start --run-once` subprocess runs the pipeline deployment with the tiny
    config as parameter; the run completes and every stage's Parquet files are there;
(c) our real problems task, with run.retries=2 and a failure injected twice, completes on its
    third try and the server's task-run history shows the two retries;
(d) a worker killed (with its flow-run process) in the middle of training leaves the earlier
    stages intact; after the killed run is marked crashed, the next run takes them from the cache
    and finishes.

`rscaffold serve` is tested in test_serve.py. The first tests check the project file without a
server.

If the server cannot start here (no free port, a sandbox forbidding it) the server tests are
skipped with the server's log as the reason; under CI (`CI` set) they fail instead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import BIN_DIR, REPO, Server, fast_config, log_tail, stage_manifests, stop_process, wait_for

from rscaffold.config import PipelineConfig, load_config
from rscaffold.experiment.grid import load_experiment_file
from rscaffold.vocabulary import STAGES

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
POOL = "rscaffold-process"
NIGHTLY = "rscaffold-pipeline/nightly"


# ---------------------------------------------------------------------------------------------
# the project file, no server


def _project_file() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def test_prefect_yaml_is_a_valid_project_file():
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    # `prefect deploy` only warns and skips a file that fails this model; here it must pass.
    model = PrefectYamlModel.model_validate(_project_file())
    deployments = {d.name: d for d in model.deployments}
    assert set(deployments) == {"nightly", "stage", "experiment"}
    for d in deployments.values():
        path, func = d.entrypoint.split(":")
        assert (
            load_flow_from_entrypoint(f"{REPO / path}:{func}").name
            == {"nightly": "rscaffold-pipeline", "stage": "rscaffold-stage", "experiment": "rscaffold-experiment"}[
                d.name
            ]
        )
        assert d.work_pool.name == POOL
    (nightly_schedule,) = deployments["nightly"].schedules
    assert isinstance(nightly_schedule, RawScheduleConfig)
    CronSchedule(cron=nightly_schedule.cron, timezone=nightly_schedule.timezone)  # valid cron + zone
    assert deployments["stage"].schedules == [] and deployments["experiment"].schedules == []
    assert model.pull and "prefect.deployments.steps.set_working_directory" in model.pull[0]


def test_prefect_yaml_parameters_are_the_default_config_and_fit_the_flow_schema():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate
    from rscaffold_flows.experiment import rscaffold_experiment
    from rscaffold_flows.pipeline import rscaffold_pipeline, rscaffold_stage

    default = load_config()
    for d in _project_file()["deployments"]:
        if d["name"] == "experiment":
            # an experiment file of the repository, which expands to valid cells
            assert load_experiment_file(REPO / d["parameters"]["experiment_file"]).cells
            validate(
                d["parameters"], parameter_schema(rscaffold_experiment).model_dump_for_openapi(), raise_on_error=True
            )
            continue
        flow = {"nightly": rscaffold_pipeline, "stage": rscaffold_stage}[d["name"]]
        # The deployment runs the embedded default (data/default.yaml); the two must not drift.
        assert PipelineConfig.model_validate(d["parameters"]["config"]) == default, d["name"]
        # What the server enforces (enforce_parameter_schema) when a run is created.
        validate(d["parameters"], parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True)


# ---------------------------------------------------------------------------------------------
# the server


def _kill_now(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants at once: the machine running them goes away."""
    import psutil

    family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=10)


def _wait_exit(proc: subprocess.Popen, timeout: float, log: Path) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout:.0f} s:\n{log_tail(log)}") from None


def _cli(server: Server, *args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN_DIR / "prefect"), "--no-prompt", *args],
        cwd=cwd,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@contextlib.contextmanager
def _worker(server: Server, cwd: Path, run_once: bool):
    """A `prefect worker start` subprocess on the process pool; always stopped."""
    log = cwd / f"worker-{time.monotonic_ns()}.log"
    args = [str(BIN_DIR / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1"]
    if run_once:
        args.append("--run-once")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            args, cwd=cwd, env=server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc, log
    finally:
        stop_process(proc)


def _task_runs(client, flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import FlowRunFilter

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    return {r.name.split("[")[0].rsplit("-", 1)[0]: r for r in runs}


@pytest.fixture(scope="module")
def deployed(server):
    """(a) The project file deployed with the real `prefect deploy` CLI."""
    _cli(server, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    out = _cli(server, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert "Skipping" not in out.stdout, out.stdout  # prefect deploy skips an invalid file with a warning
    return out


@pytest.mark.slow
def test_deploy_registers_schedule_and_parameters(server, deployed):
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
    from prefect.client.schemas.schedules import CronSchedule

    with server.api():
        client = server.client()
        nightly = client.read_deployment_by_name(NIGHTLY)
        stage = client.read_deployment_by_name("rscaffold-stage/stage")
        (schedule,) = client.read_deployment_schedules(nightly.id)
        assert isinstance(schedule.schedule, CronSchedule) and schedule.active
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
        assert client.read_deployment_schedules(stage.id) == []
        assert nightly.work_pool_name == POOL and stage.work_pool_name == POOL
        assert nightly.entrypoint == "flows/pipeline.py:rscaffold_pipeline"
        assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert PipelineConfig.model_validate(nightly.parameters["config"]) == load_config()
        assert nightly.enforce_parameter_schema

        # The server's scheduler turns the cron schedule into scheduled runs at 03:00 UTC.
        def scheduled():
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [nightly.id]}))
            return [r for r in runs if r.state_type.value == "SCHEDULED" and r.auto_scheduled]

        runs = wait_for(scheduled, 60, "the scheduler to create the nightly runs", interval=1)
        for run in runs:
            t = run.expected_start_time.astimezone(datetime.timezone.utc)
            assert (t.hour, t.minute) == (3, 0), t
        # Keep the rest of the module's workers away from real nightly runs.
        client.pause_deployment(nightly.id)
        wait_for(
            lambda: (
                not client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id={"any_": [nightly.id]}),
                    flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}}),
                )
            ),
            30,
            "the paused deployment's scheduled runs to go",
            interval=1,
        )


@pytest.mark.slow
def test_worker_runs_the_deployment(server, deployed, tiny_model_dir, smollm2_dir, tmp_path):
    """(b) run_deployment + a real process worker: the run completes and the Parquet files exist."""
    from prefect.deployments import run_deployment

    cfg = fast_config(tiny_model_dir, smollm2_dir, tmp_path / "artifacts")
    with server.api():
        run = run_deployment(NIGHTLY, parameters={"config": cfg.model_dump(mode="json")}, timeout=0)
        # Started from elsewhere: the deployment's pull step takes the run to the repository.
        with _worker(server, tmp_path, run_once=True) as (worker, log):
            _wait_exit(worker, 180, log)
        client = server.client()
        final = client.read_flow_run(run.id)
        assert final.state.is_completed(), f"{final.state!r}\n{log_tail(log)}"
        tasks = _task_runs(client, run.id)
        assert set(tasks) == set(STAGES), tasks
        assert all(t.state.is_completed() for t in tasks.values())

    manifests = stage_manifests(cfg)
    for stage, manifest in manifests.items():
        assert manifest is not None, f"{stage}: no complete output\n{log_tail(log)}"
        outputs = json.loads(manifest.read_text())["outputs"]
        for name, rel in outputs.items():
            path = manifest.parent / rel
            assert path.exists(), f"{stage}.{name}: {path}"
            if path.suffix == ".parquet":
                assert pq.read_table(path).num_rows > 0, path


@pytest.mark.slow
def test_task_retries_are_in_the_server_history(server, tiny_model_dir, smollm2_dir, tmp_path, monkeypatch):
    """(c) our problems task, run.retries=2, fails twice and succeeds on the third try."""
    from rscaffold_flows.pipeline import rscaffold_stage

    import rscaffold.stages.problems as pipeline_mod

    counter = tmp_path / "attempts"
    counter.write_text("0")
    original = pipeline_mod.run_problems

    def flaky_run_problems(*args, **kwargs):
        attempt = int(counter.read_text()) + 1
        counter.write_text(str(attempt))
        if attempt <= 2:
            raise RuntimeError(f"injected failure {attempt}")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "run_problems", flaky_run_problems)
    cfg = fast_config(tiny_model_dir, smollm2_dir, tmp_path / "artifacts")
    cfg.run.retries = 2
    cfg.run.retry_delay_s = 0.2
    with server.api():
        state = rscaffold_stage(config=cfg, stage="problems", return_state=True)
        assert state.is_completed(), state
        assert counter.read_text() == "3"
        client = server.client()
        flow_run_id = state.state_details.flow_run_id

        def finished_task():
            task = _task_runs(client, flow_run_id).get("problems")
            return task if task is not None and task.state is not None and task.state.is_completed() else None

        task = wait_for(finished_task, 30, "the task run's final state on the server")
        assert task.run_count == 3, task.run_count

        def history():
            names = [s.name for s in client.read_task_run_states(task.id)]
            return names if names.count("AwaitingRetry") == 2 and names[-1] == "Completed" else None

        names = wait_for(
            history,
            30,
            "two retries in the task-run history",
            show=lambda: [(s.type.value, s.name) for s in client.read_task_run_states(task.id)],
        )
        # Running -> (fails) AwaitingRetry -> Retrying, twice; then Completed
        assert Counter(names)["Retrying"] == 2 and names.count("Failed") == 0, names
    assert stage_manifests(cfg)["problems"] is not None


@pytest.mark.slow
def test_killed_worker_keeps_earlier_stages_and_next_run_resumes(
    server, deployed, tiny_model_dir, smollm2_dir, tmp_path
):
    """(d) kill the worker (and its flow-run process) while training; the next run resumes."""
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    cfg = fast_config(tiny_model_dir, smollm2_dir, tmp_path / "artifacts")
    params = {"config": cfg.model_dump(mode="json")}
    training_root = tmp_path / "artifacts" / "training"
    upstream = ("problems", "teacher", "labeling", "dataset")
    with server.api():
        client = server.client()
        first = run_deployment(NIGHTLY, parameters=params, timeout=0)
        with _worker(server, tmp_path, run_once=False) as (worker, log):
            # training's directory appears when it starts, after dataset's manifest is written
            wait_for(
                lambda: training_root.exists() or worker.poll() is not None, 180, "training to start", interval=0.1
            )
            assert worker.poll() is None, log_tail(log)
            _kill_now(worker)
        manifests = stage_manifests(cfg)
        for stage in upstream:
            assert manifests[stage] is not None, stage
        assert manifests["training"] is None, "training finished before the kill"
        before = {s: (manifests[s].stat().st_mtime_ns, manifests[s].read_bytes()) for s in upstream}
        for stage in upstream:  # the earlier stages' Parquet files are whole
            for rel in json.loads(manifests[stage].read_text())["outputs"].values():
                if rel.endswith(".parquet"):
                    pq.read_table(manifests[stage].parent / rel)

        # Nothing reports for a killed machine; mark its run crashed (what an operator, or an
        # automation on missing heartbeats, does), which also frees the deployment's
        # concurrency slot (limit 1) for the next run.
        assert client.read_flow_run(first.id).state.is_running()
        result = client.set_flow_run_state(first.id, Crashed(message="worker killed by the test"))
        assert result.status.value == "ACCEPT", result

        second = run_deployment(NIGHTLY, parameters=params, timeout=0)
        with _worker(server, tmp_path, run_once=True) as (worker, log):
            _wait_exit(worker, 180, log)
        final = client.read_flow_run(second.id)
        assert final.state.is_completed(), f"{final.state!r}\n{log_tail(log)}"
        tasks = _task_runs(client, second.id)
        # earlier stages: Prefect cache hits, nothing recomputed; training and evaluation ran
        assert {s: tasks[s].state.name for s in upstream} == {s: "Cached" for s in upstream}
        assert tasks["training"].state.name == "Completed" and tasks["evaluation"].state.name == "Completed"
    resumed = stage_manifests(cfg)
    after = {s: (resumed[s].stat().st_mtime_ns, resumed[s].read_bytes()) for s in upstream}
    assert after == before
    assert resumed["training"] is not None and resumed["evaluation"] is not None
