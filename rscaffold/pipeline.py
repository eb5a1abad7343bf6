"""The six stages as plain functions over the artifact store (no Prefect here).

Each ``run_<stage>`` takes the pipeline config and the references of its inputs, computes its
fingerprint (config section + input fingerprints + code version), and either returns the
complete output that already exists for that fingerprint or produces it. Partial work (traces,
labels, checkpoints) is kept under the stage directory so a failed stage resumes on re-run.

:func:`plan_fingerprints` derives every stage's fingerprint from the config alone, which is what
the Prefect tasks use as their cache keys.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rscaffold.config import STAGES, PipelineConfig, TeacherConfig
from rscaffold.records import (
    ExampleRecord,
    LabeledStepRecord,
    MetricRecord,
    PredictionRecord,
    ProblemRecord,
    TraceRecord,
)
from rscaffold.store import StageDir, StageRef, code_version, file_digest, fingerprint, read_records, write_records

log = logging.getLogger("rscaffold.pipeline")

Progress = Callable[[int, int], None]

# Library modules whose source goes into each stage's code version (together with the source of
# the stage's own ``run_<stage>`` function below, see :func:`stage_code_version`).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "problems": ("benchmarks/loaders.py", "records.py"),
    "teacher": ("teachers", "traces.py", "benchmarks", "records.py", "models.py"),
    "labeling": ("segment.py", "signals.py", "labeling_report.py", "teachers", "records.py"),
    "dataset": ("dataset.py", "records.py"),
    "training": ("training", "models.py", "records.py"),
    "evaluation": ("inference.py", "evaluation.py", "report.py", "benchmarks", "training/format.py", "training/student.py", "records.py"),
}


class LabelingFailureError(RuntimeError):
    """Too many traces could not be labeled by the LLM (see ``labeling.max_fallback_rate``)."""


def _source_digest(source: str) -> str:
    """Content digest of a local input file; hub sources are identified by their id."""
    return source if source.startswith("hub:") else file_digest(source)


def stage_code_version(stage: str) -> str:
    """Version of the code a stage runs: its library modules plus its ``run_<stage>`` source."""
    return fingerprint(code_version(*STAGE_CODE[stage]), _STAGE_SOURCE[stage], length=12)


def plan_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """The fingerprint of every stage, from the config alone (upstream fingerprints chained)."""
    from rscaffold.signals import load_taxonomy

    fps: dict[str, str] = {}
    p = cfg.problems
    fps["problems"] = fingerprint(
        "problems", p, _source_digest(p.train), _source_digest(p.eval), stage_code_version("problems")
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
    from rscaffold.evaluation import benchmark_source_digest

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


def stage_dir(cfg: PipelineConfig, stage: str, fps: dict[str, str] | None = None) -> StageDir:
    fps = fps or plan_fingerprints(cfg)
    return StageDir(cfg.run.artifacts_dir, stage, fps[stage])


def completed_ref(cfg: PipelineConfig, stage: str, fps: dict[str, str] | None = None) -> StageRef | None:
    sd = stage_dir(cfg, stage, fps)
    return sd.ref() if sd.is_complete() else None


def _open(cfg: PipelineConfig, stage: str, fps: dict[str, str], force: bool) -> tuple[StageDir, StageRef | None]:
    sd = StageDir(cfg.run.artifacts_dir, stage, fps[stage])
    if sd.is_complete() and not force:
        log.info("%s: complete output found at %s", stage, sd.path)
        return sd, sd.ref()
    sd.prepare(fresh=force)
    return sd, None


def _inputs(*refs: StageRef) -> dict[str, str]:
    return {r.stage: r.fingerprint for r in refs}


# ---------------------------------------------------------------------------------------------
# 1. problems


def run_problems(cfg: PipelineConfig, fps: dict[str, str], force: bool = False) -> StageRef:
    from rscaffold.benchmarks.loaders import load_problems

    sd, done = _open(cfg, "problems", fps, force)
    if done:
        return done
    started = time.time()
    p = cfg.problems
    train = load_problems(p.train, benchmark=p.format, split="train", limit=p.limit_train, seed=p.seed)
    evl = load_problems(p.eval, benchmark=p.format, split="eval", limit=p.limit_eval, seed=p.seed)
    train = [r.model_copy(update={"split": "train"}) for r in train]
    evl = [r.model_copy(update={"split": "eval"}) for r in evl]
    write_records(sd.path / "problems.parquet", train + evl, ProblemRecord)
    return sd.finish(
        {"problems": "problems.parquet"},
        p,
        {"train": _source_digest(p.train), "eval": _source_digest(p.eval)},
        {"train": len(train), "eval": len(evl)},
        started,
        stage_code_version("problems"),
    )


def read_problems(ref: StageRef, split: str | None = None) -> list[ProblemRecord]:
    rows = read_records(ref.output("problems"), ProblemRecord)
    return [r for r in rows if split is None or r.split == split]


# ---------------------------------------------------------------------------------------------
# 2. teacher traces


def teacher_prompt_config(cfg: PipelineConfig) -> TeacherConfig:
    """The teacher config with its prompt template filled in from the benchmark family if unset."""
    from rscaffold.benchmarks.loaders import BENCHMARKS

    if cfg.teacher.prompt_template is not None:
        return cfg.teacher
    return cfg.teacher.model_copy(update={"prompt_template": BENCHMARKS[cfg.problems.format].prompt_template})


def run_teacher(
    cfg: PipelineConfig, fps: dict[str, str], problems: StageRef, force: bool = False, progress: Progress | None = None
) -> StageRef:
    from rscaffold.benchmarks.answers import extract_answer, is_correct
    from rscaffold.benchmarks.loaders import BENCHMARKS
    from rscaffold.teachers import create_backend
    from rscaffold.traces import generate_traces, select_traces

    sd, done = _open(cfg, "teacher", fps, force)
    if done:
        return done
    started = time.time()
    answer_type = BENCHMARKS[cfg.problems.format].answer_type
    teacher_cfg = teacher_prompt_config(cfg)
    train = read_problems(problems, "train")
    backend = create_backend(cfg.teacher.llm)
    try:
        result = generate_traces(
            train,
            backend,
            teacher_cfg,
            sd,
            answer_fn=lambda text: extract_answer(text, answer_type),
            check_fn=lambda pred, gold: pred is not None and is_correct(pred, gold, answer_type),
            progress=progress,
        )
    finally:
        backend.close()
    kept, dropped = select_traces(result.traces, cfg.teacher.keep)
    write_records(sd.path / "traces.parquet", result.traces, TraceRecord)
    write_records(sd.path / "kept_traces.parquet", kept, TraceRecord)
    summary = {
        **result.counts,
        "kept": len(kept),
        "dropped": dropped,
        "failure_reasons": dict(result.failure_reasons),
    }
    return sd.finish(
        {"traces": "traces.parquet", "kept_traces": "kept_traces.parquet"},
        cfg.teacher,
        _inputs(problems),
        summary,
        started,
        stage_code_version("teacher"),
    )


# ---------------------------------------------------------------------------------------------
# 3. labeling


def run_labeling(
    cfg: PipelineConfig, fps: dict[str, str], teacher: StageRef, force: bool = False, progress: Progress | None = None
) -> StageRef:
    from rscaffold.labeling_report import plot_transition_heatmap, render_quality_markdown
    from rscaffold.segment import split_steps, trace_body
    from rscaffold.signals import label_quality_report, label_traces, load_taxonomy

    sd, done = _open(cfg, "labeling", fps, force)
    if done:
        return done
    started = time.time()
    tax = load_taxonomy(cfg.labeling.taxonomy)
    traces = read_records(teacher.output("kept_traces"), TraceRecord)

    # Resume: traces whose labels are already in shards are not sent again.
    finished = sd.read_shards("labeled_steps", LabeledStepRecord)
    finished_ids = {s.trace_id for s in finished} | set(_read_json(sd.shards / "empty_traces.json", []))
    todo = []
    empty: list[str] = []
    for t in traces:
        if t.trace_id in finished_ids:
            continue
        steps = split_steps(trace_body(t.reasoning, t.text), cfg.labeling.segmentation)
        if not steps:
            empty.append(t.trace_id)
            continue
        todo.append((t.trace_id, t.problem_id, t.question, steps))
    if empty:
        # Traces with no steps are remembered so a resumed run does not count them as pending.
        previous = _read_json(sd.shards / "empty_traces.json", [])
        _write_json(sd.shards / "empty_traces.json", sorted(set(previous) | set(empty)))

    backend = None
    if cfg.labeling.method == "llm" and todo:
        from rscaffold.teachers import create_backend

        backend = create_backend(cfg.labeler_llm())
    stats: Counter[str] = Counter()
    try:
        done_n = 0
        # Label in shard-sized groups: each group is one batched generate call, persisted at once.
        for i in range(0, len(todo), cfg.labeling.shard_size):
            group = todo[i : i + cfg.labeling.shard_size]
            batch: list[LabeledStepRecord] = []
            for records in label_traces(group, tax, backend, cfg.labeling.sampling, cfg.labeling, stats=stats):
                batch.extend(records)
            sd.write_shard("labeled_steps", batch, LabeledStepRecord)
            done_n += len(group)
            if progress:
                progress(done_n, len(todo))
    finally:
        if backend is not None:
            backend.close()

    steps = sd.read_shards("labeled_steps", LabeledStepRecord)
    steps.sort(key=lambda s: (s.trace_id, s.step_index))
    if cfg.labeling.method == "llm" and steps:
        traces_total = {s.trace_id for s in steps}
        fell_back = {s.trace_id for s in steps if s.source == "fallback"}
        rate = len(fell_back) / len(traces_total)
        if rate > cfg.labeling.max_fallback_rate:
            # The labels are saved in shards; the stage stays incomplete so nothing downstream
            # trains on them.
            raise LabelingFailureError(
                f"{len(fell_back)} of {len(traces_total)} traces ({rate:.0%}) fell back to keyword labels, "
                f"above labeling.max_fallback_rate={cfg.labeling.max_fallback_rate}; fix the labeler "
                "(labeling.llm) and re-run with --refresh labeling, or raise the threshold"
            )
    write_records(sd.path / "labeled_steps.parquet", steps, LabeledStepRecord)
    report = label_quality_report(steps, tax)
    _write_json(sd.path / "quality.json", report)
    (sd.path / "quality.md").write_text(render_quality_markdown(report, tax))
    plot_transition_heatmap(report, tax, sd.path / "transitions.png")
    summary = {
        "traces": len(traces),
        "labeled_traces": len({s.trace_id for s in steps}),
        "steps": len(steps),
        "empty_traces": len(_read_json(sd.shards / "empty_traces.json", [])),
        "label_sources": dict(Counter(s.source for s in steps)),
        "this_run": dict(stats),
        "taxonomy_digest": tax.digest(),
    }
    return sd.finish(
        {
            "labeled_steps": "labeled_steps.parquet",
            "quality": "quality.json",
            "quality_report": "quality.md",
            "transitions_png": "transitions.png",
        },
        {"labeling": cfg.labeling, "labeler": cfg.labeler_llm() if cfg.labeling.method == "llm" else None},
        _inputs(teacher),
        summary,
        started,
        stage_code_version("labeling"),
    )


# ---------------------------------------------------------------------------------------------
# 4. dataset


def run_dataset(cfg: PipelineConfig, fps: dict[str, str], teacher: StageRef, labeling: StageRef, force: bool = False) -> StageRef:
    from rscaffold.dataset import assemble_examples, dataset_stats
    from rscaffold.signals import load_taxonomy

    sd, done = _open(cfg, "dataset", fps, force)
    if done:
        return done
    started = time.time()
    traces = read_records(teacher.output("kept_traces"), TraceRecord)
    steps = read_records(labeling.output("labeled_steps"), LabeledStepRecord)
    examples, dropped = assemble_examples(traces, steps, cfg.dataset)
    if not any(e.split == "train" for e in examples):
        raise RuntimeError(
            f"the dataset has no training rows ({len(traces)} traces, dropped: {dropped}); "
            "check the teacher output and dataset.only_correct/min_steps"
        )
    tax = load_taxonomy(cfg.labeling.taxonomy)
    write_records(sd.path / "examples.parquet", examples, ExampleRecord)
    stats = dataset_stats(examples, tax.names)
    stats["dropped"] = dropped
    stats["taxonomy_digest"] = tax.digest()
    stats["fingerprint"] = sd.fingerprint
    _write_json(sd.path / "stats.json", stats)
    return sd.finish(
        {"examples": "examples.parquet", "stats": "stats.json"},
        cfg.dataset,
        _inputs(teacher, labeling),
        stats,
        started,
        stage_code_version("dataset"),
    )


# ---------------------------------------------------------------------------------------------
# 5. training


def run_training(cfg: PipelineConfig, fps: dict[str, str], dataset: StageRef, force: bool = False) -> StageRef:
    from rscaffold.models import save_tiny_model
    from rscaffold.signals import load_taxonomy
    from rscaffold.training.student import STUDENT_META
    from rscaffold.training.trainer import CHECKPOINTS_DIRNAME, MODEL_DIRNAME, train_student

    sd, done = _open(cfg, "training", fps, force)
    if done:
        return done
    started = time.time()
    tax = load_taxonomy(cfg.labeling.taxonomy)
    examples = read_records(dataset.output("examples"), ExampleRecord)
    train_rows = [e for e in examples if e.split == "train"]
    tcfg = cfg.training
    if tcfg.tiny is not None:
        # The untrained starting point is saved so that "base" is evaluated on exactly the
        # weights both students start from.
        base_dir = sd.path / "base"
        if not (base_dir / "config.json").exists():
            save_tiny_model(tcfg.tokenizer or tcfg.student, tcfg.tiny, base_dir)
        base = str(base_dir)
        tcfg = tcfg.model_copy(update={"student": base, "tiny": None, "tokenizer": None})
    else:
        base = tcfg.student
    card = {"dataset_fingerprint": dataset.fingerprint, "taxonomy_digest": tax.digest(), "training_fingerprint": sd.fingerprint}
    results: dict[str, Any] = {}
    outputs = {"base": "base" if cfg.training.tiny is not None else base}
    variants = [("scaffolded", True)] + ([("cot_sft", False)] if tcfg.train_baseline else [])
    for name, scaffolded in variants:
        final_meta = sd.path / name / MODEL_DIRNAME / STUDENT_META
        if final_meta.exists():
            # This student finished in an earlier attempt of the stage (a later one failed).
            log.info("training: %s already trained, reusing %s", name, final_meta.parent)
            results[name] = json.loads(final_meta.read_text())["metrics"]
            outputs[name] = os.path.join(name, MODEL_DIRNAME)
            continue
        res = train_student(
            train_rows, tcfg, tax.names, tax.tokens, sd.path / name, scaffolded=scaffolded, model_card_info=card
        )
        results[name] = _as_dict(res)
        if not cfg.training.keep_checkpoints:
            # Checkpoints (weights + optimizer state) exist to resume a killed run; once the final
            # model is saved they only cost disk.
            shutil.rmtree(sd.path / name / CHECKPOINTS_DIRNAME, ignore_errors=True)
        outputs[name] = os.path.relpath(Path(res.model_dir).resolve(), sd.path.resolve())
    _write_json(sd.path / "train_metrics.json", results)
    outputs["metrics"] = "train_metrics.json"
    return sd.finish(
        outputs,
        cfg.training,
        _inputs(dataset),
        {"train_rows": len(train_rows), **{k: {m: v.get(m) for m in ("train_loss", "step_loss", "signal_loss", "steps", "runtime_s")} for k, v in results.items()}},
        started,
        stage_code_version("training"),
    )


def model_path(ref: StageRef, name: str) -> str:
    """Absolute path (or hub id) of a model the training stage produced or started from."""
    value = ref.outputs[name]
    p = Path(ref.path) / value
    return str(p) if p.exists() else value


# ---------------------------------------------------------------------------------------------
# 6. evaluation


def run_evaluation(
    cfg: PipelineConfig,
    fps: dict[str, str],
    problems: StageRef,
    training: StageRef,
    force: bool = False,
    progress: Progress | None = None,
    labeling: StageRef | None = None,
) -> StageRef:
    """Answer every evaluation benchmark with every model; score, aggregate, report.

    ``labeling`` (optional): its ``quality.json`` holds the teacher's signal transitions that the
    generated signals are compared with; without it those metrics are empty.
    """
    from rscaffold.evaluation import compute_metrics, evaluation_suites, metrics_table, score_output, signal_agreement, signal_distribution
    from rscaffold.inference import generate
    from rscaffold.report import CHART_FILE, REPORT_FILE, accuracy_table, write_report
    from rscaffold.training.student import load_student

    sd, done = _open(cfg, "evaluation", fps, force)
    if done:
        return done
    started = time.time()
    ecfg = cfg.evaluation
    suites = evaluation_suites(ecfg, cfg.problems.format, read_problems(problems, "eval"))
    teacher = None
    if labeling is not None and "quality" in labeling.outputs:
        teacher = _read_json(labeling.output("quality"), None)

    # Predictions are persisted per model and benchmark as soon as they are made (resume).
    predictions: list[PredictionRecord] = []
    total, finished = len(ecfg.models) * len(suites), 0
    for name in ecfg.models:
        mode = "guided" if name == "scaffolded" else "plain"
        student = None
        for suite in suites:
            shard = sd.shards / f"predictions-{name}-{suite.name}.parquet"
            if shard.exists():
                predictions.extend(read_records(shard, PredictionRecord))
            else:
                if student is None:
                    student = load_student(model_path(training, name))
                outs = generate(
                    student, questions=suite.prompts(ecfg.prompt), mode=mode, max_new_tokens=ecfg.max_new_tokens,
                    batch_size=ecfg.batch_size, guided=ecfg.guided,
                )
                preds = [
                    score_output(name, suite.name, p, o.text, suite.answer_type, o.output_tokens, o.signals, o.latency_s,
                                 decoding=mode, n_steps=len([s for s in o.steps if s]))
                    for p, o in zip(suite.problems, outs)
                ]
                write_records(shard, preds, PredictionRecord)
                predictions.extend(preds)
            finished += 1
            if progress:
                progress(finished, total)
        del student

    metrics = compute_metrics(predictions, ecfg.bootstrap_samples, ecfg.seed, teacher=teacher)
    write_records(sd.path / "predictions.parquet", predictions, PredictionRecord)
    write_records(sd.path / "metrics.parquet", metrics, MetricRecord)
    _write_json(
        sd.path / "metrics.json",
        {
            "metrics": [m.model_dump() for m in metrics],
            "generated_signals": signal_distribution(predictions),
            "signal_agreement": signal_agreement(predictions, teacher),
            "teacher_signals": None if teacher is None else {k: teacher.get(k) for k in ("names", "signal_counts", "transitions")},
        },
    )
    write_report(sd.path)  # report.md + accuracy.png, from the Parquet files just written
    return sd.finish(
        {
            "predictions": "predictions.parquet",
            "metrics": "metrics.parquet",
            "metrics_json": "metrics.json",
            "report": REPORT_FILE,
            "accuracy_png": CHART_FILE,
        },
        ecfg,
        _inputs(problems, training, *([labeling] if labeling is not None else [])),
        {
            "table": metrics_table(metrics),
            "accuracy_table": accuracy_table(metrics),
            "benchmarks": {s.name: len(s.problems) for s in suites},
        },
        started,
        stage_code_version("evaluation"),
    )


# ---------------------------------------------------------------------------------------------


# Captured at import, so that wrapping a stage function (tests, instrumentation) does not change
# its code version.
_STAGE_SOURCE: dict[str, str] = {s: inspect.getsource(globals()[f"run_{s}"]) for s in STAGES}


def _as_dict(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(obj).items()}
    return dict(obj)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default
