"""The full rscaffold flow, and the flow that re-runs one stage (and optionally what follows).

Both take a pydantic ``PipelineConfig`` parameter, so the Prefect UI renders a form for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from rscaffold_tasks.stages import SHARD_TASKS, STAGE_TASKS, shard_keys

from rscaffold.config import PipelineConfig
from rscaffold.stages import registry
from rscaffold.stages.common import stage_dir
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.vocabulary import STAGES, StageName


def expand_refresh(refresh: list[str] | set[str]) -> set[str]:
    """A refreshed stage forces every stage after it, since they consume its output."""
    if not refresh:
        return set()
    unknown = set(refresh) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
    first = min(STAGES.index(s) for s in refresh)
    return set(STAGES[first:])


def _configured(stage: str, config: PipelineConfig, fps: dict[str, str], *, forced: set[str]):
    """The stage task with retries from config; Prefect's cache is bypassed for a forced stage
    and for a stage whose output is missing, incomplete or damaged (a cached result would point
    at nothing, or at something the stage must recompute)."""
    sd = stage_dir(config, stage, fps)
    reusable = sd.is_complete() and not sd.verify()
    return STAGE_TASKS[stage].with_options(
        retries=config.run.retries,
        retry_delay_seconds=config.run.retry_delay_s,
        refresh_cache=(stage in forced) or not reusable,
    )


def ray_task_runner(config: PipelineConfig):
    """prefect-ray's task runner for ``run.ray`` (an optional dependency: ``rscaffold[ray]``)."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RuntimeError("run.task_runner 'ray' needs prefect-ray: pip install 'rscaffold[ray]'") from None
    r = config.run.ray
    init = {"include_dashboard": False, **r.init_kwargs}
    return RayTaskRunner(address=r.address, init_kwargs=init)


@flow(name="rscaffold-shards", flow_run_name="{stage}-shards")
def run_shards(
    stage: str,
    config: PipelineConfig,
    fps: dict[str, str],
    *,
    upstream: dict[str, dict],
    keys: list[str],
    force: bool = False,
) -> list[dict]:
    """One task per shard of ``stage`` on this flow's task runner (Ray), with the stage's retries;
    returns what each did and where (process id, host). Fails if a shard still fails after its
    retries (the shards that finished are kept)."""
    from prefect_ray.context import remote_options

    task = SHARD_TASKS[stage].with_options(
        retries=config.run.retries, retry_delay_seconds=config.run.retry_delay_s, refresh_cache=force
    )
    r = config.run.ray
    # max_calls=0: the worker is reused for the next shard. Ray makes a worker of a task that
    # takes GPUs exit after one call by default (max_calls=1), which would load the model (start
    # the engine, the server) once per shard; the worker keeps it instead (rscaffold.process_cache).
    with remote_options(
        num_cpus=r.cpus_per_shard, num_gpus=r.gpus_per_shard, resources=r.resources_per_shard, max_calls=0
    ):
        futures = [task.submit(config, fps, key=key, **upstream) for key in keys]
    return [f.result() for f in futures]


def fan_out(
    stage: str, config: PipelineConfig, fps: dict[str, str], *, upstream: dict[str, dict], force: bool = False
) -> list[dict] | None:
    """With ``run.task_runner: ray``, generate ``stage``'s shards as tasks on the Ray cluster (the
    stage's own task then assembles them); nothing for other stages, or when the output exists
    and is not being recomputed."""
    if config.run.task_runner != "ray" or stage not in SHARD_TASKS:
        return None
    sd = stage_dir(config, stage, fps)
    if not force and sd.is_complete() and not sd.verify():
        return None
    keys = shard_keys(stage, config, upstream)
    runner = ray_task_runner(config)
    return run_shards.with_options(task_runner=runner)(stage, config, fps, upstream=upstream, keys=keys, force=force)


@contextlib.contextmanager
def ray_session(config: PipelineConfig) -> Iterator[None]:
    """One Ray connection for the whole run (``run.task_runner: ray``): the shard flows' task
    runners find it initialized and share it, instead of starting a local cluster per stage."""
    if config.run.task_runner != "ray":
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    r = config.run.ray
    ray.init(address=r.address, **{"include_dashboard": False, "namespace": "prefect", **r.init_kwargs})
    try:
        yield
    finally:
        ray.shutdown()


def run_stages(
    config: PipelineConfig, refresh: set[str], *, until: str = "evaluation", fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Run the stages up to ``until`` that it needs (and the ``refresh`` stages before it): each
    stage's declaration names what it needs upstream for this config (evaluating only the base
    student needs no teacher, labels or training). The ``refresh`` stages (and those after them)
    recompute, starting from a clean work directory when ``fresh`` (else resuming their partial
    work). Returns the references of the stages that ran, by stage name."""
    logger = get_run_logger()
    fps = plan_fingerprints(config)
    forced = expand_refresh(refresh)
    refs: dict[str, dict[str, Any]] = {}

    def call(stage: str, **upstream: dict) -> dict:
        forced_here = stage in forced
        fresh_here = fresh and forced_here
        if fresh_here and config.run.task_runner == "ray" and stage in SHARD_TASKS:
            # the clean start must come before the shards are made, not after
            stage_dir(config, stage, fps).prepare(fresh=True)
            fresh_here = False
        shards = fan_out(stage, config, fps, upstream=upstream, force=forced_here)
        task = _configured(stage, config, fps, forced=forced)
        result = task(config, fps, force=forced_here, fresh=fresh_here, **upstream)
        if shards is not None:
            result = {**result, "shards": shards}
        logger.info("stage %-10s %s -> %s", stage, result["fingerprint"], result["path"])
        return result

    with ray_session(config):
        for stage in registry.stages_to_run(config, until, also=refresh):
            refs[stage] = call(stage, **{u: refs[u] for u in registry.stage(stage).needed(config)})
    return refs


def _run_name(prefix: str, stage: str = "evaluation") -> str:
    """``<prefix>-<problem set>-<short fingerprint of stage>-<UTC date and time>``, so that two runs
    of different configs or days are told apart in the UI."""
    import datetime

    from prefect.runtime import flow_run

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    try:
        from rscaffold.stages.plan import plan_fingerprints

        params = flow_run.parameters
        cfg = params["config"]
        cfg = cfg if isinstance(cfg, PipelineConfig) else PipelineConfig.model_validate(cfg)
        stage = params.get("stage", stage)
        return f"{prefix}-{cfg.problems.name}-{plan_fingerprints(cfg)[stage][:8]}-{stamp}"
    except Exception:  # a name is cosmetic; never fail the run over it
        return f"{prefix}-{stamp}"


def _pipeline_run_name() -> str:
    return _run_name("rscaffold")


def _stage_run_name() -> str:
    from prefect.runtime import flow_run

    return _run_name(f"rscaffold-stage-{flow_run.parameters.get('stage', '')}")


@flow(name="rscaffold-pipeline", flow_run_name=_pipeline_run_name)
def rscaffold_pipeline(
    config: PipelineConfig, refresh: list[StageName] | None = None, fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Problems -> teacher traces -> signal labels -> dataset -> students -> evaluation.

    ``refresh``: stages to recompute even if cached (each also forces the stages after it); a
    recomputation resumes the partial work (shards, checkpoints) of an earlier attempt unless
    ``fresh``. LLM requests answered before come from the request cache either way
    (``config.run.request_cache``).
    """
    return run_stages(config, set(refresh or []), fresh=fresh)


@flow(name="rscaffold-stage", flow_run_name=_stage_run_name)
def rscaffold_stage(
    config: PipelineConfig, stage: StageName, downstream: bool = False, *, fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Re-run one stage against the existing upstream artifacts of ``config``.

    Upstream stages are taken from the cache/store (computed only if missing); ``downstream``
    also recomputes every stage after it. The stage resumes its partial work (e.g. the shards of
    a teacher run that failed) unless ``fresh``.
    """
    until = "evaluation" if downstream else stage
    return run_stages(config, {stage}, until=until, fresh=fresh)
