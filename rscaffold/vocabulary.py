"""The project's shared vocabulary, defined once: stage, benchmark and student names, the step
separator and the reasoning-block tags.

Everything that spells one of these (configs, loaders, reports, the decoder) imports it from here.
"""

from __future__ import annotations

import re
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

StudentName = Literal["base", "cot_sft", "scaffolded"]
STUDENTS: tuple[str, ...] = get_args(StudentName)
"""The models the evaluation compares: the untrained student, the CoT-SFT baseline and the
scaffolded student, in the order reports list them."""

STEP_SEPARATOR = "\n\n"
"""What separates two reasoning steps: a blank line (the paper splits traces at ``\\n\\n``). The
segmenter, the training format and the decoder all use it."""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_TAG = re.compile(r"</?think\s*>", re.IGNORECASE)
"""An opening or closing reasoning tag (long-thinking teachers wrap their reasoning in them)."""
THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
"""A complete ``<think>...</think>`` block."""
