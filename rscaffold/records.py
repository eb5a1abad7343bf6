"""Row types of every artifact, and their Arrow schemas.

This module is the single source of truth for what each Parquet file holds. Each row type is a
pydantic model; its Arrow schema is derived from the annotations by :func:`arrow_schema`, so the
two cannot drift apart. ``SCHEMA_VERSION`` is bumped on any incompatible change and recorded in
every manifest and in the Parquet key-value metadata.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProblemRecord(Record):
    """One problem (question + gold final answer)."""

    problem_id: str
    split: str  # "train" | "eval"
    source: str
    question: str
    gold_answer: str
    gold_solution: str | None = None
    source_id: str | None = None  # the problem's own id in the user's file (``custom.fields.id``), as written


class TraceRecord(Record):
    """One teacher generation for one (problem, sample) pair, successful or not."""

    trace_id: str
    problem_id: str
    sample_index: int
    question: str
    gold_answer: str
    text: str  # the visible output (final answer part)
    reasoning: str | None = None  # separate reasoning field / <think> block, when the teacher has one
    predicted_answer: str | None = None
    correct: bool | None = None
    finish_reason: str | None = None
    truncated: bool = False
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    backend: str = ""
    model: str = ""
    source_id: str | None = None  # the problem's own id in the user's file, as written
    source: str | None = None  # the problem's benchmark (ProblemRecord.source; absent in older files)


class LabeledStepRecord(Record):
    """One step of one trace with its semantic signal."""

    trace_id: str
    problem_id: str
    step_index: int
    text: str
    prelabel: str | None = None  # keyword pre-label (paper: stage 1)
    cue: str | None = None  # the cue phrase that produced the pre-label
    signal: str
    source: str  # "llm" (validated or assigned by the LLM) | "keyword" | "fallback"
    rationale: str | None = None
    window: int = 0  # which label request of its trace labeled the step (a long trace: windows of steps)
    windows: int = 1  # label requests of its trace (0: keyword labels, no request)


class Step(Record):
    index: int
    signal: str
    text: str
    source: str


class ExampleRecord(Record):
    """One training/validation example: a labeled teacher trace (the dataset stage's row)."""

    trace_id: str
    problem_id: str
    split: str  # "train" | "validation"
    question: str
    gold_answer: str
    teacher_answer: str | None = None
    correct: bool | None = None
    steps: list[Step]
    signals: list[str]
    n_steps: int
    # added with the short-CoT baseline (nullable: absent in older files)
    answer_text: str | None = None  # the teacher's visible final answer text (after its reasoning block)
    source_id: str | None = (
        None  # the problem's own id in the user's file, as written (nullable: absent in older files)
    )
    source: str | None = None  # the problem's benchmark (ProblemRecord.source): its prompt family in a mix


class PredictionRecord(Record):
    """One model's answer to one evaluation problem."""

    model: str  # an evaluation model name (rscaffold.vocabulary.EVAL_MODELS): "base", "scaffolded", ...
    benchmark: str
    problem_id: str
    question: str
    gold_answer: str
    output: str
    predicted_answer: str | None = None
    correct: bool
    parsed: bool
    output_tokens: int
    signals: list[str]
    latency_s: float
    # added with multi-benchmark evaluation (all nullable: absent in older files)
    decoding: str | None = None  # "plain" | "guided"
    n_steps: int | None = None  # steps of the output (blank-line separated)
    consistent: bool | None = None  # see rscaffold.evaluation.check_consistency; None: not checked
    consistency_check: str | None = None  # which check decided `consistent` (None: not checked)
    consistency_evidence: str | None = None  # what was compared: the last computation, a verdict
    # per step of the output, where its signal came from: "gate" (committed by the gate), "free"
    # (emitted by the model's own decoding), "none" (no signal); None: not recorded (older files)
    signal_sources: list[str] | None = None


class MetricRecord(Record):
    """Aggregated score of one model on one benchmark."""

    model: str
    benchmark: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_output_tokens: float
    unparseable_rate: float
    # added with multi-benchmark evaluation (all nullable: absent in older files)
    consistency_checked: int | None = None  # predictions a consistency check applied to
    consistency_rate: float | None = None  # share of those found consistent
    mean_steps: float | None = None
    generated_signals: int | None = None  # signals that opened steps, over all outputs
    signal_tv: float | None = None  # TV distance, generated vs teacher signal shares
    transition_tv: float | None = None  # mean row-wise TV distance of signal transitions vs teacher
    transition_kl: float | None = None  # mean row-wise KL(teacher || generated, smoothed)
    transition_coverage: float | None = None  # teacher transition mass in the rows compared


# ---------------------------------------------------------------------------------------------

_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
}


def _arrow_type(annotation: Any) -> tuple[pa.DataType, bool]:
    """Map a type annotation to (arrow type, nullable)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation}")
        t, _ = _arrow_type(args[0])
        return t, True
    if origin is Literal:
        return pa.string(), False
    if origin is list:
        (inner,) = get_args(annotation)
        t, _ = _arrow_type(inner)
        return pa.list_(t), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(_fields(annotation)), False
    if annotation in _SCALARS:
        return _SCALARS[annotation], False
    raise TypeError(f"unsupported annotation {annotation!r}")


def _fields(model: type[BaseModel]) -> list[pa.Field]:
    hints = typing.get_type_hints(model)
    out = []
    for name in model.model_fields:
        t, nullable = _arrow_type(hints[name])
        out.append(pa.field(name, t, nullable=nullable))
    return out


def arrow_schema(model: type[Record]) -> pa.Schema:
    """The Arrow schema of a row type, with the record name and schema version as metadata."""
    return pa.schema(
        _fields(model),
        metadata={
            b"rscaffold.record": model.__name__.encode(),
            b"rscaffold.schema_version": str(SCHEMA_VERSION).encode(),
        },
    )


ARTIFACT_RECORDS: dict[str, type[Record]] = {
    "problems": ProblemRecord,
    "traces": TraceRecord,
    "labeled_steps": LabeledStepRecord,
    "examples": ExampleRecord,
    "predictions": PredictionRecord,
    "metrics": MetricRecord,
}
