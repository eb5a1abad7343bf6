from __future__ import annotations

from pathlib import Path

from prefect import task
from rscaffold_tasks._common import publish_stage, run_stage, stage_cache_key

from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef


@task(
    name="labeling",
    task_run_name="labeling[{config.labeling.method}]",
    cache_key_fn=stage_cache_key("labeling"),
    persist_result=True,
)
def labeling_task(
    config: PipelineConfig, fps: dict[str, str], teacher: dict, *, force: bool = False, fresh: bool = False
) -> dict:
    """Split traces into steps and label each step with a semantic signal."""
    ref = run_stage(
        "labeling", config, fps=fps, teacher=StageRef.from_dict(teacher), force=force, fresh=fresh, progress=True
    )
    publish_stage(ref, extra_markdown=(Path(ref.path) / ref.outputs["quality_report"]).read_text())
    return ref.to_dict()
