"""Stage 6, evaluation: every model answers every benchmark; scoring, metrics and the report."""

from __future__ import annotations

import time

from rscaffold.config import PipelineConfig
from rscaffold.records import ExampleRecord, MetricRecord, PredictionRecord
from rscaffold.stages.common import (
    Progress,
    open_stage,
    read_json,
    stage_code_version,
    stage_inputs,
    write_json,
)
from rscaffold.stages.problems import read_problems
from rscaffold.stages.training import model_path
from rscaffold.store import StageRef, read_records, write_records
from rscaffold.vocabulary import student_of


def run_evaluation(
    cfg: PipelineConfig,
    fps: dict[str, str],
    *,
    problems: StageRef,
    training: StageRef,
    labeling: StageRef | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> StageRef:
    """Answer every evaluation benchmark with every model; score, aggregate, report.

    Every model gets the same token budget (``evaluation.max_new_tokens``). The scaffolded
    student and its ablations decode signal-guided, with the gate calibrated on the training
    stage's validation rows; how each model decoded (budget, threshold and its calibration,
    pruned signals, per-step cap and where each came from) is recorded in the manifest's summary
    (``decoding``).

    ``labeling`` (optional): its ``quality.json`` holds the teacher's signal transitions that the
    generated signals are compared with; without it those metrics are empty.
    """
    from rscaffold.evaluation.metrics import (
        compute_metrics,
        metrics_table,
        score_output,
    )
    from rscaffold.evaluation.report import (
        CHART_FILE,
        REPORT_FILE,
        accuracy_table,
        write_report,
    )
    from rscaffold.evaluation.signals import signal_agreement, signal_distribution
    from rscaffold.evaluation.suites import evaluation_suites
    from rscaffold.inference import GuidedSettings, generate, plan_guided_decoding
    from rscaffold.models import free_accelerator_memory
    from rscaffold.student import load_student

    sd, done = open_stage(cfg, "evaluation", fps, force=force)
    if done:
        return done
    started = time.time()
    ecfg = cfg.evaluation
    suites = evaluation_suites(ecfg, cfg.problems.format, read_problems(problems, "eval"))
    teacher = None
    if labeling is not None and "quality" in labeling.outputs:
        teacher = read_json(labeling.output("quality"), None)

    validation = read_records(training.output("validation"), ExampleRecord) if "validation" in training.outputs else []
    missing = sorted({student_of(m) for m in ecfg.models} - {"base"} - set(training.outputs))
    if missing:
        raise ValueError(
            f"evaluation.models needs the students {missing}, which the training stage did not train "
            f"(training.students: {cfg.training.students})"
        )

    # Predictions are persisted per model and benchmark as soon as they are made (resume); so is
    # how each model decodes (the gate's calibration included).
    predictions: list[PredictionRecord] = []
    decoding: dict[str, dict] = {}
    total, finished = len(ecfg.models) * len(suites), 0
    student, loaded = None, None
    for name in ecfg.models:
        student_name = student_of(name)
        mode = "guided" if student_name == "scaffolded" else "plain"
        settings_file = sd.shards / f"decoding-{name}.json"
        settings = None
        if mode == "guided" and settings_file.exists():
            decoding[name] = read_json(settings_file, {})
            settings = GuidedSettings.from_dict(decoding[name]["settings"])
        elif mode == "plain":
            decoding[name] = {"mode": "plain", "max_new_tokens": ecfg.max_new_tokens}
        for suite in suites:
            shard = sd.shards / f"predictions-{name}-{suite.name}.parquet"
            if shard.exists():
                predictions.extend(read_records(shard, PredictionRecord))
            else:
                if loaded != student_name:
                    student = None
                    free_accelerator_memory()
                    student, loaded = load_student(model_path(training, student_name)), student_name
                if mode == "guided" and settings is None:
                    settings, provenance = plan_guided_decoding(
                        ecfg.guided,
                        student,
                        validation,
                        gate=not name.endswith("-nogate"),
                        prune=not name.endswith("-noprune"),
                    )
                    decoding[name] = {"mode": "guided", "max_new_tokens": ecfg.max_new_tokens, **provenance}
                    write_json(settings_file, decoding[name])
                outs = generate(
                    student,
                    questions=suite.prompts(ecfg.prompt),
                    mode=mode,
                    max_new_tokens=ecfg.max_new_tokens,
                    batch_size=ecfg.batch_size,
                    guided=settings,
                )
                preds = [
                    score_output(
                        name,
                        suite.name,
                        p,
                        output=o.text,
                        answer_type=suite.answer_type,
                        numeric=suite.numeric,
                        output_tokens=o.output_tokens,
                        signals=o.signals,
                        latency_s=o.latency_s,
                        decoding=mode,
                        n_steps=len([s for s in o.steps if s]),
                    )
                    for p, o in zip(suite.problems, outs)
                ]
                write_records(shard, preds, PredictionRecord)
                predictions.extend(preds)
            finished += 1
            if progress:
                progress(finished, total)
    del student
    free_accelerator_memory()

    metrics = compute_metrics(predictions, ecfg.bootstrap_samples, ecfg.seed, teacher=teacher)
    write_records(sd.path / "predictions.parquet", predictions, PredictionRecord)
    write_records(sd.path / "metrics.parquet", metrics, MetricRecord)
    write_json(
        sd.path / "metrics.json",
        {
            "metrics": [m.model_dump() for m in metrics],
            "generated_signals": signal_distribution(predictions),
            "signal_agreement": signal_agreement(predictions, teacher),
            "teacher_signals": None
            if teacher is None
            else {k: teacher.get(k) for k in ("names", "signal_counts", "transitions")},
        },
    )
    write_report(sd.path)  # report.md + accuracy.png, from the Parquet files just written
    return sd.finish(
        outputs={
            "predictions": "predictions.parquet",
            "metrics": "metrics.parquet",
            "metrics_json": "metrics.json",
            "report": REPORT_FILE,
            "accuracy_png": CHART_FILE,
        },
        config=ecfg,
        inputs=stage_inputs(problems, training, *([labeling] if labeling is not None else [])),
        summary={
            "table": metrics_table(metrics),
            "accuracy_table": accuracy_table(metrics),
            "benchmarks": {s.name: len(s.problems) for s in suites},
            "decoding": decoding,
        },
        started=started,
        code=stage_code_version("evaluation"),
    )
