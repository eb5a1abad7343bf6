from __future__ import annotations

from prefect import task
from rscaffold_tasks._common import publish_stage, stage_cache_key

from rscaffold.config import PipelineConfig
from rscaffold.stages import training as training_stage
from rscaffold.store import StageRef


@task(
    name="training",
    task_run_name="training[lambda={config.training.signal_loss_weight}]",
    cache_key_fn=stage_cache_key("training"),
    persist_result=True,
)
def training_task(
    config: PipelineConfig, fps: dict[str, str], dataset: dict, *, force: bool = False, fresh: bool = False
) -> dict:
    """Train the scaffolded student and the CoT-SFT baseline on the same rows."""
    ref = training_stage.run_training(config, fps, StageRef.from_dict(dataset), force=force, fresh=fresh)
    publish_stage(ref)
    return ref.to_dict()
