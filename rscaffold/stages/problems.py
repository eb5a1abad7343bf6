"""Stage 1, problems: the train and eval problems of the configured benchmark family, as one Parquet table."""

from __future__ import annotations

import time

from rscaffold.config import PipelineConfig
from rscaffold.records import ProblemRecord
from rscaffold.stages.common import (
    open_stage,
    source_digest,
    stage_code_version,
)
from rscaffold.stages.declare import Stage
from rscaffold.store import StageRef, fingerprint, read_records, write_records


def run_problems(cfg: PipelineConfig, fps: dict[str, str], *, force: bool = False, fresh: bool = False) -> StageRef:
    """Load the train and eval problems (``problems.*``) into ``problems.parquet``."""
    from rscaffold.evalsets.loaders import benchmark_for, load_problems

    with open_stage(cfg, "problems", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        p = cfg.problems
        bench = benchmark_for(p.format, p.custom)
        train = load_problems(p.train, benchmark=bench, split="train", limit=p.limit_train, seed=p.seed)
        evl = load_problems(p.eval, benchmark=bench, split="eval", limit=p.limit_eval, seed=p.seed)
        train = [r.model_copy(update={"split": "train"}) for r in train]
        evl = [r.model_copy(update={"split": "eval"}) for r in evl]
        write_records(sd.work / "problems.parquet", train + evl, ProblemRecord)
        return sd.finish(
            outputs={"problems": "problems.parquet"},
            config=p,
            inputs={"train": source_digest(p.train), "eval": source_digest(p.eval)},
            summary={"train": len(train), "eval": len(evl)},
            started=started,
            code=stage_code_version("problems"),
        )


def read_problems(ref: StageRef, split: str | None = None) -> list[ProblemRecord]:
    rows = read_records(ref.output("problems"), ProblemRecord)
    return [r for r in rows if split is None or r.split == split]


def train_part(cfg: PipelineConfig) -> str:
    """The fingerprint of the train part alone (the teacher reads only it)."""
    p = cfg.problems
    fmt = [p.format, p.custom]  # custom: its field mapping and answer type
    return fingerprint(
        "problems:train", *fmt, source_digest(p.train), p.limit_train, p.seed, stage_code_version("problems")
    )


def eval_part(cfg: PipelineConfig) -> str:
    """The fingerprint of the eval part alone (the evaluation reads it when no benchmark is configured)."""
    p = cfg.problems
    fmt = [p.format, p.custom]
    return fingerprint(
        "problems:eval", *fmt, source_digest(p.eval), p.limit_eval, p.seed, stage_code_version("problems")
    )


STAGE = Stage(
    name="problems",
    run=run_problems,
    description="Load the train/eval problems into a Parquet table.",
    fingerprint=lambda cfg, fps: [train_part(cfg), eval_part(cfg)],
    outputs=("problems",),
    run_name=lambda cfg: f"problems[{cfg.problems.format}]",
)
