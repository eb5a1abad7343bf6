"""Every stage's fingerprint, derived from the config alone (upstream fingerprints chained).

A fingerprint is a hash of what decides a stage's output, and of nothing else:

* its config section's values without the execution settings (concurrency, timeouts, retries,
  batch and shard sizes, devices, failure thresholds: :func:`rscaffold.config.fingerprint_view`);
* the identity of what it reads: upstream fingerprints, and for the first stage the content digest
  of its input files. The teacher reads only the train problems, so it chains on the train part
  of the problems stage (``problems.limit_eval`` does not concern it); ``teacher.keep`` decides
  which traces go on, so it enters the labeling fingerprint, not the teacher's;
* its code version (:func:`rscaffold.stages.common.stage_code_version`, the import closure).

The Prefect tasks key their cache on it (plus the artifacts root) and the store names the stage's
directory after it, so both agree on what "the same work" is.
"""

from __future__ import annotations

from rscaffold.config import ConfigError, PipelineConfig, check_inputs_exist, fingerprint_view
from rscaffold.evaluation.suites import benchmark_source_digest
from rscaffold.labeling.taxonomy import TaxonomyError, load_taxonomy
from rscaffold.stages.common import source_digest, stage_code_version
from rscaffold.stages.problems import check_problem_files, training_part
from rscaffold.store import fingerprint
from rscaffold.vocabulary import STAGES


def plan_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """The fingerprint of every stage, in stage order."""
    p = cfg.problems
    problems_code = stage_code_version("problems")
    fmt = [p.format, p.custom]  # custom: its field mapping and answer type
    # the training part follows the evaluated files; the overlap check reads the evaluation benchmarks
    part = [training_part(cfg), p.heldout_fraction]
    benchmarks = [[b, benchmark_source_digest(b)] for b in cfg.evaluation.benchmarks]
    train_in: list = [source_digest(p.train), p.limit_train]
    eval_in: list = [source_digest(p.eval), p.limit_eval]
    if p.mix:  # every benchmark of the mix: its format, files, limits and parts
        srcs = p.sources()
        fmt = [[[s.format, s.custom] for s in srcs]]
        part = [[training_part(cfg, s) for s in srcs], p.heldout_fraction]
        train_in = [[[source_digest(s.train), s.limit_train] for s in srcs]]
        eval_in = [[[s.eval and source_digest(s.eval), s.limit_eval] for s in srcs]]
    train_part = fingerprint("problems:train", *fmt, *train_in, p.seed, *part, problems_code)
    eval_part = fingerprint(
        "problems:eval",
        *fmt,
        *eval_in,
        p.seed,
        *part,
        p.on_overlap,
        benchmarks,
        cfg.evaluation.limit,
        problems_code,
    )
    teacher = fingerprint_view(cfg.teacher)
    keep = teacher.pop("keep")
    labeling = fingerprint_view(cfg.labeling)
    labeling.pop("taxonomy")  # a path: the taxonomy enters by its content digest
    labeling.pop("llm")  # None means "the teacher's": the effective labeler enters below

    fps: dict[str, str] = {}
    fps["problems"] = fingerprint("problems", train_part, eval_part)
    fps["teacher"] = fingerprint("teacher", train_part, teacher, stage_code_version("teacher"))
    fps["labeling"] = fingerprint(
        "labeling",
        fps["teacher"],
        keep,
        labeling,
        fingerprint_view(cfg.labeler_llm()) if cfg.labeling.method == "llm" else None,
        load_taxonomy(cfg.labeling.taxonomy).digest(),
        stage_code_version("labeling"),
    )
    # The dataset's statistics measure every student's examples in the student's tokens against max_length.
    t = cfg.training
    lengths = [t.tokenizer or t.student, t.student_gguf_file, t.students, t.max_length, t.truncation]
    fps["dataset"] = fingerprint(
        "dataset", fps["labeling"], fingerprint_view(cfg.dataset), lengths, stage_code_version("dataset")
    )
    fps["training"] = fingerprint(
        "training", fps["dataset"], fingerprint_view(cfg.training), stage_code_version("training")
    )
    fps["evaluation"] = fingerprint(
        "evaluation",
        fps["training"],
        eval_part if not cfg.evaluation.benchmarks else p.on_overlap,
        fingerprint_view(cfg.evaluation),
        [benchmark_source_digest(b) for b in cfg.evaluation.benchmarks],
        stage_code_version("evaluation"),
    )
    assert tuple(fps) == STAGES
    return fps


def preflight(cfg: PipelineConfig) -> dict[str, str]:
    """Everything that can be checked before any stage starts: the input files exist, the
    taxonomy is valid, every fingerprint can be computed. Returns the fingerprints; raises
    :class:`~rscaffold.config.ConfigError` naming what is wrong."""
    check_inputs_exist(cfg)
    check_problem_files(cfg)
    try:
        load_taxonomy(cfg.labeling.taxonomy)
    except TaxonomyError as err:
        raise ConfigError(f"labeling.taxonomy: {err}") from None
    t = cfg.training
    if t.args or t.report_to or t.load_in_4bit:  # checked against the installed trainer (imports it)
        from rscaffold.training.trainer import check_training_settings

        try:
            check_training_settings(t)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    try:
        return plan_fingerprints(cfg)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot plan the stages: {err}") from None
