from __future__ import annotations

from prefect import task
from rscaffold_tasks._common import publish_stage, run_stage, stage_cache_key

from rscaffold.config import PipelineConfig


@task(
    name="problems",
    task_run_name="problems[{config.problems.format}]",
    cache_key_fn=stage_cache_key("problems"),
    persist_result=True,
)
def problems_task(config: PipelineConfig, fps: dict[str, str], *, force: bool = False, fresh: bool = False) -> dict:
    """Load the train/eval problems into a Parquet table."""
    ref = run_stage("problems", config, fps=fps, force=force, fresh=fresh)
    publish_stage(ref)
    return ref.to_dict()
