"""The project's shared vocabulary, defined once: stage, benchmark and student names, the step
separator and the reasoning-block tags.

Everything that spells one of these (configs, loaders, reports, the decoder) imports it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

StageName = Literal["problems", "teacher", "labeling", "dataset", "training", "evaluation"]
STAGES: tuple[str, ...] = get_args(StageName)
"""The pipeline's stages, in the order they run."""

BenchmarkName = Literal["gsm8k", "math500", "strategyqa", "commonsenseqa", "truthfulqa"]
BENCHMARK_NAMES: tuple[str, ...] = get_args(BenchmarkName)
"""The five evaluation benchmarks, in the order reports list them."""

CUSTOM_FORMAT = "custom"
"""The format of a user's own problems: a file (JSONL, JSON, CSV, Parquet) or hub dataset with a
field mapping and an answer type (``problems.custom``, ``evaluation.benchmarks[].custom``)."""

TrainedStudentName = Literal["scaffolded", "cot_sft", "short_cot"]
TRAINED_STUDENTS: tuple[str, ...] = get_args(TrainedStudentName)
"""The students the training stage can train (``training.students``), in training order (the
method's student first, so an interrupted run has it):

* ``short_cot``: CoT distillation, plain SFT on the teacher's final answer text (what follows its
  reasoning block);
* ``cot_sft``: long-thinking distillation, plain SFT on the teacher's whole trace;
* ``scaffolded``: the Reasoning-Scaffolding student (signals + steps, dual objective)."""

StudentName = Literal["base", "short_cot", "cot_sft", "scaffolded"]
STUDENTS: tuple[str, ...] = get_args(StudentName)
"""The student models: the untrained base student and the trained ones, in the order reports
list them."""

EvalModelName = Literal[
    "base", "short_cot", "cot_sft", "scaffolded", "scaffolded-nogate", "scaffolded-noprune", "scaffolded-freefallback"
]
ALL_EVAL_MODELS: tuple[str, ...] = get_args(EvalModelName)
"""What the evaluation can compare (``evaluation.models``), in the order reports list them: the
students, and the scaffolded student decoded without one inference feature (ablations):
``scaffolded-nogate`` commits every predicted signal (no adaptive gating), ``scaffolded-noprune``
prunes no signal, ``scaffolded-freefallback`` lets free decoding after an uncommitted gate emit a
signal token."""

OPT_IN_EVAL_MODELS: tuple[str, ...] = ("scaffolded-freefallback",)
"""Evaluation models answered only when ``evaluation.models`` names them."""

EVAL_MODELS: tuple[str, ...] = tuple(m for m in ALL_EVAL_MODELS if m not in OPT_IN_EVAL_MODELS)
"""The default of ``evaluation.models`` (before it is narrowed to the trained students)."""

ABLATION_SUFFIXES: dict[str, str] = {"-nogate": "gate", "-noprune": "prune", "-freefallback": "fallback_guard"}
"""Evaluation model name suffix -> the inference feature it switches off."""


@dataclass(frozen=True)
class StudentKind:
    """What a student is, and what that implies.

    * ``target``: what its training completions hold: ``trace`` (the teacher's whole trace, as
      steps) or ``answer`` (the teacher's final answer text, what follows its reasoning block);
      None for the untrained base student;
    * ``scaffolded``: trained with a signal token before every step (the dual objective), so its
      steps carry signals;
    * ``decoding``: ``guided`` (signal-guided, with the gate and pruning) or ``plain``;
    * ``ablations``: the evaluation models that decode it with one inference feature switched off
      (suffixes of :data:`ABLATION_SUFFIXES`);
    * ``title``: what it is, in words (its model card's heading).
    """

    name: str
    title: str
    target: Literal["trace", "answer"] | None
    scaffolded: bool = False
    decoding: Literal["guided", "plain"] = "plain"
    ablations: tuple[str, ...] = ()


STUDENT_KINDS: dict[str, StudentKind] = {
    k.name: k
    for k in (
        StudentKind("base", "the untrained base student", None),
        StudentKind("short_cot", "short-CoT baseline (the teacher's final answer text)", "answer"),
        StudentKind("cot_sft", "long-thinking CoT-SFT baseline (the whole teacher trace)", "trace"),
        StudentKind(
            "scaffolded",
            "Reasoning-Scaffolding student (signals + steps)",
            "trace",
            scaffolded=True,
            decoding="guided",
            ablations=("-nogate", "-noprune", "-freefallback"),
        ),
    )
}
"""Every student kind, in the order reports list them: the one table of what a kind implies."""


def student_of(model: str) -> str:
    """The student an evaluation model name decodes with (``scaffolded-nogate`` -> ``scaffolded``)."""
    for suffix in ABLATION_SUFFIXES:
        if model.endswith(suffix):
            return model[: -len(suffix)]
    return model


def kind_of(model: str) -> StudentKind:
    """The kind of the student an evaluation model name decodes with."""
    return STUDENT_KINDS[student_of(model)]


def switched_off(model: str) -> set[str]:
    """The inference features an evaluation model name switches off (``scaffolded-nogate`` -> ``{"gate"}``)."""
    return {feature for suffix, feature in ABLATION_SUFFIXES.items() if model.endswith(suffix)}


if tuple(STUDENT_KINDS) != STUDENTS or {k for k in STUDENTS if STUDENT_KINDS[k].target} != set(TRAINED_STUDENTS):
    raise RuntimeError("STUDENT_KINDS must list the students of StudentName, with a target for each trained one")
if (*STUDENTS, *(k.name + s for k in STUDENT_KINDS.values() for s in k.ablations)) != ALL_EVAL_MODELS:
    raise RuntimeError("EvalModelName must list the students, then each kind's ablations")


STEP_SEPARATOR = "\n\n"
"""What separates two reasoning steps in the student's text: a blank line (the paper splits traces
at ``\\n\\n``). The training format joins steps with it."""

STEP_BOUNDARY = re.compile(r"\n[^\S\n]*\n")
"""The one step-boundary rule: a blank line (a newline, optional spaces or tabs, a newline). The
segmenter splits traces at it, no step of the dataset contains one, and the decoder ends a step at
the first one it generates (:func:`rscaffold.segment.split_at_step_boundaries`)."""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_TAG = re.compile(r"</?think\s*>", re.IGNORECASE)
"""An opening or closing reasoning tag (long-thinking teachers wrap their reasoning in them)."""
THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
"""A complete ``<think>...</think>`` block."""
