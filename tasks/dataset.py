from __future__ import annotations

from prefect import task

from rscaffold import pipeline
from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef
from tasks._common import publish_stage, stage_cache_key


@task(name="dataset", cache_key_fn=stage_cache_key("dataset"), persist_result=True)
def dataset_task(config: PipelineConfig, fps: dict[str, str], teacher: dict, labeling: dict, force: bool = False) -> dict:
    """Assemble the labeled-trace dataset (Parquet, splits, stats)."""
    ref = pipeline.run_dataset(config, fps, StageRef.from_dict(teacher), StageRef.from_dict(labeling), force=force)
    publish_stage(ref)
    return ref.to_dict()
