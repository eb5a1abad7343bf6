from __future__ import annotations

from prefect import task
from rscaffold_tasks._common import publish_stage, run_stage, stage_cache_key

from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef


@task(
    name="teacher",
    task_run_name="teacher[{config.teacher.llm.backend}]",
    cache_key_fn=stage_cache_key("teacher"),
    persist_result=True,
)
def teacher_task(
    config: PipelineConfig, fps: dict[str, str], problems: dict, *, force: bool = False, fresh: bool = False
) -> dict:
    """Generate teacher traces (sharded, resumable)."""
    ref = run_stage(
        "teacher", config, fps=fps, problems=StageRef.from_dict(problems), force=force, fresh=fresh, progress=True
    )
    publish_stage(ref)
    return ref.to_dict()
