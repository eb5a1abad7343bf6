"""How long each student's training examples are, in the student's own tokens, and what
``training.max_length`` does to them: measured with the tokenizer alone, so a ``max_length`` that
would cut a large share of the examples stops the run before any model is loaded.

An R1-style trace of 2k-12k tokens cut at a short ``max_length`` loses its ending and its eos: the
student trained on it never learns to stop, while a student trained on short completions does.
So nothing is cut silently: ``training.truncation`` says what happens to a longer example,
every student's count is reported, and ``training.max_over_length_share`` fails the run when
too many examples are affected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from rscaffold.config import PipelineConfig, SegmentationConfig, TrainingConfig
from rscaffold.dataset import length_summary
from rscaffold.records import ExampleRecord
from rscaffold.student_format import example_lengths
from rscaffold.training.signal_tokens import add_tokenizer_signal_tokens
from rscaffold.vocabulary import STUDENT_KINDS

log = logging.getLogger(__name__)


class TooLongExamplesError(ValueError):
    """``training.max_length`` affects more examples than ``training.max_over_length_share`` allows
    (or any, under ``training.truncation: fail``)."""


def load_student_tokenizer(cfg: TrainingConfig):
    """The student's tokenizer (no model): ``training.tokenizer``, else the student's own (the
    tokenizer a ``tiny`` model is built with)."""
    from transformers import AutoTokenizer

    gguf = {"gguf_file": cfg.student_gguf_file} if cfg.student_gguf_file and cfg.tiny is None else {}
    return AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.student, **({} if cfg.tokenizer else gguf))


def student_lengths(
    examples: Sequence[ExampleRecord],
    students: Sequence[str],
    tokenizer,
    *,
    signal_tokens: Mapping[str, str],
    benchmark: str | Mapping[str, str] | None,
    segmentation: SegmentationConfig | None,
) -> dict[str, dict[str, int]]:
    """``student -> {trace_id: tokens}``: every example as that student is trained on it (its
    prompt and completion, the scaffolded one with its signal tokens). Adds the signal tokens to
    ``tokenizer`` when a scaffolded student is listed."""
    out: dict[str, dict[str, int]] = {}
    plain = [s for s in students if not STUDENT_KINDS[s].scaffolded]
    for name in plain:  # plain text first: no signal tokens yet
        out[name] = example_lengths(
            examples, tokenizer, None, benchmark=benchmark, target=STUDENT_KINDS[name].target, segmentation=segmentation
        )
    if "scaffolded" in students:
        add_tokenizer_signal_tokens(tokenizer, list(signal_tokens.values()))
        out["scaffolded"] = example_lengths(
            examples, tokenizer, signal_tokens, benchmark=benchmark, target="trace", segmentation=segmentation
        )
    return {name: out[name] for name in students}


def measure_students(
    cfg: PipelineConfig, examples: Sequence[ExampleRecord], *, signal_tokens: Mapping[str, str], students: Sequence[str]
) -> dict[str, dict[str, int]]:
    """:func:`student_lengths` of a pipeline's ``students``: the student's tokenizer, the problems'
    prompt families and the labeling stage's segmentation (what the training stage renders)."""
    from rscaffold.evalsets.loaders import prompt_families

    return student_lengths(
        examples,
        students,
        load_student_tokenizer(cfg.training),
        signal_tokens=signal_tokens,
        benchmark=prompt_families(cfg.problems),
        segmentation=cfg.labeling.segmentation,
    )


def too_long(lengths: Mapping[str, Mapping[str, int]], max_length: int) -> set[str]:
    """The examples (trace ids) longer than ``max_length`` for at least one student."""
    return {tid for per in lengths.values() for tid, n in per.items() if n > max_length}


def length_report(
    lengths: Mapping[str, Mapping[str, int]], cfg: TrainingConfig, *, check: bool = True, stage: str = "training"
) -> dict[str, dict[str, Any]]:
    """Per student: the length distribution (:func:`rscaffold.dataset.length_summary`), how many
    examples are longer than ``max_length``, and what ``truncation`` does about it: ``dropped``
    (under ``drop``, an example too long for any student is left out for every student, so all
    students keep training on the same problems) and ``truncated`` (``truncate_keep_end``).
    Logs one line per student (also when nothing is affected), prefixed with ``stage``.

    ``check``: raise :class:`TooLongExamplesError` when a student's affected share exceeds
    ``max_over_length_share``, or when any example is too long under ``truncation: fail``; without
    it, the same finding is a warning that the training stage will refuse to start.
    """
    dropped_ids = too_long(lengths, cfg.max_length) if cfg.truncation == "drop" else set()
    report: dict[str, dict[str, Any]] = {}
    problems = []
    for name, per in lengths.items():
        s = length_summary(per.values(), cfg.max_length)
        over = s["over_max_length"]
        dropped = len(dropped_ids & set(per)) if cfg.truncation == "drop" else 0
        truncated = over if cfg.truncation == "truncate_keep_end" else 0
        s.update(truncation=cfg.truncation, dropped=dropped, truncated=truncated)
        report[name] = s
        log.info(
            "%s: %s: %d examples, tokens mean %s, p50 %s, p90 %s, p99 %s, max %s; %d longer than "
            "max_length=%d; %d dropped, %d truncated (truncation: %s)",
            stage,
            name,
            s["count"],
            s["mean"],
            s["p50"],
            s["p90"],
            s["p99"],
            s["max"],
            over,
            cfg.max_length,
            dropped,
            truncated,
            cfg.truncation,
        )
        affected = max(dropped, truncated, over)
        if cfg.truncation == "fail" and over:
            problems.append(f"{name}: {over} of {s['count']} examples are longer (longest {s['max']} tokens)")
        elif s["count"] and affected / s["count"] > cfg.max_over_length_share:
            problems.append(
                f"{name}: {affected} of {s['count']} examples ({affected / s['count']:.0%}) would be "
                f"{'dropped' if cfg.truncation == 'drop' else 'truncated'} (p90 {s['p90']}, p99 {s['p99']}, "
                f"longest {s['max']} tokens)"
            )
    if problems and not check:
        log.warning(
            "%s: %s; the training stage will refuse to start; raise training.max_length", stage, "; ".join(problems)
        )
    if check and problems:
        longest = max((r["max"] or 0) for r in report.values())
        p99 = max((r["p99"] or 0) for r in report.values())
        limit = (
            "training.truncation: fail"
            if cfg.truncation == "fail"
            else f"training.max_over_length_share={cfg.max_over_length_share}"
        )
        raise TooLongExamplesError(
            f"training.max_length={cfg.max_length} is too short for the training examples ({limit}): "
            + "; ".join(problems)
            + f". Raise training.max_length (to {p99} to keep 99% of every student's examples whole, to "
            f"{longest} to keep all), or accept the loss with training.max_over_length_share / "
            "training.truncation. Nothing was trained."
        )
    return report
