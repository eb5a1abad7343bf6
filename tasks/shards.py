"""One Prefect task per shard of the data-parallel stages (``run.task_runner: ray``).

Each task generates one shard of the teacher's traces, of the labels or of one model's answers
to a benchmark into the stage's work directory (``rscaffold.stages.<stage>.run_<stage>_shard``), with its own retries and cache key;
the stage's own task then finds every shard done, assembles them in their fixed order and
publishes the output, which is therefore the same as a sequential run's. A task returns where it
ran (process id, host) and what it did.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from rscaffold.config import PipelineConfig
from rscaffold.stages import evaluation as evaluation_stage
from rscaffold.stages import labeling as labeling_stage
from rscaffold.stages import teacher as teacher_stage
from rscaffold.store import StageRef


def shard_cache_key(stage: str):
    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        root = os.path.abspath(os.path.expanduser(params["config"].run.artifacts_dir))
        root_hash = hashlib.sha256(root.encode()).hexdigest()[:12]
        return f"rscaffold-{stage}-{params['fps'][stage]}-shard-{params['key']}-{root_hash}"

    key.__name__ = f"{stage}_shard_cache_key"
    return key


@task(
    name="teacher-shard", task_run_name="teacher[{key}]", cache_key_fn=shard_cache_key("teacher"), persist_result=True
)
def teacher_shard_task(config: PipelineConfig, fps: dict[str, str], problems: dict, *, key: str) -> dict:
    """Generate one shard of teacher traces."""
    return teacher_stage.run_teacher_shard(config, fps, StageRef.from_dict(problems), key=key)


@task(
    name="labeling-shard",
    task_run_name="labeling[{key}]",
    cache_key_fn=shard_cache_key("labeling"),
    persist_result=True,
)
def labeling_shard_task(config: PipelineConfig, fps: dict[str, str], teacher: dict, *, key: str) -> dict:
    """Label one shard of traces."""
    return labeling_stage.run_labeling_shard(config, fps, StageRef.from_dict(teacher), key=key)


@task(
    name="evaluation-shard",
    task_run_name="evaluation[{key}]",
    cache_key_fn=shard_cache_key("evaluation"),
    persist_result=True,
)
def evaluation_shard_task(
    config: PipelineConfig,
    fps: dict[str, str],
    *,
    problems: dict,
    training: dict,
    labeling: dict | None = None,
    key: str,
) -> dict:
    """Answer one shard of one benchmark with one model (``labeling`` is not needed here: the
    stage's own task compares the signals with the teacher's)."""
    return evaluation_stage.run_evaluation_shard(
        config, fps, problems=StageRef.from_dict(problems), training=StageRef.from_dict(training), key=key
    )


SHARD_TASKS = {"teacher": teacher_shard_task, "labeling": labeling_shard_task, "evaluation": evaluation_shard_task}


def shard_keys(stage: str, config: PipelineConfig, upstream: dict[str, dict]) -> list[str]:
    """The keys of ``stage``'s shards, from its upstream references."""
    if stage == "teacher":
        return teacher_stage.teacher_shards(config, StageRef.from_dict(upstream["problems"]))
    if stage == "evaluation":
        return evaluation_stage.evaluation_shards(config, StageRef.from_dict(upstream["problems"]))
    return labeling_stage.labeling_shards(config, StageRef.from_dict(upstream["teacher"]))
