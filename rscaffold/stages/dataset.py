"""Stage 4, dataset: labeled traces -> one example row per trace, split by problem, with statistics."""

from __future__ import annotations

import time

from rscaffold.config import PipelineConfig, fingerprint_view
from rscaffold.records import ExampleRecord
from rscaffold.stages.common import (
    open_stage,
    stage_code_version,
    stage_inputs,
    write_json,
)
from rscaffold.stages.declare import Stage
from rscaffold.store import StageRef, write_table


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
    from rscaffold.dataset import assemble_examples, dataset_stats
    from rscaffold.labeling.taxonomy import load_taxonomy

    with open_stage(cfg, "dataset", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        examples, dropped = assemble_examples(
            teacher.output("traces"), labeling.output("labeled_steps"), cfg.dataset, keep=cfg.teacher.keep
        )
        if not (examples.get_column("split") == "train").any():
            raise RuntimeError(
                f"the dataset has no training rows ({examples.height} kept traces, dropped: {dropped}); "
                "check the teacher output and dataset.only_correct/min_steps"
            )
        tax = load_taxonomy(labeling.output("taxonomy"))  # the labels' own taxonomy
        tax.save(sd.work / "taxonomy.yaml")
        write_table(sd.work / "examples.parquet", examples, ExampleRecord)
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


STAGE = Stage(
    name="dataset",
    run=run_dataset,
    description="Assemble the labeled-trace dataset (Parquet, splits, stats).",
    upstream=("teacher", "labeling"),
    fingerprint=lambda cfg, fps: [fps["labeling"], fingerprint_view(cfg.dataset), stage_code_version("dataset")],
    outputs=("examples", "stats", "taxonomy"),
)
