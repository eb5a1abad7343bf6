"""Every stage's fingerprint, derived from the config alone (upstream fingerprints chained).

A fingerprint is a hash of what decides a stage's output: its config section, the fingerprints of
its inputs, the content of the files it reads, and its code version
(:func:`rscaffold.stages.common.stage_code_version`). The Prefect tasks use it as their cache key
and the store as the stage's directory name, so both agree on what "the same work" is.
"""

from __future__ import annotations

from rscaffold.config import PipelineConfig
from rscaffold.evaluation.suites import benchmark_source_digest
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.stages.common import source_digest, stage_code_version
from rscaffold.store import fingerprint
from rscaffold.vocabulary import STAGES


def plan_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """The fingerprint of every stage, in stage order."""
    fps: dict[str, str] = {}
    p = cfg.problems
    fps["problems"] = fingerprint(
        "problems", p, source_digest(p.train), source_digest(p.eval), stage_code_version("problems")
    )
    fps["teacher"] = fingerprint("teacher", fps["problems"], cfg.teacher, stage_code_version("teacher"))
    fps["labeling"] = fingerprint(
        "labeling",
        fps["teacher"],
        cfg.labeling.model_dump(exclude={"taxonomy"}),
        cfg.labeler_llm() if cfg.labeling.method == "llm" else None,
        load_taxonomy(cfg.labeling.taxonomy).digest(),
        stage_code_version("labeling"),
    )
    fps["dataset"] = fingerprint("dataset", fps["labeling"], cfg.dataset, stage_code_version("dataset"))
    fps["training"] = fingerprint("training", fps["dataset"], cfg.training, stage_code_version("training"))
    fps["evaluation"] = fingerprint(
        "evaluation",
        fps["training"],
        fps["problems"],
        cfg.evaluation,
        [benchmark_source_digest(b) for b in cfg.evaluation.benchmarks],
        stage_code_version("evaluation"),
    )
    assert tuple(fps) == STAGES
    return fps
