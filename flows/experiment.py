"""The experiment flow: every cell of an experiment's grid through the pipeline's stages, then one
report over all of them (see :mod:`rscaffold.experiment`).

Each cell is a subflow running :func:`rscaffold_flows.pipeline.run_stages` on the cell's config.
The cells share one artifacts directory, so a stage another cell has computed with the same
fingerprint (the teacher, labeling and dataset when only training settings vary) is a cache hit,
and a student another cell has trained is taken from the student store. A cell that fails fails
alone: the others run, the report covers those that finished, and the flow then fails naming the
failed cells; running it again computes only what is missing.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from rscaffold_flows.pipeline import run_stages

from rscaffold.config import PipelineConfig
from rscaffold.experiment.grid import Experiment, load_experiment_file
from rscaffold.experiment.report import main_table, write_experiment_report


class ExperimentCellsFailedError(RuntimeError):
    """Some cells of the experiment failed (the others finished and are in the report)."""


@flow(name="rscaffold-cell", flow_run_name="cell-{cell_id}")
def rscaffold_cell(config: PipelineConfig, cell_id: str) -> dict[str, dict[str, Any]]:
    """One cell of an experiment: the pipeline's stages on its config."""
    return run_stages(config, set())


def run_experiment(experiment: Experiment) -> dict[str, Any]:
    """Run every cell (one after another), write the report; returns the report's files, each
    cell's evaluation directory and the failed cells (cell id -> error)."""
    logger = get_run_logger()
    evaluations: dict[str, str] = {}
    failed: dict[str, str] = {}
    for k, cell in enumerate(experiment.cells, 1):
        logger.info("cell %d/%d: %s", k, len(experiment.cells), cell.id)
        state = rscaffold_cell(cell.config, cell.id, return_state=True)
        if state.is_completed():
            evaluations[cell.id] = state.result()["evaluation"]["path"]
        else:
            failed[cell.id] = state.message or state.name
            logger.error("cell %s failed: %s", cell.id, failed[cell.id])
    files: dict[str, str] = {}
    if evaluations:
        paths = write_experiment_report(experiment, evaluations)
        files = {k: str(v) for k, v in paths.items()}
        logger.info("experiment report: %s", files["report"])
        _publish(experiment, paths)
    return {"files": files, "evaluations": evaluations, "failed": failed}


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
