"""Stage 6, evaluation: every model answers every benchmark; scoring, metrics and the report."""

from __future__ import annotations

import time

from rscaffold.config import PipelineConfig
from rscaffold.records import MetricRecord, PredictionRecord
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
from rscaffold.store import StageRef, write_records

SHARD = "predictions"  # one shard per model and benchmark, key <model>-<benchmark>


def run_evaluation(
    cfg: PipelineConfig,
    fps: dict[str, str],
    *,
    problems: StageRef,
    training: StageRef,
    labeling: StageRef | None = None,
    force: bool = False,
    fresh: bool = False,
    progress: Progress | None = None,
) -> StageRef:
    """Answer every evaluation benchmark with every model; score, aggregate, report.

    ``labeling`` (optional): its ``quality.json`` holds the teacher's signal transitions that the
    generated signals are compared with; without it those metrics are empty.
    """
    from rscaffold.evalsets.loaders import benchmark_for
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
    from rscaffold.inference import generate
    from rscaffold.student import load_student

    with open_stage(cfg, "evaluation", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        ecfg = cfg.evaluation
        problems_format = benchmark_for(cfg.problems.format, cfg.problems.custom)
        suites = evaluation_suites(ecfg, problems_format, read_problems(problems, "eval"))
        teacher = None
        if labeling is not None and "quality" in labeling.outputs:
            teacher = read_json(labeling.output("quality"), None)

        # Predictions are persisted per model and benchmark as soon as they are made (resume).
        finished_shards = sd.read_shard_map(SHARD, PredictionRecord)
        predictions: list[PredictionRecord] = []
        total, finished = len(ecfg.models) * len(suites), 0
        for name in ecfg.models:
            mode = "guided" if name == "scaffolded" else "plain"
            student = None
            for suite in suites:
                key = f"{name}-{suite.name}"
                done_rows = finished_shards.get(key)
                if done_rows is not None:
                    predictions.extend(done_rows)
                else:
                    if student is None:
                        student = load_student(model_path(training, name))
                    outs = generate(
                        student,
                        questions=suite.prompts(ecfg.prompt),
                        mode=mode,
                        max_new_tokens=ecfg.max_new_tokens,
                        batch_size=ecfg.batch_size,
                        guided=ecfg.guided,
                    )
                    preds = [
                        score_output(
                            name,
                            suite.name,
                            p,
                            output=o.text,
                            answer_type=suite.answer_type,
                            output_tokens=o.output_tokens,
                            signals=o.signals,
                            latency_s=o.latency_s,
                            decoding=mode,
                            n_steps=len([s for s in o.steps if s]),
                        )
                        for p, o in zip(suite.problems, outs)
                    ]
                    sd.write_shard(SHARD, preds, PredictionRecord, key=key)
                    predictions.extend(preds)
                finished += 1
                if progress:
                    progress(finished, total)
            del student

        metrics = compute_metrics(predictions, ecfg.bootstrap_samples, ecfg.seed, teacher=teacher)
        write_records(sd.work / "predictions.parquet", predictions, PredictionRecord)
        write_records(sd.work / "metrics.parquet", metrics, MetricRecord)
        write_json(
            sd.work / "metrics.json",
            {
                "metrics": [m.model_dump() for m in metrics],
                "generated_signals": signal_distribution(predictions),
                "signal_agreement": signal_agreement(predictions, teacher),
                "teacher_signals": None
                if teacher is None
                else {k: teacher.get(k) for k in ("names", "signal_counts", "transitions")},
            },
        )
        write_report(sd.work)  # report.md + accuracy.png, from the Parquet files just written
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
            },
            started=started,
            code=stage_code_version("evaluation"),
        )
