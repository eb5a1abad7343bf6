from __future__ import annotations

from prefect import task

from rscaffold import pipeline
from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef
from tasks._common import ProgressReporter, publish_stage, stage_cache_key


@task(
    name="labeling",
    task_run_name="labeling[{config.labeling.method}]",
    cache_key_fn=stage_cache_key("labeling"),
    persist_result=True,
)
def labeling_task(config: PipelineConfig, fps: dict[str, str], teacher: dict, force: bool = False) -> dict:
    """Split traces into steps and label each step with a semantic signal."""
    ref = pipeline.run_labeling(config, fps, StageRef.from_dict(teacher), force=force, progress=ProgressReporter("labeling"))
    from pathlib import Path

    publish_stage(ref, extra_markdown=(Path(ref.path) / ref.outputs["quality_report"]).read_text())
    return ref.to_dict()
