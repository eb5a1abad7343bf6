"""The pipeline's stages, in the order they run: each module's ``STAGE`` declaration
(:class:`rscaffold.stages.declare.Stage`).

A module of its own (importing every stage), so that importing one stage imports only what that
stage runs (a stage's code version is its import closure, see :mod:`rscaffold.code_version`).
"""

from __future__ import annotations

from collections.abc import Collection

from rscaffold.config import PipelineConfig
from rscaffold.stages import dataset, evaluation, labeling, problems, teacher, training
from rscaffold.stages.declare import Stage
from rscaffold.vocabulary import STAGES

DECLARED: tuple[Stage, ...] = (
    problems.STAGE,
    teacher.STAGE,
    labeling.STAGE,
    dataset.STAGE,
    training.STAGE,
    evaluation.STAGE,
)
BY_NAME: dict[str, Stage] = {s.name: s for s in DECLARED}

if tuple(BY_NAME) != STAGES:  # the vocabulary's StageName types flow parameters; they must agree
    raise RuntimeError(f"declared stages {list(BY_NAME)} differ from vocabulary.STAGES {list(STAGES)}")
for _s in DECLARED:
    _later = [u for u in _s.upstream if STAGES.index(u) >= STAGES.index(_s.name)]
    if _later:
        raise RuntimeError(f"stage {_s.name} reads {_later}, which do not run before it")


def stage(name: str) -> Stage:
    """The declaration of the stage ``name``."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGES)}") from None


def stages_to_run(cfg: PipelineConfig, until: str, also: Collection[str] = ()) -> list[str]:
    """The stages a run up to ``until`` computes, in order: ``until``, the ``also`` stages before
    it, and what they need upstream (:meth:`Stage.needed`), so that e.g. evaluating only the base
    student runs neither the teacher, nor labeling, nor training."""
    last = STAGES.index(stage(until).name)
    wanted = {until, *(s for s in also if STAGES.index(stage(s).name) <= last)}
    for name in reversed(STAGES[: last + 1]):
        if name in wanted:
            wanted.update(BY_NAME[name].needed(cfg))
    return [s for s in STAGES if s in wanted]
