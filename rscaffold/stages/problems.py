"""Stage 1, problems: the train and eval problems of the configured benchmark family, as one Parquet
table, checked against every evaluation benchmark for problems that are also trained on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rscaffold.config import ConfigError, PipelineConfig
from rscaffold.records import ProblemRecord
from rscaffold.stages.common import (
    log,
    open_stage,
    source_digest,
    stage_code_version,
    write_json,
)
from rscaffold.stages.declare import Stage
from rscaffold.store import StageRef, fingerprint, read_records, write_records


class ProblemOverlapError(ValueError):
    """Evaluation problems that are also training problems (see ``problems.on_overlap``)."""


def _source_id(bench: Any, source: str) -> str:
    """What identifies a source file across benchmarks: its resolved path, or the hub string."""
    from rscaffold.evalsets.loaders import is_hub_source

    if is_hub_source(source):
        return source
    try:
        return str(Path(bench.resolve_path(source)).resolve())
    except FileNotFoundError:
        return source  # reported by the loader that reads it


def _eval_sources(cfg: PipelineConfig) -> list[tuple[Any, str]]:
    """(benchmark, source) of everything evaluated: the benchmarks, else problems.eval."""
    from rscaffold.evalsets.loaders import benchmark_for

    if cfg.evaluation.benchmarks:
        return [(benchmark_for(b.name, b.custom), b.source) for b in cfg.evaluation.benchmarks]
    p = cfg.problems
    return [(benchmark_for(p.format, p.custom), p.eval)]


def training_part(cfg: PipelineConfig) -> str:
    """The part of ``problems.train`` that trains (``problems.part`` with ``auto`` resolved):
    ``train`` when the training file is also evaluated, so the two are disjoint by construction."""
    from rscaffold.evalsets.loaders import benchmark_for

    p = cfg.problems
    if p.part != "auto":
        return p.part
    train_id = _source_id(benchmark_for(p.format, p.custom), p.train)
    evaluated = {_source_id(b, s) for b, s in _eval_sources(cfg)}
    evaluated.add(_source_id(benchmark_for(p.format, p.custom), p.eval))
    return "train" if train_id in evaluated else "all"


def eval_split_part(cfg: PipelineConfig) -> str:
    """The part of ``problems.eval`` that is the eval split: ``heldout`` when it is the training
    file and training takes its part ``train``, else ``all``."""
    from rscaffold.evalsets.loaders import benchmark_for

    p = cfg.problems
    bench = benchmark_for(p.format, p.custom)
    same = _source_id(bench, p.train) == _source_id(bench, p.eval)
    return "heldout" if same and training_part(cfg) == "train" else "all"


def check_overlap(cfg: PipelineConfig, train: list[ProblemRecord], evl: list[ProblemRecord]) -> dict[str, Any]:
    """The overlap of the training problems with every evaluation benchmark (as evaluated: its part
    and limit), per benchmark. Raises :class:`ProblemOverlapError` under ``on_overlap: fail``."""
    from rscaffold.evalsets.loaders import benchmark_for
    from rscaffold.evalsets.overlap import find_overlap

    p = cfg.problems
    if cfg.evaluation.benchmarks:
        found = []
        for b in cfg.evaluation.benchmarks:
            # loaded as the evaluation stage loads it (rscaffold.evaluation.suites), which this
            # stage does not import: its code version would then follow the evaluation's code
            bench = benchmark_for(b.name, b.custom)
            limit = b.limit if b.limit is not None else cfg.evaluation.limit
            rows = bench.load(b.source, "eval", limit, seed=b.seed, part=b.part, heldout_fraction=b.heldout_fraction)
            found.append(find_overlap(train, bench.name, rows))
    else:
        found = [find_overlap(train, benchmark_for(p.format, p.custom).name, evl)]
    hits = [o for o in found if o.count]
    if hits and p.on_overlap == "fail":
        lines = [
            f"{o.count} of {o.problems} problems of evaluation benchmark {o.benchmark!r} are also training problems "
            f"(e.g. {'; '.join(o.examples())})"
            for o in hits
        ]
        raise ProblemOverlapError(
            "training problems leak into the evaluation (same question once lower-cased and with punctuation "
            "and spacing normalised): "
            + " | ".join(lines)
            + f". Training reads part {training_part(cfg)!r} of {p.train}; evaluate a held-out part (a benchmark's "
            "part: heldout with the seed and heldout_fraction of problems), or set problems.on_overlap: remove to "
            "drop them from the evaluation"
        )
    emptied = [o for o in hits if o.count == o.problems]
    if emptied:
        raise ProblemOverlapError(
            "problems.on_overlap: remove would leave nothing to evaluate: "
            + "; ".join(f"all {o.problems} problems of evaluation benchmark {o.benchmark!r}" for o in emptied)
            + f" are training problems (training reads part {training_part(cfg)!r} of {p.train}); evaluate other "
            "problems or a held-out part (problems.part: train, or a benchmark's part: heldout)"
        )
    for o in hits:
        log.warning(
            "removed %d of %d problems of evaluation benchmark %r that are also training problems (e.g. %s)",
            o.count,
            o.problems,
            o.benchmark,
            "; ".join(o.examples()),
        )
    return {o.benchmark: o.as_dict() for o in found}


def run_problems(cfg: PipelineConfig, fps: dict[str, str], *, force: bool = False, fresh: bool = False) -> StageRef:
    """Load the train and eval problems (``problems.*``) into ``problems.parquet``, and the overlap
    of the training problems with every evaluation benchmark into ``overlap.json``."""
    from rscaffold.evalsets.loaders import benchmark_for, load_problems

    with open_stage(cfg, "problems", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        p = cfg.problems
        bench = benchmark_for(p.format, p.custom)
        part, eval_part = training_part(cfg), eval_split_part(cfg)
        kw = {"seed": p.seed, "heldout_fraction": p.heldout_fraction}
        train = load_problems(p.train, benchmark=bench, split="train", limit=p.limit_train, part=part, **kw)  # type: ignore[arg-type]
        evl = load_problems(p.eval, benchmark=bench, split="eval", limit=p.limit_eval, part=eval_part, **kw)  # type: ignore[arg-type]
        train = [r.model_copy(update={"split": "train"}) for r in train]
        evl = [r.model_copy(update={"split": "eval"}) for r in evl]
        overlap = check_overlap(cfg, train, evl)
        if not cfg.evaluation.benchmarks:  # the eval split is what is evaluated: drop the overlap here
            removed = {i for o in overlap.values() for i in o["eval_ids"]}
            evl = [r for r in evl if r.problem_id not in removed]
        write_records(sd.work / "problems.parquet", train + evl, ProblemRecord)
        write_json(
            sd.work / "overlap.json",
            {"on_overlap": p.on_overlap, "training_part": part, "eval_split_part": eval_part, "benchmarks": overlap},
        )
        return sd.finish(
            outputs={"problems": "problems.parquet", "overlap": "overlap.json"},
            config=p,
            inputs={"train": source_digest(p.train), "eval": source_digest(p.eval)},
            summary={
                "train": len(train),
                "eval": len(evl),
                "training_part": part,
                "overlap_removed": {k: v["overlapping"] for k, v in overlap.items()},
            },
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


def overlap_removed(ref: StageRef) -> dict[str, list[str]]:
    """Per evaluation benchmark, the problem ids the problems stage found trained on (removed from
    the evaluation under ``on_overlap: remove``; none otherwise, since the stage then fails)."""
    import json

    if "overlap" not in ref.outputs or not ref.output("overlap").exists():
        return {}
    data = json.loads(ref.output("overlap").read_text())
    return {k: list(v.get("eval_ids", [])) for k, v in data.get("benchmarks", {}).items()}


def _benchmarks_part(cfg: PipelineConfig) -> list[Any]:
    """What the overlap check reads of the evaluation benchmarks: each one and its data's digest."""
    from rscaffold.evalsets.loaders import benchmark_source_digest

    return [[b, benchmark_source_digest(b)] for b in cfg.evaluation.benchmarks]


def train_part(cfg: PipelineConfig) -> str:
    """The fingerprint of the train part alone (the teacher reads only it). The training part
    follows the evaluated files (:func:`training_part`)."""
    p = cfg.problems
    fmt = [p.format, p.custom]  # custom: its field mapping and answer type
    part = [training_part(cfg), p.heldout_fraction]
    return fingerprint(
        "problems:train", *fmt, source_digest(p.train), p.limit_train, p.seed, *part, stage_code_version("problems")
    )


def eval_part(cfg: PipelineConfig) -> str:
    """The fingerprint of the eval part alone (the evaluation reads it when no benchmark is
    configured); the overlap check reads the evaluation benchmarks."""
    p = cfg.problems
    fmt = [p.format, p.custom]
    part = [training_part(cfg), p.heldout_fraction]
    return fingerprint(
        "problems:eval",
        *fmt,
        source_digest(p.eval),
        p.limit_eval,
        p.seed,
        *part,
        p.on_overlap,
        _benchmarks_part(cfg),
        cfg.evaluation.limit,
        stage_code_version("problems"),
    )


STAGE = Stage(
    name="problems",
    run=run_problems,
    description="Load the train/eval problems into a Parquet table.",
    fingerprint=lambda cfg, fps: [train_part(cfg), eval_part(cfg)],
    outputs=("problems", "overlap"),
    run_name=lambda cfg: f"problems[{cfg.problems.format}]",
)
