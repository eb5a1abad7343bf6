"""Benchmarks: loaders (published local files or the Hugging Face hub) and answer checking."""

from rscaffold.evalsets.answers import (
    ANSWER_TYPES,
    AnswerCheck,
    AnswerType,
    check_answer,
    choice_options,
    extract_answer,
    format_choice_question,
    is_correct,
)
from rscaffold.evalsets.loaders import (
    BENCHMARKS,
    Benchmark,
    BenchmarkFormatError,
    BenchmarkNotFoundError,
    HubSource,
    benchmark_for_record,
    get_benchmark,
    is_hub_source,
    load_problems,
    parse_hub_source,
)

__all__ = [
    "ANSWER_TYPES",
    "AnswerCheck",
    "AnswerType",
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkFormatError",
    "BenchmarkNotFoundError",
    "HubSource",
    "benchmark_for_record",
    "check_answer",
    "choice_options",
    "extract_answer",
    "format_choice_question",
    "get_benchmark",
    "is_correct",
    "is_hub_source",
    "load_problems",
    "parse_hub_source",
]
