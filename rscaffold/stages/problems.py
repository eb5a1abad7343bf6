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
    """(benchmark, source) of everything evaluated: the benchmarks, else every problems eval file."""
    from rscaffold.evalsets.loaders import benchmark_for

    if cfg.evaluation.benchmarks:
        return [(benchmark_for(b.name, b.custom), b.source) for b in cfg.evaluation.benchmarks]
    return [(benchmark_for(s.format, s.custom), s.eval) for s in cfg.problems.sources() if s.eval is not None]


def training_part(cfg: PipelineConfig, source: Any = None) -> str:
    """The part of a training file that trains (``problems.part`` with ``auto`` resolved):
    ``train`` when the training file is also evaluated, so the two are disjoint by construction.
    ``source``: one :class:`~rscaffold.config.ProblemSource` (default: the single benchmark's)."""
    from rscaffold.evalsets.loaders import benchmark_for

    p = cfg.problems
    if p.part != "auto":
        return p.part
    src = source if source is not None else p.sources()[0]
    train_id = _source_id(benchmark_for(src.format, src.custom), src.train)
    evaluated = {_source_id(b, s) for b, s in _eval_sources(cfg)}
    if src.eval is not None:
        evaluated.add(_source_id(benchmark_for(src.format, src.custom), src.eval))
    return "train" if train_id in evaluated else "all"


def eval_split_part(cfg: PipelineConfig, source: Any = None) -> str:
    """The part of an eval file that is the eval split: ``heldout`` when it is the training
    file and training takes its part ``train``, else ``all``."""
    from rscaffold.evalsets.loaders import benchmark_for

    src = source if source is not None else cfg.problems.sources()[0]
    bench = benchmark_for(src.format, src.custom)
    same = src.eval is not None and _source_id(bench, src.train) == _source_id(bench, src.eval)
    return "heldout" if same and training_part(cfg, src) == "train" else "all"


def check_overlap(cfg: PipelineConfig, train: list[ProblemRecord], evl: list[ProblemRecord]) -> dict[str, Any]:
    """The overlap of the training problems with every evaluation benchmark (as evaluated: its part
    and limit), per benchmark. Raises :class:`ProblemOverlapError` under ``on_overlap: fail``."""
    from rscaffold.evalsets.loaders import benchmark_for, problem_benchmarks
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
        found = [
            find_overlap(train, name, [r for r in evl if r.source == name]) for name in problem_benchmarks(cfg.problems)
        ]
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
            + f". Training reads part {_parts(cfg)!r} of {', '.join(s.train for s in p.sources())}; evaluate a held-out part (a benchmark's "
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


def _parts(cfg: PipelineConfig) -> str | dict[str, str]:
    """The training part of the single benchmark, or of each benchmark of a mix."""
    if not cfg.problems.mix:
        return training_part(cfg)
    return {s.label: training_part(cfg, s) for s in cfg.problems.sources()}


def _load(cfg: PipelineConfig) -> tuple[list[ProblemRecord], list[ProblemRecord]]:
    """The train and eval problems of every benchmark of ``problems`` (their split set)."""
    from rscaffold.evalsets.loaders import benchmark_for, load_problems

    p = cfg.problems
    kw = {"seed": p.seed, "heldout_fraction": p.heldout_fraction}
    train: list[ProblemRecord] = []
    evl: list[ProblemRecord] = []
    for src in p.sources():
        bench = benchmark_for(src.format, src.custom)
        part, eval_part = training_part(cfg, src), eval_split_part(cfg, src)
        rows = load_problems(src.train, benchmark=bench, split="train", limit=src.limit_train, part=part, **kw)  # type: ignore[arg-type]
        train += [r.model_copy(update={"split": "train"}) for r in rows]
        if src.eval is not None:
            rows = load_problems(src.eval, benchmark=bench, split="eval", limit=src.limit_eval, part=eval_part, **kw)  # type: ignore[arg-type]
            evl += [r.model_copy(update={"split": "eval"}) for r in rows]
    for split, rows in (("train", train), ("eval", evl)):
        seen: set[str] = set()
        dup = [r.problem_id for r in rows if r.problem_id in seen or seen.add(r.problem_id)]
        if dup and p.mix:
            raise ConfigError(
                f"problems.mix: {len(dup)} {split} problem ids occur in more than one file (e.g. {dup[0]!r}); "
                "each benchmark's files must hold different problems"
            )
    return train, evl


def run_problems(cfg: PipelineConfig, fps: dict[str, str], *, force: bool = False, fresh: bool = False) -> StageRef:
    """Load the train and eval problems (``problems.*``, every benchmark of ``problems.mix``) into
    ``problems.parquet``, and the overlap of the training problems with every evaluation benchmark
    into ``overlap.json``."""
    with open_stage(cfg, "problems", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        p = cfg.problems
        train, evl = _load(cfg)
        part = _parts(cfg)
        eval_part = eval_split_part(cfg) if not p.mix else {s.label: eval_split_part(cfg, s) for s in p.sources()}
        overlap = check_overlap(cfg, train, evl)
        if not cfg.evaluation.benchmarks:  # the eval split is what is evaluated: drop the overlap here
            removed = {i for o in overlap.values() for i in o["eval_ids"]}
            evl = [r for r in evl if r.problem_id not in removed]
        write_records(sd.work / "problems.parquet", train + evl, ProblemRecord)
        write_json(
            sd.work / "overlap.json",
            {"on_overlap": p.on_overlap, "training_part": part, "eval_split_part": eval_part, "benchmarks": overlap},
        )
        if p.mix:
            inputs = {
                f"{k}.{i}": source_digest(v)
                for i, s in enumerate(p.sources())
                for k, v in (("train", s.train), ("eval", s.eval))
                if v is not None
            }
        else:
            inputs = {"train": source_digest(p.train), "eval": source_digest(p.eval)}
        return sd.finish(
            outputs={"problems": "problems.parquet", "overlap": "overlap.json"},
            config=p,
            inputs=inputs,
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
    """Read the local problem files (``problems.train`` / ``problems.eval``, or the mix's) as the
    stage will, so that a malformed, undecodable or empty one is a
    :class:`~rscaffold.config.ConfigError` naming ``file:line`` before any stage starts (hub
    sources are read by the stage)."""
    from rscaffold.evalsets.loaders import BenchmarkFormatError, benchmark_for, is_hub_source, load_problems

    p = cfg.problems
    for i, src in enumerate(p.sources()):
        bench = benchmark_for(src.format, src.custom)
        where = f"problems.mix.{i}." if p.mix else "problems."
        for key, source, split in (("train", src.train, "train"), ("eval", src.eval, "eval")):
            if source is None or is_hub_source(source):
                continue
            try:
                rows = load_problems(source, benchmark=bench, split=split, limit=None, seed=p.seed)
            except (BenchmarkFormatError, OSError) as err:
                raise ConfigError(f"{where}{key}: {err}") from None
            if not rows:
                raise ConfigError(f"{where}{key}: {source} holds no problems")


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


def _problem_inputs(cfg: PipelineConfig) -> tuple[list, list, list, list]:
    """What the problems' fingerprints read: (format, train files and limits, eval files and
    limits, training part); for a mix (``problems.mix``) every benchmark's."""
    p = cfg.problems
    if p.mix:
        srcs = p.sources()
        return (
            [[[s.format, s.custom] for s in srcs]],
            [[[source_digest(s.train), s.limit_train] for s in srcs]],
            [[[s.eval and source_digest(s.eval), s.limit_eval] for s in srcs]],
            [[training_part(cfg, s) for s in srcs], p.heldout_fraction],
        )
    fmt = [p.format, p.custom]  # custom: its field mapping and answer type
    return (
        fmt,
        [source_digest(p.train), p.limit_train],
        [source_digest(p.eval), p.limit_eval],
        [training_part(cfg), p.heldout_fraction],
    )


def train_part(cfg: PipelineConfig) -> str:
    """The fingerprint of the train part alone (the teacher reads only it). The training part
    follows the evaluated files (:func:`training_part`)."""
    fmt, train_in, _, part = _problem_inputs(cfg)
    return fingerprint("problems:train", *fmt, *train_in, cfg.problems.seed, *part, stage_code_version("problems"))


def eval_part(cfg: PipelineConfig) -> str:
    """The fingerprint of the eval part alone (the evaluation reads it when no benchmark is
    configured); the overlap check reads the evaluation benchmarks."""
    fmt, _, eval_in, part = _problem_inputs(cfg)
    return fingerprint(
        "problems:eval",
        *fmt,
        *eval_in,
        cfg.problems.seed,
        *part,
        cfg.problems.on_overlap,
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
    run_name=lambda cfg: f"problems[{cfg.problems.name}]",
)
