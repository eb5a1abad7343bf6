"""Stage 3, labeling: split every kept teacher trace into steps and label each step with a semantic
signal (keyword pre-labels, then LLM validation; see :mod:`rscaffold.labeling`), resumable, with
the quality report (``quality.json`` / ``quality.md`` / ``transitions.png``)."""

from __future__ import annotations

import time
from collections import Counter

from rscaffold.config import PipelineConfig
from rscaffold.records import LabeledStepRecord, TraceRecord
from rscaffold.stages.common import (
    Progress,
    open_stage,
    read_json,
    stage_code_version,
    stage_inputs,
    write_json,
)
from rscaffold.stages.requests import log_request_stats, request_cache, request_summary
from rscaffold.store import StageRef, read_records, write_records, write_text

SHARD = "labeled_steps"


class LabelingFailureError(RuntimeError):
    """Too many traces could not be labeled by the LLM (see ``labeling.max_fallback_rate``)."""


def run_labeling(
    cfg: PipelineConfig,
    fps: dict[str, str],
    teacher: StageRef,
    *,
    force: bool = False,
    fresh: bool = False,
    progress: Progress | None = None,
) -> StageRef:
    """Segment and label the kept traces; write ``labeled_steps.parquet`` and the quality report."""
    from rscaffold.dataset import select_traces
    from rscaffold.labeling.labeler import label_traces
    from rscaffold.labeling.quality import label_quality_report
    from rscaffold.labeling.report import (
        plot_transition_heatmap,
        render_quality_markdown,
    )
    from rscaffold.labeling.taxonomy import load_taxonomy
    from rscaffold.segment import split_steps, trace_body

    with open_stage(cfg, "labeling", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        tax = load_taxonomy(cfg.labeling.taxonomy)
        all_traces = read_records(teacher.output("traces"), TraceRecord)
        traces, dropped = select_traces(all_traces, cfg.teacher.keep)

        # The work in a fixed order, cut into shards of shard_size traces named by their index range;
        # traces whose labels are already in a shard (or that have no steps) are not sent again.
        size = cfg.labeling.shard_size
        groups = [traces[k : k + size] for k in range(0, len(traces), size)]
        keys = [f"{k * size:06d}-{k * size + len(g) - 1:06d}" for k, g in enumerate(groups)]
        existing = sd.read_shard_map(SHARD, LabeledStepRecord)
        labeled = {s.trace_id for rows in existing.values() for s in rows}
        empty = set(read_json(sd.shards / "empty_traces.json", []))
        todo: list[tuple[str, list[tuple[str, str, str, list[str]]]]] = []
        for key, group in zip(keys, groups):
            work = []
            for t in group:
                if t.trace_id in labeled or t.trace_id in empty:
                    continue
                steps = split_steps(trace_body(t.reasoning, t.text), cfg.labeling.segmentation)
                if not steps:
                    empty.add(t.trace_id)
                    continue
                work.append((t.trace_id, t.problem_id, t.question, steps))
            if work:
                todo.append((key, work))
        # Traces with no steps are remembered so a resumed run does not count them as pending.
        write_json(sd.shards / "empty_traces.json", sorted(empty))

        backend = None
        if cfg.labeling.method == "llm" and todo:
            from rscaffold.llm import create_backend

            backend = create_backend(cfg.labeler_llm(), cache=request_cache(cfg))
        stats: Counter[str] = Counter()
        total = sum(len(w) for _, w in todo)
        try:
            done_n = 0
            # One batched generate call per shard, persisted at once (with the shard's earlier labels).
            for key, work in todo:
                batch: list[LabeledStepRecord] = list(existing.get(key, []))
                for records in label_traces(
                    work, tax, backend, sampling=cfg.labeling.sampling, cfg=cfg.labeling, stats=stats
                ):
                    batch.extend(records)
                sd.write_shard(SHARD, batch, LabeledStepRecord, key=key)
                done_n += len(work)
                if progress:
                    progress(done_n, total)
        finally:
            if backend is not None:
                backend.close()
                log_request_stats("labeling", backend, cfg.labeler_llm())

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
        write_json(sd.work / "quality.json", report)
        write_text(sd.work / "quality.md", render_quality_markdown(report, tax))
        plot_transition_heatmap(report, tax, sd.work / "transitions.png")
        # The taxonomy travels with the labels: the stages after this one read it from here.
        tax.save(sd.work / "taxonomy.yaml")
        summary = {
            "traces": len(all_traces),
            "kept_traces": len(traces),
            "dropped": dropped,
            "labeled_traces": len({s.trace_id for s in steps}),
            "steps": len(steps),
            "empty_traces": len(empty & kept_ids),
            "label_sources": dict(Counter(s.source for s in steps)),
            "this_run": dict(stats),
            "taxonomy_digest": tax.digest(),
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
