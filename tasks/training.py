from __future__ import annotations

from prefect import task

from rscaffold import pipeline
from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef
from tasks._common import publish_stage, stage_cache_key


@task(
    name="training",
    task_run_name="training[lambda={config.training.signal_loss_weight}]",
    cache_key_fn=stage_cache_key("training"),
    persist_result=True,
)
def training_task(config: PipelineConfig, fps: dict[str, str], dataset: dict, force: bool = False) -> dict:
    """Train the scaffolded student and the CoT-SFT baseline on the same rows."""
    ref = pipeline.run_training(config, fps, StageRef.from_dict(dataset), force=force)
    publish_stage(ref)
    return ref.to_dict()
