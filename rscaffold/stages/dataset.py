"""Stage 4, dataset: labeled traces -> one example row per trace, split by problem, with statistics."""

from __future__ import annotations

import time

from rscaffold.config import PipelineConfig
from rscaffold.records import ExampleRecord, LabeledStepRecord, TraceRecord
from rscaffold.stages.common import (
    open_stage,
    stage_code_version,
    stage_inputs,
    write_json,
)
from rscaffold.store import StageRef, read_records, write_records


def run_dataset(
    cfg: PipelineConfig,
    fps: dict[str, str],
    *,
    teacher: StageRef,
    labeling: StageRef,
    force: bool = False,
    fresh: bool = False,
) -> StageRef:
    """Join the kept traces with their labeled steps, filter, split by problem, write ``examples.parquet``."""
    from rscaffold.dataset import assemble_examples, dataset_stats, select_traces
    from rscaffold.labeling.taxonomy import load_taxonomy

    with open_stage(cfg, "dataset", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        traces, _ = select_traces(read_records(teacher.output("traces"), TraceRecord), cfg.teacher.keep)
        steps = read_records(labeling.output("labeled_steps"), LabeledStepRecord)
        examples, dropped = assemble_examples(traces, steps, cfg.dataset)
        if not any(e.split == "train" for e in examples):
            raise RuntimeError(
                f"the dataset has no training rows ({len(traces)} traces, dropped: {dropped}); "
                "check the teacher output and dataset.only_correct/min_steps"
            )
        tax = load_taxonomy(labeling.output("taxonomy"))  # the labels' own taxonomy
        tax.save(sd.work / "taxonomy.yaml")
        write_records(sd.work / "examples.parquet", examples, ExampleRecord)
        stats = dataset_stats(examples, tax.names)
        stats["dropped"] = dropped
        stats["taxonomy_digest"] = tax.digest()
        stats["fingerprint"] = sd.fingerprint
        write_json(sd.work / "stats.json", stats)
        return sd.finish(
            outputs={"examples": "examples.parquet", "stats": "stats.json", "taxonomy": "taxonomy.yaml"},
            config=cfg.dataset,
            inputs=stage_inputs(teacher, labeling),
            summary=stats,
            started=started,
            code=stage_code_version("dataset"),
        )
