from __future__ import annotations

from prefect import task
from rscaffold_tasks._common import publish_stage, run_stage, stage_cache_key
from rscaffold_tasks._launch import launch_training

from rscaffold.config import PipelineConfig
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
    """Train the scaffolded student and the CoT-SFT baseline on the same rows: here (in a child
    process), or with ``training.num_processes`` > 1 on that many processes under ``accelerate
    launch`` (:func:`rscaffold_tasks._launch.launch_training`)."""
    if config.training.num_processes > 1 or config.training.num_machines > 1:
        ref = launch_training(config, fps, force=force, fresh=fresh)
    else:
        ref = run_stage("training", config, fps=fps, dataset=StageRef.from_dict(dataset), force=force, fresh=fresh)
    publish_stage(ref)
    return ref.to_dict()
