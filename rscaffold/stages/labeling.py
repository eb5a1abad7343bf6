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
    log,
    open_stage,
    read_json,
    stage_code_version,
    stage_inputs,
    write_json,
)
from rscaffold.store import StageRef, read_records, write_records


class LabelingFailureError(RuntimeError):
    """Too many traces could not be labeled by the LLM (see ``labeling.max_fallback_rate``)."""


def run_labeling(
    cfg: PipelineConfig,
    fps: dict[str, str],
    teacher: StageRef,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> StageRef:
    """Segment and label the kept traces; write ``labeled_steps.parquet`` and the quality report."""
    from rscaffold.labeling.labeler import label_traces
    from rscaffold.labeling.quality import label_quality_report, quality_gate
    from rscaffold.labeling.report import (
        plot_transition_heatmap,
        render_quality_markdown,
    )
    from rscaffold.labeling.taxonomy import load_taxonomy
    from rscaffold.segment import split_steps, trace_body

    sd, done = open_stage(cfg, "labeling", fps, force=force)
    if done:
        return done
    started = time.time()
    tax = load_taxonomy(cfg.labeling.taxonomy)
    traces = read_records(teacher.output("kept_traces"), TraceRecord)

    # Resume: traces whose labels are already in shards are not sent again.
    finished = sd.read_shards("labeled_steps", LabeledStepRecord)
    finished_ids = {s.trace_id for s in finished} | set(read_json(sd.shards / "empty_traces.json", []))
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
        previous = read_json(sd.shards / "empty_traces.json", [])
        write_json(sd.shards / "empty_traces.json", sorted(set(previous) | set(empty)))

    backend = None
    if cfg.labeling.method == "llm" and todo:
        from rscaffold.llm import create_backend

        backend = create_backend(cfg.labeler_llm())
    stats: Counter[str] = Counter()
    try:
        done_n = 0
        # Label in shard-sized groups: each group is one batched generate call, persisted at once.
        for i in range(0, len(todo), cfg.labeling.shard_size):
            group = todo[i : i + cfg.labeling.shard_size]
            batch: list[LabeledStepRecord] = []
            for records in label_traces(
                group, tax, backend, sampling=cfg.labeling.sampling, cfg=cfg.labeling, stats=stats
            ):
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
    report["quality_gate"] = gate = quality_gate(report, cfg.labeling)
    write_json(sd.path / "quality.json", report)
    (sd.path / "quality.md").write_text(render_quality_markdown(report, tax))
    plot_transition_heatmap(report, tax, sd.path / "transitions.png")
    if gate["degenerate"]:
        log.warning(
            "LABELING LOOKS DEGENERATE (%s): %s. The labels are well formed but do not describe the steps; "
            "use a stronger labeler (labeling.llm) or set labeling.min_kappa / max_order_share / max_index_lambda to fail here.",
            sd.path / "quality.md",
            "; ".join(gate["reasons"]),
        )
    if gate["failed"]:
        # The labels and the quality report are saved; the stage stays incomplete.
        raise LabelingFailureError("labeling quality gate: " + "; ".join(gate["failed"]))
    # The taxonomy travels with the labels: the stages after this one read it from here.
    tax.save(sd.path / "taxonomy.yaml")
    summary = {
        "traces": len(traces),
        "labeled_traces": len({s.trace_id for s in steps}),
        "steps": len(steps),
        "empty_traces": len(read_json(sd.shards / "empty_traces.json", [])),
        "label_sources": dict(Counter(s.source for s in steps)),
        "this_run": dict(stats),
        "taxonomy_digest": tax.digest(),
        "prelabel_kappa": report["prelabel_kappa"],
        "taxonomy_order_share": report["taxonomy_order_share"],
        "index_lambda": report["index_lambda"],
        "degenerate_labeling": gate["reasons"],
    }
    return sd.finish(
        outputs={
            "labeled_steps": "labeled_steps.parquet",
            "quality": "quality.json",
            "quality_report": "quality.md",
            "transitions_png": "transitions.png",
            "taxonomy": "taxonomy.yaml",
        },
        config={"labeling": cfg.labeling, "labeler": cfg.labeler_llm() if cfg.labeling.method == "llm" else None},
        inputs=stage_inputs(teacher),
        summary=summary,
        started=started,
        code=stage_code_version("labeling"),
    )
