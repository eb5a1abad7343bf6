from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from rscaffold_tasks._common import publish_stage, run_stage, stage_cache_key

from rscaffold.config import PipelineConfig
from rscaffold.store import StageRef


def _run_name() -> str:
    """``evaluation[<benchmark>,...]``: the configured benchmarks, or the problems' format."""
    from prefect.runtime import task_run

    try:
        config = task_run.parameters["config"]
        names = [b.name for b in config.evaluation.benchmarks] or [config.problems.format]
    except Exception:  # a name is cosmetic; never fail the task over it
        return "evaluation"
    return f"evaluation[{','.join(names)}]"


@task(
    name="evaluation",
    task_run_name=_run_name,
    cache_key_fn=stage_cache_key("evaluation"),
    persist_result=True,
)
def evaluation_task(
    config: PipelineConfig,
    fps: dict[str, str],
    *,
    problems: dict,
    training: dict,
    labeling: dict | None = None,
    force: bool = False,
    fresh: bool = False,
) -> dict:
    """Answer the evaluation benchmarks with base, CoT-SFT and scaffolded students; score and report."""
    ref = run_stage(
        "evaluation",
        config,
        fps=fps,
        problems=StageRef.from_dict(problems),
        training=StageRef.from_dict(training),
        labeling=StageRef.from_dict(labeling) if labeling else None,
        force=force,
        fresh=fresh,
        progress=True,
    )
    create_table_artifact(
        ref.summary.get("accuracy_table") or ref.summary["table"],
        key="rscaffold-accuracy",
        description="accuracy (%) [95% bootstrap interval]: models x benchmarks",
    )
    publish_stage(ref, report=(Path(ref.path) / ref.outputs["report"]).read_text())
    return ref.to_dict()
