"""Serve the pipeline and stage flows with their schedules, without a work pool.

``prefect.serve`` registers the deployments with the Prefect server and keeps this process
polling for their runs (scheduled or started from the UI/CLI) and executing them. It is the
one-machine alternative to ``deployments/prefect.yaml`` + a work pool + a worker; ``rscaffold
serve`` calls :func:`serve_pipeline`.

A schedule needs a server whose scheduler service runs (``prefect server start``, or Prefect
Cloud): Prefect's temporary local server (what runs when ``PREFECT_API_URL`` is unset) does not
create scheduled runs and disappears with the process, so serving against it is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import serve
from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron
from prefect.settings import get_current_settings
from rscaffold_flows.pipeline import rscaffold_pipeline, rscaffold_stage

from rscaffold.config import PipelineConfig
from rscaffold.vocabulary import StageName

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CRON = "0 3 * * *"  # every night at 03:00
DEFAULT_TIMEZONE = "UTC"
# Distinct from the work-pool deployments of deployments/prefect.yaml ("nightly", "stage"), so the
# two ways of running can coexist on one server without overwriting each other.
PIPELINE_DEPLOYMENT = "nightly-served"
STAGE_DEPLOYMENT = "stage-served"


class ServeError(RuntimeError):
    """The flows cannot be served as asked (no server to serve against, a bad schedule)."""


def deployment_parameters(config: PipelineConfig) -> dict[str, Any]:
    """The ``config`` parameter of both flows: the validated config as JSON.

    ``run.artifacts_dir`` is made absolute against the current directory (where it is relative
    to for ``rscaffold run`` too), so served runs write where a run from here would.
    """
    data = config.model_dump(mode="json")
    data["run"]["artifacts_dir"] = str(config.run.artifacts_root)
    return {"config": data}


def check_cron(cron: str, timezone: str = DEFAULT_TIMEZONE) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError as e:
        errors = getattr(e, "errors", None)
        reason = "; ".join(str(x["msg"]) for x in errors()) if callable(errors) else str(e)
        raise ServeError(f"invalid schedule {cron!r} ({timezone}): {reason}") from None


def served_deployments(
    config: PipelineConfig,
    cron: str | None = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    *,
    stage: StageName = "evaluation",
) -> list[RunnerDeployment]:
    """The two deployments ``serve_pipeline`` serves.

    ``rscaffold-pipeline/nightly-served``: the full pipeline on ``cron`` (``None``/empty: no
    schedule, runs only when started). ``rscaffold-stage/stage-served``: one stage (``stage``
    by default; pass ``stage``/``downstream`` when starting a run), never scheduled.
    Entrypoints are module paths (``rscaffold_flows.pipeline.rscaffold_pipeline``), so runs do not depend
    on the directory the server process was started in.
    """
    params = deployment_parameters(config)
    schedules = []
    if cron:
        check_cron(cron, timezone)
        schedules = [Cron(cron, timezone=timezone)]
    pipeline = rscaffold_pipeline.to_deployment(
        name=PIPELINE_DEPLOYMENT,
        schedules=schedules,
        parameters={**params, "refresh": []},
        description="Full rscaffold pipeline (served by `rscaffold serve`).",
        tags=["rscaffold", "pipeline", "served"],
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    stage_deployment = rscaffold_stage.to_deployment(
        name=STAGE_DEPLOYMENT,
        parameters={**params, "stage": stage, "downstream": False},
        description="Re-run one rscaffold stage (served by `rscaffold serve`).",
        tags=["rscaffold", "stage", "served"],
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return [pipeline, stage_deployment]


def require_api_server() -> str:
    """The URL of the Prefect API to serve against; an error when there is none configured."""
    url = get_current_settings().api.url
    if not url:
        raise ServeError(
            "serving needs a running Prefect server: start one with `prefect server start` and "
            "set PREFECT_API_URL (e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api); "
            "the temporary server used otherwise runs no schedules"
        )
    return url


def serve_pipeline(
    config: PipelineConfig,
    cron: str | None = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    *,
    limit: int = 1,
) -> None:
    """Register both deployments and execute their runs in this process until interrupted.

    ``limit``: flow runs executed at the same time (1: one pipeline at a time on this machine).
    On shutdown (Ctrl-C, SIGTERM) both deployments are paused, so no scheduled run piles up while
    nothing serves them; serving again un-pauses them.
    """
    require_api_server()
    deployments = served_deployments(config, cron=cron, timezone=timezone)
    serve(*deployments, limit=limit)
