"""Stage 3, labeling: split every kept teacher trace into steps and label each step with a semantic
signal (keyword pre-labels, then LLM validation; see :mod:`rscaffold.labeling`), resumable, with
the quality report (``quality.json`` / ``quality.md`` / ``transitions.png``)."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from typing import Any

from rscaffold import process_cache
from rscaffold.config import PipelineConfig, fingerprint_view
from rscaffold.records import LabeledStepRecord, TraceRecord
from rscaffold.stages.common import (
    Progress,
    log,
    open_stage,
    read_json,
    stage_code_version,
    stage_dir,
    stage_inputs,
    write_json,
)
from rscaffold.stages.declare import LOCAL_BACKENDS, Shards, Stage
from rscaffold.stages.requests import log_request_stats, request_cache, request_summary
from rscaffold.store import StageDir, StageRef, read_records, write_records, write_text

SHARD = "labeled_steps"


class LabelingFailureError(RuntimeError):
    """Too many traces could not be labeled by the LLM (see ``labeling.max_fallback_rate``)."""


def _work(
    cfg: PipelineConfig, teacher: StageRef
) -> tuple[list[TraceRecord], dict[str, int], list[tuple[str, list[TraceRecord]]]]:
    """The kept traces, what was dropped, and the shards: groups of ``shard_size`` traces in a
    fixed order, each named by its index range."""
    from rscaffold.dataset import select_traces

    all_traces = read_records(teacher.output("traces"), TraceRecord)
    traces, dropped = select_traces(all_traces, cfg.teacher.keep)
    size = cfg.labeling_shard_size()
    groups = [traces[k : k + size] for k in range(0, len(traces), size)]
    return (
        traces,
        {**dropped, "total": len(all_traces)},
        [(f"{k * size:06d}-{k * size + len(g) - 1:06d}", g) for k, g in enumerate(groups)],
    )


def _empty_traces(sd: StageDir) -> set[str]:
    """Traces that have no steps, remembered per shard so a resumed run does not count them as pending."""
    out: set[str] = set()
    for path in sd.shards.glob("empty-*.json") if sd.shards.exists() else []:
        out.update(read_json(path, []))
    return out


def _label_shard(
    cfg: PipelineConfig,
    *,
    sd: StageDir,
    key: str,
    group: list[TraceRecord],
    backend_factory: Any,
    tax: Any,
    stats: Counter[str],
) -> int:
    """Label the traces of one shard that are not labeled yet; write the shard with all its
    labels (earlier ones kept). Returns how many traces were labeled now."""
    from rscaffold.labeling.labeler import label_traces, labeler_token_counter, warn_context_larger_than_model
    from rscaffold.segment import split_steps, trace_body

    existing = sd.read_shards(SHARD, LabeledStepRecord, keys={key})  # its own shard, not every one
    labeled = {s.trace_id for s in existing}
    empty = set(read_json(sd.shards / f"empty-{key}.json", []))
    work = []
    for t in group:
        if t.trace_id in labeled or t.trace_id in empty:
            continue
        steps = split_steps(trace_body(t.reasoning, t.text), cfg.labeling.segmentation)
        if not steps:
            empty.add(t.trace_id)
            continue
        work.append((t.trace_id, t.problem_id, t.question, steps))
    write_json(sd.shards / f"empty-{key}.json", sorted(empty))
    if not work:
        return 0
    batch: list[LabeledStepRecord] = list(existing)
    backend = backend_factory() if cfg.labeling.method == "llm" else None
    count = labeler_token_counter(cfg.labeler_llm()) if backend is not None else None
    if backend is not None:
        warn_context_larger_than_model(cfg.labeler_llm(), cfg.labeling)
    for records in label_traces(
        work, tax, backend, sampling=cfg.labeling.sampling, cfg=cfg.labeling, stats=stats, count_tokens=count
    ):
        batch.extend(records)
    sd.write_shard(SHARD, batch, LabeledStepRecord, key=key)
    return len(work)


def labeling_shards(cfg: PipelineConfig, teacher: StageRef) -> list[str]:
    """The keys of the labeling shards (for a stage fanned out as one task per shard)."""
    return [key for key, _ in _work(cfg, teacher)[2]]


def run_labeling_shard(cfg: PipelineConfig, fps: dict[str, str], teacher: StageRef, *, key: str) -> dict[str, Any]:
    """Label one shard into the stage's work directory (one task of a fanned-out stage;
    :func:`run_labeling` then assembles and publishes). The labeler model is loaded once per
    worker process; the shard's lock keeps two workers off one shard."""
    from rscaffold.labeling.taxonomy import load_taxonomy
    from rscaffold.llm import create_backend

    sd = stage_dir(cfg, "labeling", fps)
    out: dict[str, Any] = {"key": key, "pid": os.getpid(), "host": socket.gethostname(), "labeled": 0}
    sd.prepare()
    group = dict(_work(cfg, teacher)[2])[key]
    holder: list[Any] = []

    def backend():
        if not holder:
            holder.append(create_backend(cfg.labeler_llm(), cache=request_cache(cfg), shared=True))
        return holder[0]

    with sd.shard_lock(SHARD, key):
        out["labeled"] = _label_shard(
            cfg,
            sd=sd,
            key=key,
            group=group,
            backend_factory=backend,
            tax=load_taxonomy(cfg.labeling.taxonomy),
            stats=Counter(),
        )
    if holder:
        out["requests"] = request_summary(holder[0], cfg.labeler_llm())
    out["loads"] = process_cache.loads()
    return out


def run_labeling(
    cfg: PipelineConfig,
    fps: dict[str, str],
    teacher: StageRef,
    *,
    force: bool = False,
    fresh: bool = False,
    progress: Progress | None = None,
) -> StageRef:
    """Segment and label the kept traces; write ``labeled_steps.parquet`` and the quality report.

    The kept traces are cut into shards (``labeling.shard_size`` traces, named by index range),
    each labeled with one batched request round and persisted at once; traces already labeled in
    a shard are not sent again.
    """
    from rscaffold.labeling.quality import label_quality_report, quality_gate
    from rscaffold.labeling.report import plot_transition_heatmap, render_quality_markdown
    from rscaffold.labeling.taxonomy import load_taxonomy
    from rscaffold.llm import create_backend

    with open_stage(cfg, "labeling", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        tax = load_taxonomy(cfg.labeling.taxonomy)
        traces, dropped, groups = _work(cfg, teacher)
        holder: list[Any] = []

        def backend():
            if not holder:
                holder.append(create_backend(cfg.labeler_llm(), cache=request_cache(cfg)))
            return holder[0]

        stats: Counter[str] = Counter()
        try:
            for k, (key, group) in enumerate(groups):
                with sd.shard_lock(SHARD, key):
                    _label_shard(cfg, sd=sd, key=key, group=group, backend_factory=backend, tax=tax, stats=stats)
                if progress:
                    progress(k + 1, len(groups))
        finally:
            for b in holder:
                b.close()
                log_request_stats("labeling", b, cfg.labeler_llm())
        backend = holder[0] if holder else None
        empty = _empty_traces(sd)
        all_traces_n = dropped.pop("total")

        kept_ids = {t.trace_id for t in traces}
        steps = [s for s in sd.read_shards(SHARD, LabeledStepRecord) if s.trace_id in kept_ids]
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
        write_records(sd.work / "labeled_steps.parquet", steps, LabeledStepRecord)
        report = label_quality_report(steps, tax)
        report["quality_gate"] = gate = quality_gate(report, cfg.labeling)
        write_json(sd.work / "quality.json", report)
        write_text(sd.work / "quality.md", render_quality_markdown(report, tax))
        plot_transition_heatmap(report, tax, sd.work / "transitions.png")
        if gate["degenerate"]:
            log.warning(
                "LABELING LOOKS DEGENERATE (%s): %s. The labels are well formed but do not describe the steps; "
                "use a stronger labeler (labeling.llm) or set labeling.min_kappa / max_order_share / "
                "max_index_lambda to fail here.",
                sd.work / "quality.md",
                "; ".join(gate["reasons"]),
            )
        if gate["failed"]:
            # The labels and the quality report are saved; the stage stays incomplete.
            raise LabelingFailureError(
                "labeling quality gate: " + "; ".join(gate["failed"]) + f" (report: {sd.work / 'quality.md'})"
            )
        # The taxonomy travels with the labels: the stages after this one read it from here.
        tax.save(sd.work / "taxonomy.yaml")
        summary = {
            "traces": all_traces_n,
            "kept_traces": len(traces),
            "dropped": dropped,
            "labeled_traces": len({s.trace_id for s in steps}),
            "steps": len(steps),
            "empty_traces": len(empty & kept_ids),
            "label_sources": dict(Counter(s.source for s in steps)),
            "windows_per_trace": report["windows_per_trace"],
            "fallback_by_length": {r["steps"]: r["fallback_trace_rate"] for r in report["fallback_by_length"]},
            "this_run": dict(stats),
            "taxonomy_digest": tax.digest(),
            "prelabel_kappa": report["prelabel_kappa"],
            "taxonomy_order_share": report["taxonomy_order_share"],
            "index_lambda": report["index_lambda"],
            "degenerate_labeling": gate["reasons"],
            "requests": request_summary(backend, cfg.labeler_llm()),
        }
        return sd.finish(
            outputs={
                "labeled_steps": "labeled_steps.parquet",
                "quality": "quality.json",
                "quality_report": "quality.md",
                "transitions_png": "transitions.png",
                "taxonomy": "taxonomy.yaml",
            },
            config={
                "labeling": cfg.labeling,
                "keep": cfg.teacher.keep,
                "labeler": cfg.labeler_llm() if cfg.labeling.method == "llm" else None,
            },
            inputs=stage_inputs(teacher),
            summary=summary,
            started=started,
            code=stage_code_version("labeling"),
        )


def _fingerprint(cfg: PipelineConfig, fps: dict[str, str]) -> list[Any]:
    from rscaffold.labeling.taxonomy import load_taxonomy

    view = fingerprint_view(cfg.labeling)
    view.pop("taxonomy")  # a path: the taxonomy enters by its content digest
    view.pop("llm")  # None means "the teacher's": the effective labeler enters below
    return [
        fps["teacher"],
        cfg.teacher.keep,  # which traces go on (the teacher's fingerprint leaves it out)
        view,
        fingerprint_view(cfg.labeler_llm()) if cfg.labeling.method == "llm" else None,
        load_taxonomy(cfg.labeling.taxonomy).digest(),
        stage_code_version("labeling"),
    ]


STAGE = Stage(
    name="labeling",
    run=run_labeling,
    description="Split traces into steps and label each step with a semantic signal.",
    upstream=("teacher",),
    fingerprint=_fingerprint,
    outputs=("labeled_steps", "quality", "quality_report", "transitions_png", "taxonomy"),
    shards=Shards(keys=labeling_shards, run=run_labeling_shard),
    loads_model=lambda cfg: cfg.labeling.method == "llm" and cfg.labeler_llm().backend in LOCAL_BACKENDS,
    run_name=lambda cfg: f"labeling[{cfg.labeling.method}]",
    report="quality_report",
)
