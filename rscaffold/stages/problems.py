"""Stage 1, problems: the train and eval problems of the configured benchmark family, as one Parquet table."""

from __future__ import annotations

import time

from rscaffold.config import ConfigError, PipelineConfig
from rscaffold.records import ProblemRecord
from rscaffold.stages.common import (
    open_stage,
    source_digest,
    stage_code_version,
)
from rscaffold.store import StageRef, read_records, write_records


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


def check_problem_files(cfg: PipelineConfig) -> None:
    """Read the local problem files (``problems.train`` / ``problems.eval``) as the stage will, so
    that a malformed, undecodable or empty one is a :class:`~rscaffold.config.ConfigError` naming
    ``file:line`` before any stage starts (hub sources are read by the stage)."""
    from rscaffold.evalsets.loaders import BenchmarkFormatError, benchmark_for, is_hub_source, load_problems

    p = cfg.problems
    bench = benchmark_for(p.format, p.custom)
    for key, source, split in (("train", p.train, "train"), ("eval", p.eval, "eval")):
        if is_hub_source(source):
            continue
        try:
            rows = load_problems(source, benchmark=bench, split=split, limit=None, seed=p.seed)
        except (BenchmarkFormatError, OSError) as err:
            raise ConfigError(f"problems.{key}: {err}") from None
        if not rows:
            raise ConfigError(f"problems.{key}: {source} holds no problems")


def read_problems(ref: StageRef, split: str | None = None) -> list[ProblemRecord]:
    rows = read_records(ref.output("problems"), ProblemRecord)
    return [r for r in rows if split is None or r.split == split]
