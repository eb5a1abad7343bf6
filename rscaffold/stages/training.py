"""Stage 5, training: the students of ``training.students`` (the scaffolded student and the
short-CoT and long-thinking CoT-SFT baselines), trained on the same rows (see
:mod:`rscaffold.training`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rscaffold.config import PipelineConfig, SegmentationConfig, fingerprint_view
from rscaffold.records import ExampleRecord
from rscaffold.stages.common import (
    as_dict,
    log,
    open_stage,
    stage_code_version,
    stage_dir,
    stage_inputs,
    write_json,
)
from rscaffold.stages.declare import Stage
from rscaffold.store import StageDir, StageRef, read_records, write_records
from rscaffold.vocabulary import STUDENT_KINDS, TRAINED_STUDENTS


def training_variants(cfg: PipelineConfig) -> list[tuple[str, bool]]:
    """The students the config trains, ``(name, scaffolded)``, in training order."""
    return [(name, STUDENT_KINDS[name].scaffolded) for name in TRAINED_STUDENTS if name in cfg.training.students]


def run_training(
    cfg: PipelineConfig,
    fps: dict[str, str],
    dataset: StageRef,
    *,
    force: bool = False,
    fresh: bool = False,
    only: str | None = None,
) -> StageRef | None:
    """Train the students of ``training.students`` on the train rows; keep the validation rows
    (``validation.parquet``, the evaluation calibrates the gate on them).

    Every student gets its user messages from the problems' benchmark family prompt
    (:func:`rscaffold.prompts.benchmark_prompt`), the builder the teacher and the evaluation use.

    Runs as one process (the pipeline) or as each of N processes started by ``accelerate launch``
    (:mod:`rscaffold_flows.launch`): every process trains (the Trainer does DDP/FSDP/DeepSpeed),
    the main process alone writes the base model, the final models, the metrics and the manifest.
    A student whose final model exists from an earlier attempt is reused. ``only``: train just
    that student; the stage is finished (and its ref returned) once every configured student
    exists. Returns None on the other processes, and when students are still missing.
    """
    from rscaffold.training.processes import current_processes

    procs = current_processes()
    with contextlib.ExitStack() as stack:
        # The main process holds the stage's lock and prepares its directory; the others follow.
        if procs.is_main:
            sd, done = stack.enter_context(open_stage(cfg, "training", fps, force=force, fresh=fresh))
        procs.wait()
        if not procs.is_main:
            sd = stage_dir(cfg, "training", fps)
            done = sd.ref() if sd.is_complete() else None
        if done:
            return done if procs.is_main else None
        return _train(cfg, sd=sd, dataset=dataset, procs=procs, only=only)


def _train(cfg: PipelineConfig, *, sd: StageDir, dataset: StageRef, procs: Any, only: str | None) -> StageRef | None:
    from rscaffold.evalsets.loaders import benchmark_for
    from rscaffold.labeling.taxonomy import load_taxonomy
    from rscaffold.models import save_tiny_model
    from rscaffold.student import STUDENT_META
    from rscaffold.training.trainer import CHECKPOINTS_DIRNAME, MODEL_DIRNAME, train_student

    started = time.time()
    tax = load_taxonomy(dataset.output("taxonomy"))  # the taxonomy the dataset was labeled with
    examples = read_records(dataset.output("examples"), ExampleRecord)
    train_rows = [e for e in examples if e.split == "train"]
    validation_rows = [e for e in examples if e.split == "validation"]
    tcfg = cfg.training
    if tcfg.tiny is not None:
        # The untrained starting point is saved so that "base" is evaluated on exactly the
        # weights every student starts from.
        base_dir = sd.work / "base"
        if procs.is_main and not (base_dir / "config.json").exists():
            save_tiny_model(tcfg.tokenizer or tcfg.student, tcfg.tiny, base_dir)
        procs.wait()
        base = str(base_dir)
        tcfg = tcfg.model_copy(update={"student": base, "tiny": None, "tokenizer": None})
    else:
        base = tcfg.student
    card = {
        "dataset_fingerprint": dataset.fingerprint,
        "taxonomy_digest": tax.digest(),
        "training_fingerprint": sd.fingerprint,
    }
    variants = training_variants(cfg)
    if only is not None and only not in {n for n, _ in variants}:
        raise ValueError(f"this config does not train {only!r} (students: {[n for n, _ in variants]})")
    results: dict[str, Any] = {}
    outputs = {"base": "base" if cfg.training.tiny is not None else base}
    for name, scaffolded in variants:
        final_meta = sd.work / name / MODEL_DIRNAME / STUDENT_META
        if final_meta.exists():
            # This student finished in an earlier attempt of the stage (a later one failed).
            log.info("training: %s already trained, reusing %s", name, final_meta.parent)
            results[name] = json.loads(final_meta.read_text())["metrics"]
            outputs[name] = os.path.join(name, MODEL_DIRNAME)
            continue
        if only is not None and name != only:
            continue
        twin = _identical_twin(name, results, train_rows + validation_rows, segmentation=cfg.labeling.segmentation)
        if twin is not None:
            # The same completions as a baseline already trained (a teacher without a reasoning
            # block writes only answer text): the same training, so the same model.
            if procs.is_main:
                log.info("training: %s has the same training text as %s; copying that student", name, twin)
                _copy_student(sd.work / twin / MODEL_DIRNAME, sd.work / name / MODEL_DIRNAME, name=name, twin=twin)
            procs.wait()
            results[name] = {**results[twin], "identical_to": twin}
            outputs[name] = os.path.join(name, MODEL_DIRNAME)
            continue
        if procs.is_main:
            log.info("training: %s on %d process(es)", name, procs.num)
        res = train_student(
            train_rows,
            tcfg,
            tax.names,
            signal_tokens=tax.tokens,
            output_dir=sd.work / name,
            scaffolded=scaffolded,
            model_card_info=card,
            target=STUDENT_KINDS[name].target,
            prompt_benchmark=benchmark_for(cfg.problems.format, cfg.problems.custom).prompt_family,
            signal_essential=[s.essential for s in tax.signals],
            segmentation=cfg.labeling.segmentation,
        )
        procs.wait()
        results[name] = {**as_dict(res), "model_dir": os.path.join(name, MODEL_DIRNAME)}
        if procs.is_main and not cfg.training.keep_checkpoints:
            # Checkpoints (weights + optimizer state) exist to resume a killed run; once the final
            # model is saved they only cost disk.
            shutil.rmtree(sd.work / name / CHECKPOINTS_DIRNAME, ignore_errors=True)
        outputs[name] = os.path.relpath(Path(res.model_dir).resolve(), sd.work.resolve())
    missing = [n for n, _ in variants if n not in results]
    ref = None
    if procs.is_main:
        if missing:
            log.info("training: the stage is finished once %s is trained too", ", ".join(missing))
        else:
            write_json(sd.work / "train_metrics.json", results)
            outputs["metrics"] = "train_metrics.json"
            write_records(sd.work / "validation.parquet", validation_rows, ExampleRecord)
            outputs["validation"] = "validation.parquet"
            summary_keys = ("train_loss", "step_loss", "signal_loss", "steps", "runtime_s", "longest_step_tokens")
            ref = sd.finish(
                outputs=outputs,
                config=cfg.training,
                inputs=stage_inputs(dataset),
                summary={
                    "train_rows": len(train_rows),
                    "validation_rows": len(validation_rows),
                    **{k: {m: v.get(m) for m in summary_keys} for k, v in results.items()},
                },
                started=started,
                code=stage_code_version("training"),
            )
    procs.wait()
    return ref


def _identical_twin(
    name: str, trained: dict[str, Any], examples: list[ExampleRecord], *, segmentation: SegmentationConfig
) -> str | None:
    """A plain student already trained whose completions are, for every example, the ones
    ``name`` would be trained on (the short-CoT and long-thinking students of a teacher that wrote
    no reasoning block); None when there is none."""
    from rscaffold.student_format import completion_steps

    if STUDENT_KINDS[name].scaffolded:
        return None

    def texts(target: str) -> list[list[str]]:
        return [[t for _, t in completion_steps(e, target, segmentation)] for e in examples]

    target = STUDENT_KINDS[name].target
    mine = texts(target)
    for other in trained:
        kind = STUDENT_KINDS[other]
        if other != name and not kind.scaffolded and kind.target != target and texts(kind.target) == mine:
            return other
    return None


def _copy_student(src: Path, dst: Path, *, name: str, twin: str) -> None:
    """Copy a student directory (atomically) as the student ``name``, noting it in its metadata."""
    from rscaffold.student import copy_student

    note = f"\n\nThis `{name}` student is the `{twin}` student: both were trained on the same completions.\n"
    copy_student(src, dst, meta_update={"target": STUDENT_KINDS[name].target, "identical_to": twin}, note=note)


def model_path(ref: StageRef, name: str) -> str:
    """Absolute path (or hub id) of a model the training stage produced or started from."""
    value = ref.outputs[name]
    p = Path(ref.path) / value
    return str(p) if p.exists() else value


STAGE = Stage(
    name="training",
    run=run_training,
    description="Train the students of training.students on the same rows: in this process (a child "
    "process), or with training.num_processes > 1 on that many processes under accelerate launch.",
    upstream=("dataset",),
    fingerprint=lambda cfg, fps: [fps["dataset"], fingerprint_view(cfg.training), stage_code_version("training")],
    outputs=("base", "metrics", "validation"),
    loads_model=lambda cfg: True,
    distributed=lambda cfg: cfg.training.num_processes > 1 or cfg.training.num_machines > 1,
    run_name=lambda cfg: f"training[lambda={cfg.training.signal_loss_weight}]",
)
