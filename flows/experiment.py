"""The experiment flow: every cell of an experiment's grid through the pipeline's stages, then one
report over all of them (see :mod:`rscaffold.experiment`).

Each cell is a subflow running :func:`rscaffold_flows.pipeline.run_stages` on the cell's config.
The cells share one artifacts directory, so a stage another cell has computed with the same
fingerprint (the teacher, labeling and dataset when only training settings vary) is a cache hit,
and a student another cell has trained is taken from the student store. A cell that fails fails
alone: the others run, the report covers those that finished, and the flow then fails naming the
failed cells; running it again computes only what is missing.

With ``run.task_runner: ray`` the cells run in parallel: the stages up to the dataset first run
here once per distinct dataset (their shards fanned out over the cluster as in a single run), then
every cell is one Prefect task on the cluster (``run.ray.gpus_per_cell`` GPUs each), retried alone
(``run.retries``). Two cells that need one baseline student do not both train it: the first holds
the student store's lock while it trains, the other waits and takes the stored model.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from rscaffold_flows.pipeline import ray_session, ray_task_runner, run_stages

from rscaffold.config import PipelineConfig
from rscaffold.experiment.grid import Experiment, load_experiment_file
from rscaffold.experiment.report import main_table, write_experiment_report


class ExperimentCellsFailedError(RuntimeError):
    """Some cells of the experiment failed (the others finished and are in the report)."""


@flow(name="rscaffold-cell", flow_run_name="cell-{cell_id}")
def rscaffold_cell(config: PipelineConfig, cell_id: str) -> dict[str, dict[str, Any]]:
    """One cell of an experiment: the pipeline's stages on its config."""
    return run_stages(config, set())


@task(name="rscaffold-cell", task_run_name="cell-{cell_id}")
def rscaffold_cell_task(config: PipelineConfig, cell_id: str) -> dict[str, Any]:
    """One cell of an experiment as a task on a Ray worker: the pipeline's stages on its config,
    in that worker (the cell is the unit of parallelism: its stages are not fanned out again)."""
    local = config.model_copy(update={"run": config.run.model_copy(update={"task_runner": "local"})})
    return {"stages": run_stages(local, set()), "pid": os.getpid(), "host": socket.gethostname()}


def gpus_per_cell(config: PipelineConfig) -> float:
    """The GPUs Ray reserves for one cell: ``run.ray.gpus_per_cell``, else
    ``training.num_processes`` on a cluster with GPUs and 0 on one without (needs Ray initialized)."""
    if config.run.ray.gpus_per_cell is not None:
        return config.run.ray.gpus_per_cell
    import ray

    return float(config.training.num_processes) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


@flow(name="rscaffold-cells", flow_run_name="cells")
def run_cells(configs: dict[str, PipelineConfig]) -> dict[str, dict[str, Any]]:
    """Every cell as one task on this flow's task runner (Ray), each with its config's retries;
    per cell ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": ...}`` (a failed cell does
    not stop the others, nor this flow)."""
    from prefect_ray.context import remote_options

    futures = {}
    for cell_id, cfg in configs.items():
        task_ = rscaffold_cell_task.with_options(retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_s)
        with remote_options(num_cpus=cfg.run.ray.cpus_per_shard, num_gpus=gpus_per_cell(cfg)):
            futures[cell_id] = task_.submit(cfg, cell_id)
    out: dict[str, dict[str, Any]] = {}
    for cell_id, future in futures.items():
        future.wait()
        state = future.state
        if state.is_completed():
            out[cell_id] = {"ok": True, "result": state.result()}
        else:
            out[cell_id] = {"ok": False, "error": state.message or state.name}
    return out


def _run_parallel(experiment: Experiment, logger: Any) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """The cells on the Ray cluster: the shared stages first (once per dataset), then the cells in
    parallel. Returns (evaluations, failed, where each finished cell ran)."""
    from rscaffold.stages.plan import plan_fingerprints

    evaluations: dict[str, str] = {}
    failed: dict[str, str] = {}
    where: dict[str, Any] = {}
    first = experiment.cells[0].config
    with ray_session(first):
        upstream_failed: dict[str, str] = {}
        pending = {}
        for cell in experiment.cells:
            dataset = plan_fingerprints(cell.config)["dataset"]
            if dataset not in upstream_failed and dataset not in {d for d, _ in pending.values()}:
                try:
                    run_stages(cell.config, set(), until="dataset")
                except Exception as err:  # the cells of this dataset fail; the others go on
                    upstream_failed[dataset] = f"{type(err).__name__}: {err}"
            if dataset in upstream_failed:
                failed[cell.id] = upstream_failed[dataset]
                logger.error("cell %s failed: %s", cell.id, failed[cell.id])
            else:
                pending[cell.id] = (dataset, cell.config)
        if pending:
            logger.info("running %d cell(s) in parallel on the Ray cluster", len(pending))
            runner = ray_task_runner(first)
            results = run_cells.with_options(task_runner=runner)({k: cfg for k, (_, cfg) in pending.items()})
            for cell_id, r in results.items():
                if r["ok"]:
                    evaluations[cell_id] = r["result"]["stages"]["evaluation"]["path"]
                    where[cell_id] = {"pid": r["result"]["pid"], "host": r["result"]["host"]}
                else:
                    failed[cell_id] = r["error"]
                    logger.error("cell %s failed: %s", cell_id, failed[cell_id])
    return evaluations, failed, where


def run_experiment(experiment: Experiment) -> dict[str, Any]:
    """Run every cell (one after another; in parallel on a Ray cluster with ``run.task_runner:
    ray``), write the report; returns the report's files, each cell's evaluation directory, the
    failed cells (cell id -> error) and, for cells run on Ray, where each ran (pid, host)."""
    logger = get_run_logger()
    evaluations: dict[str, str] = {}
    failed: dict[str, str] = {}
    where: dict[str, Any] = {}
    parallel = bool(experiment.cells) and all(c.config.run.task_runner == "ray" for c in experiment.cells)
    if parallel:
        evaluations, failed, where = _run_parallel(experiment, logger)
    else:
        for k, cell in enumerate(experiment.cells, 1):
            logger.info("cell %d/%d: %s", k, len(experiment.cells), cell.id)
            state = rscaffold_cell(cell.config, cell.id, return_state=True)
            if state.is_completed():
                evaluations[cell.id] = state.result()["evaluation"]["path"]
            else:
                failed[cell.id] = state.message or state.name
                logger.error("cell %s failed: %s", cell.id, failed[cell.id])
    evaluations = {c.id: evaluations[c.id] for c in experiment.cells if c.id in evaluations}  # grid order
    files: dict[str, str] = {}
    if evaluations:
        paths = write_experiment_report(experiment, evaluations)
        files = {k: str(v) for k, v in paths.items()}
        logger.info("experiment report: %s", files["report"])
        _publish(experiment, paths)
    return {"files": files, "evaluations": evaluations, "failed": failed, "cells_ran_at": where}


def _publish(experiment: Experiment, paths: dict[str, Any]) -> None:
    import polars as pl

    key = re.sub(r"[^a-z0-9-]+", "-", f"rscaffold-experiment-{experiment.name}".lower()).strip("-")
    text = paths["report"].read_text()
    create_markdown_artifact(text[:60000], key=key, description=f"experiment {experiment.name}")
    headers, rows = main_table(pl.read_parquet(paths["summary"]))
    create_table_artifact(
        [dict(zip(headers, r, strict=True)) for r in rows],
        key=f"{key}-table",
        description=f"experiment {experiment.name}: accuracy and paired difference to the reference",
    )


@flow(name="rscaffold-experiment", flow_run_name="experiment-{experiment_file}")
def rscaffold_experiment(experiment_file: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment of ``experiment_file`` (a grid of pipeline configs; ``overrides``:
    ``KEY=VALUE`` settings of every cell, as ``--set``) and write its report under
    ``<artifacts_dir>/experiments/<name>/``. Fails after the other cells when a cell fails."""
    experiment = load_experiment_file(experiment_file, overrides or [])
    out = run_experiment(experiment)
    if out["failed"]:
        raise ExperimentCellsFailedError(
            f"{len(out['failed'])} of {len(experiment.cells)} cell(s) failed: "
            + "; ".join(f"{c}: {m}" for c, m in out["failed"].items())
            + (f" (report of the others: {out['files']['report']})" if out["files"] else "")
        )
    return out
