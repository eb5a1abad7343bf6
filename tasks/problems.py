from __future__ import annotations

from prefect import task
from rscaffold_tasks._common import publish_stage, stage_cache_key

from rscaffold.config import PipelineConfig
from rscaffold.stages import problems as problems_stage


@task(
    name="problems",
    task_run_name="problems[{config.problems.format}]",
    cache_key_fn=stage_cache_key("problems"),
    persist_result=True,
)
def problems_task(config: PipelineConfig, fps: dict[str, str], *, force: bool = False, fresh: bool = False) -> dict:
    """Load the train/eval problems into a Parquet table."""
    ref = problems_stage.run_problems(config, fps, force=force, fresh=fresh)
    publish_stage(ref)
    return ref.to_dict()
