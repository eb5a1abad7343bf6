from __future__ import annotations

from prefect import task
from rscaffold_tasks._common import ProgressReporter, publish_stage, stage_cache_key

from rscaffold.config import PipelineConfig
from rscaffold.stages import teacher as teacher_stage
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
    ref = teacher_stage.run_teacher(
        config, fps, StageRef.from_dict(problems), force=force, fresh=fresh, progress=ProgressReporter("teacher")
    )
    publish_stage(ref)
    return ref.to_dict()
