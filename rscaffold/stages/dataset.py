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
from rscaffold.store import StageRef, read_records, write_table


def run_dataset(
    cfg: PipelineConfig,
    fps: dict[str, str],
    *,
    teacher: StageRef,
    labeling: StageRef,
    force: bool = False,
    fresh: bool = False,
) -> StageRef:
    """Join the kept traces with their labeled steps, filter, split by problem, write ``examples.parquet``
    with its statistics: among them ``token_lengths``, the length distribution of every trained
    student's training examples in the student's tokens and how many exceed ``training.max_length``
    (the training stage acts on them before it loads any model: see :mod:`rscaffold.training.lengths`)."""
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
                "check the teacher output, teacher.keep (traces cut at the teacher's token limit are dropped "
                "unless it is 'all': raise teacher.sampling.max_new_tokens) and dataset.only_correct/min_steps"
            )
        tax = load_taxonomy(labeling.output("taxonomy"))  # the labels' own taxonomy
        tax.save(sd.work / "taxonomy.yaml")
        write_table(sd.work / "examples.parquet", examples, ExampleRecord)
        stats = dataset_stats(examples, tax.names)
        stats["dropped"] = dropped
        train = [e for e in read_records(sd.work / "examples.parquet", ExampleRecord) if e.split == "train"]
        stats["token_lengths"] = _token_lengths(cfg, train, tax)
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


def _token_lengths(cfg: PipelineConfig, train: list[ExampleRecord], tax) -> dict:
    """Per trained student: the token-length distribution of its training examples (with the
    student's tokenizer) and how many are longer than ``training.max_length``; a warning when
    the training stage will refuse them."""
    from rscaffold.training.lengths import length_report, measure_students

    lengths = measure_students(
        cfg, train, signal_tokens=dict(zip(tax.names, tax.tokens)), students=cfg.training.students
    )
    return length_report(lengths, cfg.training, check=False, stage="dataset")


def _length_settings(cfg: PipelineConfig) -> list:
    """The training settings the dataset's statistics read: they measure every student's examples
    in the student's tokens against ``training.max_length``."""
    t = cfg.training
    return [t.tokenizer or t.student, t.student_gguf_file, t.students, t.max_length, t.truncation]


STAGE = Stage(
    name="dataset",
    run=run_dataset,
    description="Assemble the labeled-trace dataset (Parquet, splits, stats).",
    upstream=("teacher", "labeling"),
    fingerprint=lambda cfg, fps: [
        fps["labeling"],
        fingerprint_view(cfg.dataset),
        _length_settings(cfg),
        stage_code_version("dataset"),
    ],
    outputs=("examples", "stats", "taxonomy"),
)
