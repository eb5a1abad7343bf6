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
from rscaffold.store import StageDir, StageRef, fingerprint, read_records, write_records
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
    from rscaffold.evalsets.loaders import prompt_families
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
    # Before any model is loaded: every student's examples in its own tokens against max_length
    # (one log line per student; refused when too many would be dropped or cut).
    lengths, too_long = _check_lengths(cfg, train_rows, tax)
    if too_long:  # truncation 'drop': left out for every student, so all train on the same problems
        kept = [e for e in train_rows if e.trace_id not in too_long]
        if not kept:
            from rscaffold.training.lengths import TooLongExamplesError

            longest = max((r["max"] or 0) for r in lengths.values())
            raise TooLongExamplesError(
                f"every one of the {len(train_rows)} training examples is longer than "
                f"training.max_length={tcfg.max_length} (longest {longest} tokens) and is dropped "
                "(training.truncation: drop): nothing to train on. Raise training.max_length, or set "
                "training.truncation: truncate_keep_end. Nothing was trained."
            )
        train_rows = kept
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
    with contextlib.ExitStack() as held:  # the store lock of the student being trained
        for name, scaffolded in variants:
            held.close()  # the previous student's claim
            dest = sd.work / name / MODEL_DIRNAME
            if procs.is_main and not dest.exists() and (only is None or name == only):
                # Another run (a cell of an experiment) training this very student holds the store's
                # lock: wait for it, then take its model instead of training a second copy.
                store = student_store(cfg, dataset.fingerprint, name)
                held.enter_context(store.lock(wait=cfg.run.wait_for_locks, timeout_s=cfg.run.lock_timeout_s))
            if procs.is_main:  # trained before for another config that it does not depend on
                restore_student(cfg, dataset.fingerprint, name, dest=dest)
            procs.wait()
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
                prompt_benchmark=prompt_families(cfg.problems),
                signal_essential=[s.essential for s in tax.signals],
                segmentation=cfg.labeling.segmentation,
                lengths=lengths[name],
            )
            procs.wait()
            results[name] = {**as_dict(res), "model_dir": os.path.join(name, MODEL_DIRNAME)}
            if procs.is_main and not cfg.training.keep_checkpoints:
                # Checkpoints (weights + optimizer state) exist to resume a killed run; once the final
                # model is saved they only cost disk.
                shutil.rmtree(sd.work / name / CHECKPOINTS_DIRNAME, ignore_errors=True)
            outputs[name] = os.path.relpath(Path(res.model_dir).resolve(), sd.work.resolve())
            if procs.is_main:
                store_student(cfg, dataset.fingerprint, name, model_dir=Path(res.model_dir), locked=True)
    missing = [n for n, _ in variants if n not in results]
    ref = None
    if procs.is_main:
        for name in results:  # the students reused or copied above (stored once; a no-op after)
            store_student(cfg, dataset.fingerprint, name, model_dir=sd.work / outputs[name])
        if missing:
            log.info("training: the stage is finished once %s is trained too", ", ".join(missing))
        else:
            write_json(sd.work / "train_metrics.json", results)
            outputs["metrics"] = "train_metrics.json"
            write_records(sd.work / "validation.parquet", validation_rows, ExampleRecord)
            outputs["validation"] = "validation.parquet"
            summary_keys = (
                "train_loss",
                "step_loss",
                "signal_loss",
                "steps",
                "runtime_s",
                "longest_step_tokens",
                "lengths",
            )
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


def _check_lengths(cfg: PipelineConfig, train_rows: list[ExampleRecord], tax: Any) -> tuple[dict[str, Any], set[str]]:
    """Every student's length report (:func:`rscaffold.training.lengths.length_report`, which logs
    it and raises when max_length is too short) and, under ``truncation: drop``, the examples too
    long for any student."""
    from rscaffold.training.lengths import length_report, measure_students, too_long

    per_student = measure_students(
        cfg, train_rows, signal_tokens=dict(zip(tax.names, tax.tokens)), students=[n for n, _ in training_variants(cfg)]
    )
    report = length_report(per_student, cfg.training)
    drop = too_long(per_student, cfg.training.max_length) if cfg.training.truncation == "drop" else set()
    return report, drop


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


# ---------------------------------------------------------------------------------------------
# the student store: every trained student once, by what it depends on

STUDENT_STORE = "students"
"""The folder of the artifacts root that holds every trained student under its own fingerprint
(:func:`student_fingerprint`): ``students/<fingerprint>/model``, a content-addressed stage
directory (lock, atomic publication, manifest) like a stage's output."""

SIGNAL_ONLY_SETTINGS = ("signal_objective", "signal_loss_weight")
"""Training settings only the scaffolded student depends on (a plain baseline has no signal loss)."""


def student_fingerprint(cfg: PipelineConfig, dataset_fingerprint: str, name: str) -> str:
    """The fingerprint of one trained student: the rows it is trained on (the dataset's
    fingerprint), what it is trained to write, the training settings it depends on and the
    training code. Narrower than the training stage's fingerprint: ``training.students`` does not
    enter (a student does not depend on which others are trained with it, except under
    ``truncation: drop``, which leaves out the examples too long for any of them), and a baseline
    (``short_cot``, ``cot_sft``) does not depend on :data:`SIGNAL_ONLY_SETTINGS`, so configs that
    differ only in those share it."""
    view = fingerprint_view(cfg.training)
    if cfg.training.truncation != "drop":  # 'drop' leaves out what is too long for any student trained
        view.pop("students")
    if not STUDENT_KINDS[name].scaffolded:
        for key in SIGNAL_ONLY_SETTINGS:
            view.pop(key)
    return fingerprint(
        "student", name, STUDENT_KINDS[name].target, dataset_fingerprint, view, stage_code_version("training")
    )


def student_store(cfg: PipelineConfig, dataset_fingerprint: str, name: str) -> StageDir:
    """The store directory of one student (see :data:`STUDENT_STORE`)."""
    return StageDir(cfg.run.artifacts_root, STUDENT_STORE, student_fingerprint(cfg, dataset_fingerprint, name))


def is_student_stored(cfg: PipelineConfig, dataset_fingerprint: str, name: str) -> bool:
    """Whether the store holds this student, intact."""
    sd = student_store(cfg, dataset_fingerprint, name)
    return sd.is_complete() and not sd.verify()


def restore_student(cfg: PipelineConfig, dataset_fingerprint: str, name: str, *, dest: Path) -> bool:
    """Put the stored student ``name`` at ``dest`` (a model directory of the training stage's work
    directory), unless ``dest`` exists already or the store does not hold it intact; True when it
    was put there. Its files are hard links to the store's (copies on another filesystem)."""
    if dest.exists():
        return False
    sd = student_store(cfg, dataset_fingerprint, name)
    if not sd.is_complete():
        return False
    problems = sd.verify()
    if problems:
        log.warning("training: stored student %s at %s is damaged (%s); training it", name, sd.path, problems[0])
        return False
    _link_tree(sd.path / "model", dest)
    log.info("training: %s taken from the student store %s", name, sd.path)
    return True


def store_student(
    cfg: PipelineConfig, dataset_fingerprint: str, name: str, *, model_dir: Path, locked: bool = False
) -> None:
    """Publish a trained student's model directory to the store (a no-op when it holds it).
    ``locked``: the caller holds the store's lock (it trained the student under it)."""
    sd = student_store(cfg, dataset_fingerprint, name)
    if sd.is_complete() and not sd.verify():
        return
    started = time.time()
    lock = (
        contextlib.nullcontext() if locked else sd.lock(wait=cfg.run.wait_for_locks, timeout_s=cfg.run.lock_timeout_s)
    )
    with lock:
        if sd.is_complete() and not sd.verify():
            return
        sd.prepare(fresh=True)
        _link_tree(model_dir, sd.work / "model")
        sd.finish(
            outputs={"model": "model"},
            config={"student": name, "training": fingerprint_view(cfg.training)},
            inputs={"dataset": dataset_fingerprint},
            summary={"student": name, "trained_in": str(model_dir)},
            started=started,
            code=stage_code_version("training"),
        )


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a tree of hard links to ``src``'s files (a copy where a link cannot be made),
    built beside it and renamed into place."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    tmp.rename(dst)


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
