"""The full rscaffold flow, and the flow that re-runs one stage (and optionally what follows).

Both take a pydantic ``PipelineConfig`` parameter, so the Prefect UI renders a form for it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from rscaffold_tasks.dataset import dataset_task
from rscaffold_tasks.evaluation import evaluation_task
from rscaffold_tasks.labeling import labeling_task
from rscaffold_tasks.problems import problems_task
from rscaffold_tasks.teacher import teacher_task
from rscaffold_tasks.training import training_task

from rscaffold.config import PipelineConfig
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.store import StageDir
from rscaffold.vocabulary import STAGES, StageName

TASKS = {
    "problems": problems_task,
    "teacher": teacher_task,
    "labeling": labeling_task,
    "dataset": dataset_task,
    "training": training_task,
    "evaluation": evaluation_task,
}


def expand_refresh(refresh: list[str] | set[str]) -> set[str]:
    """A refreshed stage forces every stage after it, since they consume its output."""
    if not refresh:
        return set()
    unknown = set(refresh) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
    first = min(STAGES.index(s) for s in refresh)
    return set(STAGES[first:])


def _configured(stage: str, config: PipelineConfig, fps: dict[str, str], *, forced: set[str]):
    """The stage task with retries from config; Prefect's cache is bypassed for a forced stage
    and for a stage whose output is missing, incomplete or damaged (a cached result would point
    at nothing, or at something the stage must recompute)."""
    sd = StageDir(config.run.artifacts_dir, stage, fps[stage])
    reusable = sd.is_complete() and not sd.verify()
    return TASKS[stage].with_options(
        retries=config.run.retries,
        retry_delay_seconds=config.run.retry_delay_s,
        refresh_cache=(stage in forced) or not reusable,
    )


def run_stages(
    config: PipelineConfig, refresh: set[str], *, until: str = "evaluation", fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Run the stages up to ``until``; the ``refresh`` stages (and those after them) recompute,
    starting from a clean work directory when ``fresh`` (else resuming their partial work)."""
    logger = get_run_logger()
    fps = plan_fingerprints(config)
    forced = expand_refresh(refresh)
    refs: dict[str, dict[str, Any]] = {}
    last = STAGES.index(until)

    def call(stage: str, **upstream: dict) -> dict:
        forced_here = stage in forced
        task = _configured(stage, config, fps, forced=forced)
        result = task(config, fps, force=forced_here, fresh=fresh and forced_here, **upstream)
        logger.info("stage %-10s %s -> %s", stage, result["fingerprint"], result["path"])
        return result

    refs["problems"] = call("problems")
    if last >= 1:
        refs["teacher"] = call("teacher", problems=refs["problems"])
    if last >= 2:
        refs["labeling"] = call("labeling", teacher=refs["teacher"])
    if last >= 3:
        refs["dataset"] = call("dataset", teacher=refs["teacher"], labeling=refs["labeling"])
    if last >= 4:
        refs["training"] = call("training", dataset=refs["dataset"])
    if last >= 5:
        refs["evaluation"] = call(
            "evaluation", problems=refs["problems"], training=refs["training"], labeling=refs["labeling"]
        )
    return refs


@flow(name="rscaffold-pipeline", flow_run_name="rscaffold-{config.problems.format}")
def rscaffold_pipeline(
    config: PipelineConfig, refresh: list[StageName] | None = None, fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Problems -> teacher traces -> signal labels -> dataset -> students -> evaluation.

    ``refresh``: stages to recompute even if cached (each also forces the stages after it); a
    recomputation resumes the partial work (shards, checkpoints) of an earlier attempt unless
    ``fresh``. LLM requests answered before come from the request cache either way
    (``config.run.request_cache``).
    """
    return run_stages(config, set(refresh or []), fresh=fresh)


@flow(name="rscaffold-stage", flow_run_name="rscaffold-stage-{stage}")
def rscaffold_stage(
    config: PipelineConfig, stage: StageName, downstream: bool = False, *, fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Re-run one stage against the existing upstream artifacts of ``config``.

    Upstream stages are taken from the cache/store (computed only if missing); ``downstream``
    also recomputes every stage after it. The stage resumes its partial work (e.g. the shards of
    a teacher run that failed) unless ``fresh``.
    """
    until = "evaluation" if downstream else stage
    return run_stages(config, {stage}, until=until, fresh=fresh)
