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
    report = (Path(ref.path) / ref.outputs["quality_report"]).read_text()
    if "transitions_png" in ref.outputs and ref.outputs["transitions_png"] not in report:
        report += f"\n\n![signal transitions]({ref.outputs['transitions_png']})\n"
    publish_stage(ref, report=report)
    return ref.to_dict()
