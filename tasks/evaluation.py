from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from rscaffold import pipeline
from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef
from tasks._common import ProgressReporter, publish_stage, stage_cache_key


@task(
    name="evaluation",
    task_run_name="evaluation[{config.problems.format}]",
    cache_key_fn=stage_cache_key("evaluation"),
    persist_result=True,
)
def evaluation_task(config: PipelineConfig, fps: dict[str, str], problems: dict, training: dict, force: bool = False) -> dict:
    """Answer the eval problems with base, CoT-SFT and scaffolded students; score them."""
    ref = pipeline.run_evaluation(
        config, fps, StageRef.from_dict(problems), StageRef.from_dict(training), force=force, progress=ProgressReporter("evaluation")
    )
    create_table_artifact(ref.summary["table"], key="rscaffold-accuracy", description="accuracy per model and benchmark")
    publish_stage(ref)
    return ref.to_dict()
