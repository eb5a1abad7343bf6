from __future__ import annotations

from prefect import task
from rscaffold_tasks._common import publish_stage, run_stage, stage_cache_key

from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef


@task(name="dataset", task_run_name="dataset", cache_key_fn=stage_cache_key("dataset"), persist_result=True)
def dataset_task(
    config: PipelineConfig,
    fps: dict[str, str],
    *,
    teacher: dict,
    labeling: dict,
    force: bool = False,
    fresh: bool = False,
) -> dict:
    """Assemble the labeled-trace dataset (Parquet, splits, stats)."""
    ref = run_stage(
        "dataset",
        config,
        fps=fps,
        teacher=StageRef.from_dict(teacher),
        labeling=StageRef.from_dict(labeling),
        force=force,
        fresh=fresh,
    )
    publish_stage(ref)
    return ref.to_dict()
