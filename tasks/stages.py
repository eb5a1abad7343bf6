"""The Prefect tasks of the pipeline, made from the stage declarations
(:mod:`rscaffold.stages.registry`): one task per stage (:data:`STAGE_TASKS`) and one per shard
function of the stages that fan out (:data:`SHARD_TASKS`, ``run.task_runner: ray``).

A stage task runs the stage's ``run`` function (in a child process when it loads a model, under
``accelerate launch`` when it is distributed), keyed on the stage's fingerprint and the artifacts
root, and publishes its outputs (and its declared report and summary table) as UI artifacts.

A shard task generates one shard of the teacher's traces, of the labels or of one model's answers
to a benchmark into the stage's work directory, with its own retries and cache key; the stage's own
task then finds every shard done, assembles them in their fixed order and publishes the output,
which is therefore the same as a sequential run's. A shard task returns where it ran (process id,
host) and what it did.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_table_artifact
from prefect.context import TaskRunContext
from rscaffold_tasks._common import publish_stage, root_hash, run_stage, stage_cache_key
from rscaffold_tasks._launch import launch_training

from rscaffold.config import PipelineConfig
from rscaffold.stages.declare import Stage, refs_for
from rscaffold.stages.registry import DECLARED
from rscaffold.store import StageRef


def _refs(upstream: dict[str, dict | None]) -> dict[str, StageRef | None]:
    return {k: StageRef.from_dict(v) if v else None for k, v in upstream.items()}


def _signature(decl: Stage, *, shard: bool) -> inspect.Signature:
    """``(config, fps, *, <upstream refs>, key | force, fresh)``: the parameters Prefect records."""
    P = inspect.Parameter
    params = [
        P("config", P.POSITIONAL_OR_KEYWORD, annotation=PipelineConfig),
        P("fps", P.POSITIONAL_OR_KEYWORD, annotation=dict[str, str]),
    ]
    for name in decl.upstream:
        if name in decl.optional:
            params.append(P(name, P.KEYWORD_ONLY, default=None, annotation=dict | None))
        else:
            params.append(P(name, P.KEYWORD_ONLY, annotation=dict))
    if shard:
        params.append(P("key", P.KEYWORD_ONLY, annotation=str))
    else:
        params += [
            P("force", P.KEYWORD_ONLY, default=False, annotation=bool),
            P("fresh", P.KEYWORD_ONLY, default=False, annotation=bool),
        ]
    return inspect.Signature(params, return_annotation=dict)


def _run_name(decl: Stage):
    """The task run's name from the declaration (from the run's ``config`` parameter)."""

    def name() -> str:
        from prefect.runtime import task_run

        try:
            return decl.run_name(task_run.parameters["config"])
        except Exception:  # a name is cosmetic; never fail the task over it
            return decl.name

    return name


def make_stage_task(decl: Stage) -> Task:
    """The Prefect task of one declared stage."""

    def run(config: PipelineConfig, fps: dict[str, str], *, force: bool = False, fresh: bool = False, **upstream):
        if decl.distributed(config):
            ref = launch_training(config, fps, force=force, fresh=fresh)
        else:
            ref = run_stage(
                decl.name,
                config,
                fps=fps,
                force=force,
                fresh=fresh,
                progress=decl.reports_progress,
                **_refs(upstream),
            )
        if decl.table is not None:
            rows = next((ref.summary[k] for k in decl.table.summary_keys if ref.summary.get(k)), None)
            if rows is not None:
                create_table_artifact(rows, key=decl.table.key, description=decl.table.description)
        report = (Path(ref.path) / ref.outputs[decl.report]).read_text() if decl.report else ""
        for name, rel in ref.outputs.items():  # the stage's pictures, shown with its report
            if report and str(rel).endswith(".png") and str(rel) not in report:
                report += f"\n\n![{name}]({rel})\n"
        publish_stage(ref, report=report)
        return ref.to_dict()

    run.__signature__ = _signature(decl, shard=False)
    run.__name__ = run.__qualname__ = f"{decl.name}_task"
    run.__doc__ = decl.description
    return task(
        run,
        name=decl.name,
        task_run_name=_run_name(decl) if decl.run_name else decl.name,
        cache_key_fn=stage_cache_key(decl.name),
        persist_result=True,
    )


def shard_cache_key(stage: str):
    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        return f"rscaffold-{stage}-{params['fps'][stage]}-shard-{params['key']}-{root_hash(params['config'])}"

    key.__name__ = f"{stage}_shard_cache_key"
    return key


def make_shard_task(decl: Stage) -> Task:
    """The Prefect task of one shard of a declared stage that fans out."""
    assert decl.shards is not None
    shard_run = decl.shards.run

    def run(config: PipelineConfig, fps: dict[str, str], *, key: str, **upstream):
        return shard_run(config, fps, key=key, **refs_for(shard_run, _refs(upstream)))

    run.__signature__ = _signature(decl, shard=True)
    run.__name__ = run.__qualname__ = f"{decl.name}_shard_task"
    run.__doc__ = (shard_run.__doc__ or "").split("\n")[0] or f"One shard of {decl.name}."
    return task(
        run,
        name=f"{decl.name}-shard",
        task_run_name=f"{decl.name}[{{key}}]",
        cache_key_fn=shard_cache_key(decl.name),
        persist_result=True,
    )


def shard_keys(stage: str, config: PipelineConfig, upstream: dict[str, dict | None]) -> list[str]:
    """The keys of ``stage``'s shards, from its upstream references."""
    keys = _BY_NAME[stage].shards.keys
    return keys(config, **refs_for(keys, _refs(upstream)))


_BY_NAME = {d.name: d for d in DECLARED}
STAGE_TASKS: dict[str, Task] = {d.name: make_stage_task(d) for d in DECLARED}
SHARD_TASKS: dict[str, Task] = {d.name: make_shard_task(d) for d in DECLARED if d.shards is not None}
