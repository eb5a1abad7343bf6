"""Stage 6, evaluation: every model answers every benchmark; scoring, metrics and the report.

The work is cut into shards: one model's answers to up to ``evaluation.shard_size`` consecutive
problems of one benchmark, persisted as ``predictions-<model>-<benchmark>-<first>-<last>`` as
soon as they are made; a re-run resumes from them. With ``run.task_runner: ray`` each shard is
its own task (:func:`run_evaluation_shard`); :func:`run_evaluation` then finds them done and
assembles them in their fixed order (model, benchmark, problem).

Students decode in this process (transformers), or through an OpenAI-compatible server
(``evaluation.llm`` backend ``openai``, :mod:`rscaffold.decoding.served`): one that runs, or one started
for each student (``evaluation.server.command``) and stopped when its shards are done (a Ray
worker keeps its loaded student or running server for its next shard of the same student, see
:mod:`rscaffold.process_cache`, and stops it when it moves on or exits). A served
scaffolded student's gate is still calibrated in this process (its weights are loaded for that
once, and freed before its server starts).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from rscaffold import process_cache
from rscaffold.config import PipelineConfig, fingerprint_view
from rscaffold.records import ExampleRecord, MetricRecord, PredictionRecord
from rscaffold.stages.common import (
    Progress,
    open_stage,
    read_json,
    stage_code_version,
    stage_dir,
    stage_inputs,
    write_json,
)
from rscaffold.stages.declare import Shards, Stage, SummaryTable
from rscaffold.stages.problems import eval_part, overlap_removed, read_problems
from rscaffold.stages.training import model_path
from rscaffold.store import StageDir, StageRef, read_records, write_records
from rscaffold.vocabulary import kind_of, student_of, switched_off

SHARD = "predictions"  # key <model>-<benchmark>-<first>-<last> (problem indexes in the benchmark)


def _suites(cfg: PipelineConfig, problems: StageRef) -> list[Any]:
    from rscaffold.evalsets.loaders import problem_benchmarks
    from rscaffold.evaluation.suites import evaluation_suites

    benches = list(problem_benchmarks(cfg.problems).values())  # the eval split: each benchmark of a mix its own suite
    default = benches[0] if len(benches) == 1 else benches
    return evaluation_suites(
        cfg.evaluation, default, read_problems(problems, "eval"), exclude=overlap_removed(problems)
    )


@dataclass(frozen=True)
class _Shard:
    """One unit of the evaluation's work: ``model`` answers problems ``lo..hi-1`` of ``suite``."""

    key: str
    model: str
    suite: Any
    lo: int
    hi: int


def _shards(cfg: PipelineConfig, suites: list[Any]) -> list[_Shard]:
    size = cfg.evaluation.shard_size
    return [
        _Shard(f"{name}-{suite.name}-{lo:06d}-{min(lo + size, len(suite.problems)) - 1:06d}", name, suite, lo, hi)
        for name in cfg.evaluation.models
        for suite in suites
        for lo in range(0, len(suite.problems), size)
        for hi in [min(lo + size, len(suite.problems))]
    ]


def evaluation_shards(cfg: PipelineConfig, problems: StageRef) -> list[str]:
    """The keys of the evaluation's shards, in the order the stage assembles them."""
    return [sh.key for sh in _shards(cfg, _suites(cfg, problems))]


@dataclass
class _Decoder:
    """What answering needs across shards: the loaded student (one at a time) and how each model
    decodes (plain, or guided with its gate calibrated on the validation rows, persisted per model
    as ``decoding-<model>.json`` so every shard and every re-run uses the same settings)."""

    cfg: PipelineConfig
    sd: StageDir
    training: StageRef | None  # None: only the base student is evaluated, and training did not run
    validation: list[ExampleRecord]
    student: Any = None
    loaded: str | None = None
    decoding: dict[str, dict] = field(default_factory=dict)
    server: Any = None  # the StudentServer running for `served`
    backend: Any = None  # the request backend of `served`
    served: str | None = None
    tokenizer_only: Any = None  # the served student's tokenizer and signal facts (no weights)

    def model_path(self, student_name: str) -> str:
        """Where the student's weights are: the training stage's output, or without one (only the
        base student evaluated) the configured student model."""
        if self.training is None:
            if student_name != "base":
                raise ValueError(f"evaluating {student_name!r} needs the training stage's output")
            return self.cfg.training.student
        return model_path(self.training, student_name)

    def settings(self, name: str) -> tuple[str, Any]:
        from rscaffold.decoding.calibration import plan_guided_decoding
        from rscaffold.decoding.policy import GuidedSettings

        ecfg = self.cfg.evaluation
        mode = kind_of(name).decoding
        if mode == "plain":
            self.decoding[name] = {"mode": "plain", "max_new_tokens": ecfg.max_new_tokens}
            return mode, None
        settings_file = self.sd.shards / f"decoding-{name}.json"
        # One calibration per model: the workers of a fanned-out stage wait for the first one.
        with self.sd.shard_lock("decoding", name):
            if settings_file.exists():
                self.decoding[name] = read_json(settings_file, {})
                return mode, GuidedSettings.from_dict(self.decoding[name]["settings"])
            settings, provenance = plan_guided_decoding(
                ecfg.guided,
                self.load(student_of(name)),
                self.validation,
                gate="gate" not in switched_off(name),
                prune="prune" not in switched_off(name),
                fallback_guard="fallback_guard" not in switched_off(name),
            )
            self.decoding[name] = {"mode": "guided", "max_new_tokens": ecfg.max_new_tokens, **provenance}
            write_json(settings_file, self.decoding[name])
        return mode, settings

    def load(self, student_name: str) -> Any:
        from rscaffold.models import free_accelerator_memory
        from rscaffold.student import load_student

        if self.loaded != student_name:
            self.student = None
            free_accelerator_memory()
            self.student, self.loaded = load_student(self.model_path(student_name)), student_name
            process_cache.count("student")
        return self.student

    def serve(self, student_name: str) -> tuple[Any, Any]:
        """(request backend, tokenizer-only Student) of a served student. With
        ``evaluation.server``, its server is started (and the previous student's stopped) at the
        first request the request cache cannot answer: a fully cached re-run starts none."""
        from rscaffold.decoding.served import served_llm
        from rscaffold.llm import backend_class, create_backend
        from rscaffold.serving import StudentServer
        from rscaffold.stages.requests import request_cache
        from rscaffold.student import load_student

        ecfg = self.cfg.evaluation
        llm = ecfg.served_llm()
        model_dir = self.model_path(student_name)
        if self.served != student_name:
            self.stop_serving()
            bcfg = served_llm(llm, student=student_name, model_dir=model_dir)
            if bcfg.revision is None:  # the request cache tells students (and trainings) apart by it
                trained = self.training.fingerprint if self.training is not None else "untrained"
                bcfg = bcfg.model_copy(update={"revision": f"{trained}/{student_name}"})

            def connect() -> Any:
                if ecfg.server is None:
                    return backend_class(bcfg.backend)(bcfg)
                self.close()  # free the in-process model (a calibration's) before the server takes the device
                sc = ecfg.server
                self.server = StudentServer(
                    sc.command,
                    model_dir=model_dir,
                    model=bcfg.model,
                    log_path=self.sd.work / f"server-{student_name}.log",
                    host=sc.host,
                    port=sc.port,
                    startup_timeout_s=sc.startup_timeout_s,
                    env=sc.env,
                ).start()
                process_cache.count("server")
                return backend_class(bcfg.backend)(bcfg.model_copy(update={"base_url": self.server.base_url}))

            self.backend = create_backend(bcfg, cache=request_cache(self.cfg), connect=connect)
            self.served = student_name
            self.tokenizer_only = load_student(model_dir, weights=False)
        return self.backend, self.tokenizer_only

    def predict(self, shard: _Shard) -> list[PredictionRecord]:
        """Answer one shard; persist and return its predictions."""
        from rscaffold.decoding.in_process import generate
        from rscaffold.decoding.served import ServedDecodingError, generate_served
        from rscaffold.evaluation.metrics import score_output

        name, suite = shard.model, shard.suite
        mode, settings = self.settings(name)
        ecfg = self.cfg.evaluation
        questions = suite.prompts(ecfg.prompt)[shard.lo : shard.hi]
        if ecfg.is_served(student_of(name)):
            backend, student = self.serve(student_of(name))
            self.decoding[name]["backend"] = "openai"
            try:
                outs = generate_served(
                    backend,
                    student,
                    questions,
                    mode=mode,
                    max_new_tokens=ecfg.max_new_tokens,
                    guided=settings,
                    request_prefix=shard.key,
                )
            except ServedDecodingError as err:
                if self.server is None:
                    raise
                alive = "running" if self.server.alive() else "no longer running"
                raise ServedDecodingError(f"{err} The server is {alive}; its log: {self.server.log_path}") from None
        else:
            outs = generate(
                self.load(student_of(name)),
                questions=questions,
                mode=mode,
                max_new_tokens=ecfg.max_new_tokens,
                batch_size=ecfg.batch_size,
                guided=settings,
                kv_cache=ecfg.kv_cache,
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
                signal_sources=o.signal_sources,
            )
            for p, o in zip(suite.problems[shard.lo : shard.hi], outs, strict=True)
        ]
        self.sd.write_shard(SHARD, preds, PredictionRecord, key=shard.key)
        return preds

    def stop_serving(self) -> None:
        if self.backend is not None:
            self.backend.close()
        if self.server is not None:
            self.server.stop()
        self.server = self.backend = self.served = None

    def close(self) -> None:
        from rscaffold.models import free_accelerator_memory

        self.student, self.loaded = None, None
        free_accelerator_memory()


def _decoder(cfg: PipelineConfig, sd: StageDir, training: StageRef | None) -> _Decoder:
    if training is None:
        validation, trained = [], set()
    else:
        validation = (
            read_records(training.output("validation"), ExampleRecord) if "validation" in training.outputs else []
        )
        trained = set(training.outputs)
    missing = sorted({student_of(m) for m in cfg.evaluation.models} - {"base"} - trained)
    if missing:
        raise ValueError(
            f"evaluation.models needs the students {missing}, which the training stage did not train "
            f"(training.students: {cfg.training.students})"
        )
    return _Decoder(cfg, sd, training, validation)


def run_evaluation_shard(
    cfg: PipelineConfig, fps: dict[str, str], *, problems: StageRef, training: StageRef | None = None, key: str
) -> dict[str, Any]:
    """Answer one (model, benchmark) shard into the stage's work directory (one task of a
    fanned-out stage; :func:`run_evaluation` then assembles and reports)."""
    sd = stage_dir(cfg, "evaluation", fps)
    sd.prepare()
    out: dict[str, Any] = {"key": key, "pid": os.getpid(), "host": socket.gethostname(), "answered": 0}
    shards = {sh.key: sh for sh in _shards(cfg, _suites(cfg, problems))}
    if key not in shards:
        raise ValueError(f"no evaluation shard {key!r} in this config (shards: {list(shards)[:5]}...)")
    with sd.shard_lock(SHARD, key):
        if sd.shard_path(SHARD, key).exists():
            return out
        # The worker keeps its decoder (the loaded student, the running student server) for the
        # next shard of this evaluation; another run's, or the worker's exit, closes it.
        decoder = process_cache.kept(
            "evaluation",
            "|".join([str(sd.path), training.fingerprint if training else "", cfg.model_dump_json()]),
            lambda: _decoder(cfg, sd, training),
            close=_close_decoder,
        )
        try:
            out["answered"] = len(decoder.predict(shards[key]))
        except BaseException:
            process_cache.release("evaluation")  # a failed shard's retry starts from a clean decoder
            raise
    out["loads"] = process_cache.loads()
    return out


def _close_decoder(decoder: _Decoder) -> None:
    decoder.stop_serving()
    decoder.close()


def run_evaluation(
    cfg: PipelineConfig,
    fps: dict[str, str],
    *,
    problems: StageRef,
    training: StageRef | None = None,
    labeling: StageRef | None = None,
    force: bool = False,
    fresh: bool = False,
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
    from rscaffold.evaluation.metrics import compute_metrics, metrics_table
    from rscaffold.evaluation.report import CHART_FILE, OVERLAP_FILE, REPORT_FILE, accuracy_table, write_report
    from rscaffold.evaluation.signals import signal_agreement, signal_distribution

    with open_stage(cfg, "evaluation", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        ecfg = cfg.evaluation
        suites = _suites(cfg, problems)
        teacher = None
        if labeling is not None and "quality" in labeling.outputs:
            teacher = read_json(labeling.output("quality"), None)

        decoder = _decoder(cfg, sd, training)
        finished_shards = sd.read_shard_map(SHARD, PredictionRecord)
        predictions: list[PredictionRecord] = []
        shards = _shards(cfg, suites)
        try:
            for k, shard in enumerate(shards):
                with sd.shard_lock(SHARD, shard.key):
                    if shard.key in finished_shards:
                        predictions.extend(finished_shards[shard.key])
                        decoder.settings(shard.model)  # what it decoded with (from its settings file)
                    elif sd.shard_path(SHARD, shard.key).exists():  # made meanwhile by another worker
                        predictions.extend(read_records(sd.shard_path(SHARD, shard.key), PredictionRecord))
                        decoder.settings(shard.model)
                    else:
                        predictions.extend(decoder.predict(shard))
                if progress:
                    progress(k + 1, len(shards))
        finally:
            decoder.stop_serving()
            decoder.close()

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
        write_json(sd.work / OVERLAP_FILE, {s.name: s.removed_overlap for s in suites})
        write_report(sd.work, published=sd.path)  # report.md + accuracy.png, from the Parquet files just written
        return sd.finish(
            outputs={
                "predictions": "predictions.parquet",
                "metrics": "metrics.parquet",
                "metrics_json": "metrics.json",
                "report": REPORT_FILE,
                "accuracy_png": CHART_FILE,
            },
            config=ecfg,
            inputs=stage_inputs(*(r for r in (problems, training, labeling) if r is not None)),
            summary={
                "table": metrics_table(metrics),
                "accuracy_table": accuracy_table(metrics),
                "benchmarks": {s.name: len(s.problems) for s in suites},
                "overlap_removed": {s.name: s.removed_overlap for s in suites},
                "decoding": decoder.decoding,
            },
            started=started,
            code=stage_code_version("evaluation"),
        )


def _needs(cfg: PipelineConfig) -> list[str]:
    """The stages the requested models need: the problems always; the training stage for a trained
    student (or for the random-init base model it saves, ``training.tiny``); the labeling stage for
    the signal consistency of a scaffolded student."""
    kinds = [kind_of(m) for m in cfg.evaluation.models]
    needs = ["problems"]
    if any(k.target for k in kinds) or cfg.training.tiny is not None:
        needs.append("training")
    if any(k.scaffolded for k in kinds):
        needs.append("labeling")
    return needs


def _fingerprint(cfg: PipelineConfig, fps: dict[str, str]) -> list[Any]:
    from rscaffold.evalsets.loaders import benchmark_source_digest

    return [
        fps["training"],
        eval_part(cfg) if not cfg.evaluation.benchmarks else None,
        fingerprint_view(cfg.evaluation),
        [benchmark_source_digest(b) for b in cfg.evaluation.benchmarks],
        stage_code_version("evaluation"),
    ]


def _run_name(cfg: PipelineConfig) -> str:
    """``evaluation[<benchmark>,...]``: the configured benchmarks, or the problems' format."""
    names = [b.name for b in cfg.evaluation.benchmarks] or [cfg.problems.name]
    return f"evaluation[{','.join(names)}]"


STAGE = Stage(
    name="evaluation",
    run=run_evaluation,
    description="Answer the evaluation benchmarks with the base and trained students; score and report.",
    upstream=("problems", "training", "labeling"),
    optional=("training", "labeling"),
    needs=_needs,
    fingerprint=_fingerprint,
    outputs=("predictions", "metrics", "metrics_json", "report", "accuracy_png"),
    shards=Shards(keys=evaluation_shards, run=run_evaluation_shard),
    loads_model=lambda cfg: True,
    run_name=_run_name,
    report="report",
    table=SummaryTable(
        "rscaffold-accuracy", "accuracy (%) [95% bootstrap interval]: models x benchmarks", ("accuracy_table", "table")
    ),
)
