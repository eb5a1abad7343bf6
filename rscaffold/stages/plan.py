"""Every stage's fingerprint, derived from the config alone (upstream fingerprints chained).

A fingerprint is a hash of what decides a stage's output, and of nothing else:

* its config section's values without the execution settings (concurrency, timeouts, retries,
  batch and shard sizes, devices, failure thresholds: :func:`rscaffold.config.fingerprint_view`);
* the identity of what it reads: upstream fingerprints, and for the first stage the content digest
  of its input files. The teacher reads only the train problems, so it chains on the train part
  of the problems stage (``problems.limit_eval`` does not concern it); ``teacher.keep`` decides
  which traces go on, so it enters the labeling fingerprint, not the teacher's;
* its code version (:func:`rscaffold.stages.common.stage_code_version`, the import closure).

Each stage names these parts in its declaration (``STAGE.fingerprint`` in its module).

The Prefect tasks key their cache on it (plus the artifacts root) and the store names the stage's
directory after it, so both agree on what "the same work" is.
"""

from __future__ import annotations

from rscaffold.config import ConfigError, PipelineConfig, check_inputs_exist
from rscaffold.labeling.taxonomy import TaxonomyError, load_taxonomy
from rscaffold.stages.common import stage_dir
from rscaffold.stages.problems import check_problem_files
from rscaffold.stages.registry import DECLARED, stages_to_run
from rscaffold.store import StageRef, fingerprint


def plan_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """The fingerprint of every stage, in stage order: ``fingerprint(name, *parts)`` with the parts
    its declaration names (:attr:`rscaffold.stages.declare.Stage.fingerprint`)."""
    fps: dict[str, str] = {}
    for st in DECLARED:
        fps[st.name] = fingerprint(st.name, *st.fingerprint(cfg, fps))
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


def complete_outputs(
    cfg: PipelineConfig, fps: dict[str, str], *, until: str = "evaluation"
) -> dict[str, StageRef] | None:
    """The outputs a run up to ``until`` reads, by stage, when every one is published and intact
    (checked against its manifest, as a run checks it before reuse); None when one is missing,
    unfinished or damaged, so that a run has work to do."""
    refs: dict[str, StageRef] = {}
    for stage in stages_to_run(cfg, until):
        sd = stage_dir(cfg, stage, fps)
        if not sd.is_complete() or sd.verify():
            return None
        refs[stage] = sd.ref()
    return refs
