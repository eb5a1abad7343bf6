"""Pydantic configuration of every pipeline stage, and YAML loading/validation.

Every model forbids unknown keys, so a typo in a user's YAML stops the run before any stage
starts, with a message that names the field (see :func:`load_config`).

Relative paths inside a YAML file are resolved against the directory of that file, so a config
can be moved together with its data.
"""

from __future__ import annotations

import difflib
import os
import string
import textwrap
import typing
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rscaffold.paths import data_dir, default_model_dir
from rscaffold.vocabulary import (
    BENCHMARK_NAMES,
    CUSTOM_FORMAT,
    EVAL_MODELS,
    TRAINED_STUDENTS,
    BenchmarkName,
    EvalModelName,
    StudentName,
    TrainedStudentName,
    student_of,
)

BackendName = Literal["transformers", "openai", "vllm"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and the problem."""


# Marks a field that decides how a stage runs, not what it produces (concurrency, timeouts, batch
# and shard sizes, devices, failure thresholds): left out of every fingerprint (fingerprint_view).
EXECUTION: dict[str, Any] = {"execution": True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class BackendConfig(_Section):
    """Which LLM serves requests, and how to reach it.

    ``transformers``: ``model`` is a local directory or hub id (``gguf_file`` optional).
    ``openai``: any OpenAI-compatible server; ``model`` is the served model name, the key is read
    from the environment variable named by ``api_key_env`` (never from the config itself).
    ``vllm``: in-process ``vllm.LLM`` (install ``rscaffold[vllm]``).
    """

    backend: BackendName = Field(
        default="transformers",
        description="Which engine serves the requests: 'transformers' (local, CPU or one GPU), 'openai' (any OpenAI-compatible server: vllm serve, llama.cpp, SGLang, hosted APIs) or 'vllm' (in-process, pip install 'rscaffold[vllm]').",
    )
    model: str = Field(
        default_factory=lambda: str(default_model_dir()),
        description="transformers/vllm: a local model directory or hub id; openai: the served model name. Default: the SmolLM2-135M-Instruct that `rscaffold models fetch` prepares.",
    )
    gguf_file: str | None = Field(
        default=None, description="Load this GGUF file from the 'model' directory (transformers, vllm)."
    )
    tokenizer: str | None = Field(
        default=None, description="A separate tokenizer directory or hub id (default: the model's)."
    )
    # transformers / vllm
    device: str = Field(
        default="auto",
        description="transformers: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', ...",
        json_schema_extra=EXECUTION,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype for local backends; 'auto': bf16 on a GPU that supports it, else float32.",
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        description="transformers: sequences generated together; vllm: the minimum chunk handed to the engine.",
        json_schema_extra=EXECUTION,
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="vllm: GPUs one model is split over.", json_schema_extra=EXECUTION
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="vllm: share of GPU memory the engine may take.",
        json_schema_extra=EXECUTION,
    )
    # openai
    base_url: str | None = Field(
        default=None,
        description="openai: the endpoint, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL, else OpenAI's).",
        json_schema_extra=EXECUTION,
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="openai: the environment variable holding the API key (the key itself never goes in a config).",
        json_schema_extra=EXECUTION,
    )
    request_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="openai: seconds before one request times out (then it is retried).",
        json_schema_extra=EXECUTION,
    )
    max_retries: int = Field(
        default=5,
        ge=0,
        description="openai: retries of a request on 408/409/429/5xx, timeouts and dropped connections, with exponential backoff.",
        json_schema_extra=EXECUTION,
    )
    concurrency: int = Field(
        default=8, ge=1, description="openai: requests in flight at once.", json_schema_extra=EXECUTION
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) of the model; openai: a free tag that tells apart "
        "different models served under one name. Part of the request cache's key.",
    )
    price_per_million_prompt_tokens: float | None = Field(
        default=None,
        ge=0,
        description="For the cost estimate in stage summaries (your currency).",
        json_schema_extra=EXECUTION,
    )
    price_per_million_completion_tokens: float | None = Field(
        default=None, ge=0, description="For the cost estimate in stage summaries.", json_schema_extra=EXECUTION
    )

    @model_validator(mode="after")
    def _check_backend(self) -> BackendConfig:
        if self.backend == "openai" and not self.base_url and not os.environ.get("OPENAI_BASE_URL"):
            # The official endpoint is a legitimate default for the openai client, so this is not
            # an error; but a model name must be given explicitly for it.
            if self.model == str(default_model_dir()):
                raise ValueError("backend 'openai' needs 'model' (the served model name) and usually 'base_url'")
        return self


class SamplingConfig(_Section):
    max_new_tokens: int = Field(default=256, ge=1, description="Most tokens generated per request.")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    seed: int = Field(
        default=0, description="Run seed; each request's sampling seed derives from it and the request's identity."
    )


CustomAnswerType = Literal["number", "math", "yesno", "choice", "text"]


class FieldMapping(_Section):
    """Which field of a row holds what (a key of a JSON object, a CSV column, a Parquet or hub column;
    ``a.b`` reaches a nested object's field)."""

    question: str = Field(default="question", description="The field holding the question text.")
    question_template: str | None = Field(
        default=None,
        description="A question built from several fields instead: a template over field names, e.g. "
        "'{Body} {Question}' or '{context}\\n\\nQuestion: {question}' ({{ and }} for literal braces).",
    )
    answer: str = Field(
        default="answer",
        description="The field holding the gold final answer (number: a number; yesno: true/false or yes/no; "
        "choice: the option's letter, its text, or a 0-based index; math, text: the answer text).",
    )
    solution: str | None = Field(
        default=None, description="The field holding a worked solution, if any (kept as gold_solution)."
    )
    options: str | list[str] | None = Field(
        default=None,
        description="choice only: one field holding the list of options, or a list of fields with one option each "
        "(e.g. [A, B, C, D] columns of a CSV).",
    )
    id: str | None = Field(
        default=None,
        description="The field holding a stable id (problem ids become '<name>-<id>'); default: the row's position.",
    )

    @field_validator("question_template")
    @classmethod
    def _check_question_template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(v) if name is not None]
        except ValueError as err:
            raise ValueError(f"question_template {v!r}: {err}; write a literal brace as {{{{ or }}}}") from None
        if not names or any(not n.strip() or n.strip().isdigit() for n in names):
            raise ValueError(f"question_template {v!r} needs named fields, e.g. '{{Body}} {{Question}}'")
        return v

    @model_validator(mode="after")
    def _one_question_source(self) -> FieldMapping:
        if self.question_template is not None and "question" in self.model_fields_set:
            raise ValueError("give either question (one field) or question_template (several), not both")
        return self


class CustomFormat(_Section):
    """A user's own problem set: field mapping and answer type (``format: custom``).

    The answer type selects the prompt and the answer checker: ``number`` (a numeric final answer,
    GSM8K-style prompt), ``math`` (an expression, checked with math-verify, MATH-style prompt),
    ``yesno``, ``choice`` (options listed as ``A. ...`` lines, answered by letter) and ``text`` (a
    short free-text answer, compared after lower-casing and removing punctuation and articles).
    """

    name: str = Field(
        default="custom",
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="What the problem set is called: the prefix of its problem ids and the benchmark's name in reports.",
    )
    answer_type: CustomAnswerType = Field(
        description="number, math (an expression), yesno, choice or text: selects the prompt and the answer checker."
    )
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Which field holds what.")

    @model_validator(mode="after")
    def _check(self) -> CustomFormat:
        if self.name in BENCHMARK_NAMES:
            raise ValueError(f"name {self.name!r} is a built-in benchmark; use that format, or another name")
        if self.answer_type == "choice" and not self.fields.options:
            raise ValueError("answer_type 'choice' needs fields.options (the field(s) holding the options)")
        if self.answer_type != "choice" and self.fields.options:
            raise ValueError(f"fields.options is only for answer_type 'choice' (got {self.answer_type!r})")
        return self


def _check_custom(fmt: str, custom: CustomFormat | None, what: str) -> None:
    if fmt == CUSTOM_FORMAT and custom is None:
        raise ValueError(f"{what} 'custom' needs a 'custom' section (answer_type and fields)")
    if fmt != CUSTOM_FORMAT and custom is not None:
        raise ValueError(f"a 'custom' section needs {what} 'custom' (got {fmt!r})")


class ProblemsConfig(_Section):
    """Where the training and evaluation problems come from.

    ``train`` / ``eval`` are a local file (GSM8K-format JSONL: ``question`` and ``answer`` ending in
    ``#### <final>``) or ``hub:<dataset id>[:<split>]`` (for example ``hub:openai/gsm8k:test``),
    which needs network access to the Hugging Face hub. ``format: custom`` reads your own problems
    (JSONL, JSON array, CSV, Parquet or a hub dataset) through the ``custom`` field mapping.
    """

    format: BenchmarkName | Literal["custom"] = Field(
        default="gsm8k",
        description="The benchmark family of the problems (its file format, answer checker and prompt), or 'custom': "
        "your own file with the field mapping and answer type of 'custom'.",
    )
    custom: CustomFormat | None = Field(
        default=None, description="format 'custom': the problem set's name, answer type and field mapping."
    )
    train: str = Field(
        default_factory=lambda: str(data_dir() / "problems" / "train.jsonl"),
        description="Training problems: a local file in the format's layout, or hub:<dataset id>[@<config>][:<split>] (needs the hub). Default: the built-in set.",
    )
    eval: str = Field(
        default_factory=lambda: str(data_dir() / "problems" / "eval.jsonl"),
        description="Evaluation problems (same forms as 'train'). Default: the built-in set.",
    )
    limit_train: int | None = Field(
        default=None, ge=1, description="Use a seeded subsample of this many training problems."
    )
    limit_eval: int | None = Field(
        default=None, ge=1, description="Use a seeded subsample of this many evaluation problems."
    )
    seed: int = Field(default=0, description="Seed of the subsamples and of the held-out part.")
    part: Literal["auto", "all", "train"] = Field(
        default="auto",
        description="Which training problems: 'all'; 'train': all but the held-out share (heldout_fraction, by a seeded "
        "hash of the problem id, the complement of an evaluation part 'heldout' with the same seed and fraction); "
        "'auto': 'train' when the training file is also evaluated (problems.eval or an evaluation benchmark reads "
        "it), else 'all'. With part 'train', an eval file that is the training file gives its held-out part.",
    )
    heldout_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of a file held out from training for part 'train'."
    )
    on_overlap: Literal["fail", "remove"] = Field(
        default="fail",
        description="When an evaluation problem's question (lower-cased, punctuation and spacing normalised) is also "
        "a training question: 'fail' stops the problems stage naming the counts and examples; 'remove' drops those "
        "problems from the evaluation (counted in the problems manifest and the evaluation report).",
    )

    @model_validator(mode="after")
    def _check_format(self) -> ProblemsConfig:
        _check_custom(self.format, self.custom, "format")
        return self


# The answer-format instruction comes from the benchmark family's prompt template.
DEFAULT_SYSTEM_PROMPT = "You are a careful tutor. Think step by step. Put a blank line between steps."


ShardSize = Annotated[int, Field(ge=1)] | Literal["auto"]

AUTO_SHARD_SIZE: dict[str, int] = {"vllm": 512}
"""``shard_size: auto`` per backend: a GPU engine batches continuously, so a shard (one engine call)
must hold enough sequences to fill it; the CPU backends and remote APIs take small shards, which
resume at a fine grain."""
DEFAULT_SHARD_SIZE = 8
ENGINE_MIN_SHARD = 64
"""Fewer sequences per shard than this on a GPU engine draws a warning."""


def shard_size_for(size: int | str, backend: str | None) -> int:
    """A ``shard_size`` setting as a number: 'auto' follows the backend (:data:`AUTO_SHARD_SIZE`)."""
    if size == "auto":
        return AUTO_SHARD_SIZE.get(backend or "", DEFAULT_SHARD_SIZE)
    return int(size)


class TeacherConfig(_Section):
    llm: BackendConfig = Field(
        default_factory=BackendConfig, description="The teacher model and the engine that serves it."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Decoding of the teacher's traces.")
    samples_per_problem: int = Field(default=1, ge=1, description="Traces generated per training problem.")
    system_prompt: str = Field(default=DEFAULT_SYSTEM_PROMPT, description="The teacher's system message ('' for none).")
    prompt_template: str | None = Field(
        default=None,
        description="User prompt with '{question}'; None: the template of the problems' benchmark family "
        "(math: 'The answer is' + the number, yes/no, multiple-choice letter).",
    )
    keep: Literal["finished", "correct", "all"] = Field(
        default="finished",
        description="Which traces go on to labeling: 'finished' successful ones that ended before the token limit "
        "(finish reason not 'length', no unclosed reasoning block), 'correct' finished ones whose answer checks "
        "out, or 'all' successful ones, cut-off ones included (students then learn unfinished reasoning).",
    )
    shard_size: ShardSize = Field(
        default="auto",
        description="Traces per persisted shard (the unit of resume, and of one engine call for a local backend); "
        "'auto': 512 for vllm (enough sequences to keep a GPU engine's continuous batching full), 8 otherwise.",
        json_schema_extra=EXECUTION,
    )
    max_failure_rate: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Fail the stage (after saving the finished traces) when a larger share of requests failed.",
        json_schema_extra=EXECUTION,
    )

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str | None) -> str | None:
        if v is not None and "{question}" not in v:
            raise ValueError("prompt_template must contain '{question}'")
        return v


class SegmentationConfig(_Section):
    """How a trace is split into steps (the paper splits at blank lines)."""

    split_on_discourse_turns: bool = Field(
        default=False,
        description="Also split a paragraph before discourse turns ('Wait,', 'But', 'Alternatively', ...).",
    )
    min_chars: int = Field(default=8, ge=0, description="Merge a piece shorter than this into its neighbour.")
    max_chars: int = Field(default=1200, ge=50, description="Split a step longer than this at sentence ends.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Most steps per trace (None: no cap, as in the paper); the tail is joined into the last step, its paragraphs by single line breaks (a step never holds a blank line, the step boundary).",
    )


class LabelingConfig(_Section):
    taxonomy: str = Field(
        default_factory=lambda: str(data_dir() / "signals.yaml"),
        description="The signal taxonomy YAML (names, tokens, definitions, cue words). Default: data/signals.yaml.",
    )
    method: Literal["llm", "keyword"] = Field(
        default="llm",
        description="'llm': keyword pre-labels validated and completed by an LLM (the paper's two stages); 'keyword': pre-labels only, the default signal elsewhere.",
    )
    llm: BackendConfig | None = Field(default=None, description="Labeler LLM; None means the teacher's backend.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_new_tokens=160),
        description="Decoding of the labeler's answers; max_new_tokens is the least answer budget: a request "
        "labeling more steps than fit it gets the budget its answer needs.",
    )
    retries_on_invalid: int = Field(
        default=1,
        ge=0,
        description="Retries of a trace whose answer fails validation (the error is quoted back), before the keyword fallback.",
    )
    stop_after_nonconforming: int = Field(
        default=4,
        ge=0,
        description="Stop the stage when this many answers in a row ignore the JSON schema the labeler asked the "
        "server for (response_format): a server that ignores structured output. 0: never stop.",
        json_schema_extra=EXECUTION,
    )
    with_rationale: bool = Field(
        default=False, description="Ask for a short rationale per label (JSON answers only; costs output tokens)."
    )
    context_tokens: int = Field(
        default=8192,
        ge=512,
        description="The labeler's context window in tokens (default: SmolLM2's 8192): a request's prompt, every "
        "step shown whole (counted with the labeler's tokenizer where it is local), and its answer budget stay "
        "within it; a trace that does not fit is labeled in windows of consecutive steps.",
    )
    chars_per_token: float = Field(
        default=2.0,
        gt=0,
        description="Without the labeler's tokenizer on this machine (an OpenAI-compatible server): prompt characters "
        "per token in that estimate (SmolLM2: English reasoning about 3, math-heavy steps 1.3-2.4).",
    )
    max_window_steps: int = Field(
        default=64,
        ge=1,
        description="Most steps one request labels; a longer trace is labeled in windows of consecutive steps "
        "(merged in order; a window the labeler fails falls back alone).",
    )
    window_context_chars: int = Field(
        default=1200,
        ge=0,
        description="Characters of the preceding steps a window after the first shows as context (not labeled).",
    )
    segmentation: SegmentationConfig = Field(
        default_factory=SegmentationConfig, description="How traces are split into steps."
    )
    shard_size: ShardSize = Field(
        default="auto",
        description="Traces per labeling batch and persisted shard (the unit of resume); 'auto': 512 when the "
        "labeler runs on vllm, 8 otherwise.",
        json_schema_extra=EXECUTION,
    )
    max_fallback_rate: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="With method 'llm': fail the stage (after saving the labels) when a larger share of traces fell back to keyword labels.",
        json_schema_extra=EXECUTION,
    )
    degenerate_kappa: float = Field(
        default=0.2,
        ge=-1,
        le=1,
        description="Quality gate: the LLM labels are reported as degenerate (console, quality.md, Prefect artifact) when their Cohen's kappa against the keyword pre-labels is below this.",
    )
    degenerate_index_lambda: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Quality gate: the LLM labels are reported as degenerate when the step index predicts them this well (Goodman-Kruskal lambda of label given step index; 1: every position has one label, as when labels collapse to the taxonomy's order).",
    )
    degenerate_order_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Quality gate: the LLM labels are reported as degenerate when at least this share of them is the taxonomy's signal at the step's position (step 1 the first signal, step 2 the second, ...), the collapse of a labeler that ignores the text.",
    )
    min_kappa: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="Fail the stage (labels and quality report saved) when the kappa against the keyword pre-labels is below this. None: report only.",
    )
    max_index_lambda: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Fail the stage (labels and quality report saved) when the step-index lambda is above this. None: report only.",
    )
    max_order_share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fail the stage (labels and quality report saved) when the share of labels in the taxonomy's order is above this. None: report only.",
    )


class DatasetConfig(_Section):
    validation_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of problems (not traces) held out as the validation split."
    )
    seed: int = Field(default=0, description="Seed of the split.")
    min_steps: int = Field(default=1, ge=1, description="Drop traces with fewer steps.")
    only_correct: bool = Field(default=False, description="Keep only traces whose answer is correct.")


class TinyModelConfig(_Section):
    """A random-init model built from a config (tests, smoke runs): a Llama with tied embeddings
    (SmolLM2's shape) or a Qwen2 with untied embeddings and a padded vocabulary (Qwen2.5-7B/14B's
    shape), at any size."""

    architecture: Literal["llama", "qwen2"] = Field(
        default="llama", description="'llama' (LlamaForCausalLM) or 'qwen2' (Qwen2ForCausalLM)."
    )
    tie_word_embeddings: bool = Field(
        default=True, description="One matrix for input embeddings and LM head (False: two, as in Qwen2.5-7B/14B)."
    )
    vocab_padding: int = Field(
        default=0,
        ge=0,
        description="Embedding rows beyond the tokenizer's entries (Qwen2.5 pads its vocabulary; new tokens then land in padding rows).",
    )

    hidden_size: int = Field(default=64, description="Hidden size of the tiny model.")
    intermediate_size: int = Field(default=128, description="MLP size.")
    num_hidden_layers: int = Field(default=2, description="Decoder layers.")
    num_attention_heads: int = Field(default=4, description="Attention heads.")
    num_key_value_heads: int = Field(default=2, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(default=1024, description="Longest sequence.")
    seed: int = Field(default=0, description="Seed of the random initialisation.")


class LoraSettings(_Section):
    r: int = Field(default=16, description="LoRA rank.")
    alpha: int = Field(default=32, description="LoRA scaling (alpha / r).")
    dropout: float = Field(default=0.05, description="Dropout on the LoRA path.")
    target_modules: list[str] | str = Field(
        default="all-linear", description="Modules that get adapters ('all-linear' or a list of names)."
    )


LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
]

# The trainer arguments (TRL's SFTConfig / transformers' TrainingArguments) that rscaffold sets
# itself, and where a config sets them instead ("" when the pipeline decides: the data is
# tokenized, masked and truncated by rscaffold, checkpoints exist to resume, ...). training.args
# refuses them.
TRAINER_ARGS_SET_BY_RSCAFFOLD: dict[str, str] = {
    "output_dir": "",
    "resume_from_checkpoint": "",
    "save_strategy": "",
    "dataset_kwargs": "",
    "dataset_text_field": "",
    "remove_unused_columns": "",
    "packing": "",
    "completion_only_loss": "",
    "assistant_only_loss": "",
    "model_init_kwargs": "training.student_dtype, training.attn_implementation, training.load_in_4bit",
    "max_steps": "training.max_steps",
    "num_train_epochs": "training.epochs",
    "per_device_train_batch_size": "training.per_device_batch_size",
    "per_device_eval_batch_size": "training.per_device_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "learning_rate": "training.learning_rate",
    "lr_scheduler_type": "training.lr_scheduler",
    "warmup_ratio": "training.warmup_ratio",
    "warmup_steps": "training.warmup_steps, training.warmup_ratio",
    "weight_decay": "training.weight_decay",
    "logging_steps": "training.logging_steps",
    "save_steps": "training.save_steps",
    "seed": "training.seed",
    "data_seed": "training.seed",
    "bf16": "training.bf16",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "activation_checkpointing": "training.gradient_checkpointing",
    "report_to": "training.report_to",
    "padding_free": "training.padding_free",
    "max_length": "training.max_length",
}
# Trainer arguments in training.args that change how training runs (logging, progress bars, data
# loading workers, the experiment tracker's names, hub pushes of checkpoints) but not the trained
# weights: left out of the training fingerprint, like the EXECUTION fields.
EXECUTION_TRAINER_ARGS: tuple[str, ...] = (
    "disable_tqdm",
    "run_name",
    "project",
    "trackio_space_id",
    "trackio_bucket_id",
    "trackio_static_space_id",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "logging_first_step",
    "logging_nan_inf_filter",
    "logging_strategy",
    "include_num_input_tokens_seen",
    "skip_memory_metrics",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "ddp_timeout",
    "save_total_limit",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_token",
    "hub_private_repo",
    "hub_always_push",
    "hub_revision",
)


class TrainingConfig(_Section):
    student: str = Field(
        default_factory=lambda: str(default_model_dir()),
        description="The student to train: a local model directory or hub id. Default: the fetched SmolLM2-135M-Instruct.",
    )
    student_gguf_file: str | None = Field(
        default=None, description="Load the student from this GGUF file in the 'student' directory."
    )
    tokenizer: str | None = Field(
        default=None,
        description="A separate tokenizer directory or hub id (with 'tiny': whose vocabulary the tiny model gets).",
    )
    tiny: TinyModelConfig | None = Field(
        default=None, description="Build a tiny random-init Llama instead of loading 'student' (tests, smoke runs)."
    )
    signal_objective: Literal["token", "head"] = Field(
        default="token",
        description="'token': L_signal is the LM head restricted to the signal tokens (no extra parameters); 'head': a linear head on the hidden state at step boundaries.",
    )
    signal_loss_weight: float = Field(default=1.0, ge=0, description="lambda in L = L_step + lambda * L_signal")
    students: list[TrainedStudentName] = Field(
        default_factory=lambda: list(TRAINED_STUDENTS),
        description="The students to train on the same rows: 'scaffolded' (signals + steps, the method), 'short_cot' (CoT distillation: plain SFT on the teacher's final answer text, what follows its reasoning block) and 'cot_sft' (long-thinking distillation: plain SFT on the whole trace).",
    )
    max_steps: int | None = Field(
        default=20, ge=1, description="Optimizer steps per student. null: train for 'epochs' instead."
    )
    epochs: float | None = Field(
        default=None,
        gt=0,
        description="Train for this many epochs instead of max_steps (setting it alone makes max_steps null).",
    )
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: LrScheduler = Field(
        default="linear",
        description="Learning-rate schedule after the warm-up (transformers' lr_scheduler_type; its options "
        "go in args.lr_scheduler_kwargs).",
    )
    per_device_batch_size: int = Field(default=4, ge=1, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(
        default=512,
        ge=16,
        description="Longest training example in tokens (prompt + completion); 'truncation' decides what happens to a longer one.",
    )
    truncation: Literal["drop", "fail", "truncate_keep_end"] = Field(
        default="drop",
        description="What happens to a training example longer than max_length: 'drop' leaves it out, for every "
        "student (so all train on the same problems, each example whole, its ending and eos kept); 'fail' stops "
        "the training stage before any model is loaded; 'truncate_keep_end' keeps the prompt, the beginning and "
        "the end of the completion (final answer and eos) and cuts its middle. Counted per student in the "
        "metrics, the model card, the stage summary and the log.",
    )
    max_over_length_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Fail the training stage before any model is loaded when a larger share of a student's "
        "training examples is longer than max_length (dropped or truncated); 1: never.",
        json_schema_extra=EXECUTION,
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Share of the training steps with linear warm-up.")
    warmup_steps: int | None = Field(
        default=None, ge=1, description="Linear warm-up over this many steps (instead of warmup_ratio)."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    logging_steps: int = Field(
        default=5, ge=1, description="Log the losses every this many steps.", json_schema_extra=EXECUTION
    )
    save_steps: int = Field(
        default=10,
        ge=1,
        description="Save a checkpoint (to resume a killed run) every this many steps.",
        json_schema_extra=EXECUTION,
    )
    keep_checkpoints: bool = Field(
        default=False,
        description="Keep the intermediate checkpoints after the final model is saved (they exist to resume a killed run).",
        json_schema_extra=EXECUTION,
    )
    seed: int = Field(default=0, description="Training seed (initialisation of new parameters, data order).")
    bf16: Literal["auto", True, False] = Field(
        default="auto", description="bf16 mixed precision; 'auto': on a GPU that supports it."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less memory, slower)."
    )
    student_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32",
        description="dtype the student's weights are loaded (and trained) in; 'auto': the checkpoint's own. "
        "bfloat16 halves the memory of weights and optimizer state; bf16 mixed precision is 'bf16'.",
    )
    attn_implementation: str | None = Field(
        default=None,
        description="The student's attention kernel: 'sdpa', 'eager', 'flash_attention_2', a hub kernel such as "
        "'kernels-community/flash-attn2', ... (default: transformers' choice).",
    )
    load_in_4bit: bool = Field(
        default=False,
        description="QLoRA: load the student's base weights in 4 bit (bitsandbytes NF4, bf16 compute) and train "
        "LoRA adapters on them; needs 'lora', a CUDA GPU and pip install bitsandbytes.",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers that receive the training logs: wandb, trackio, tensorboard, mlflow, "
        "... (each must be installed; [] for none).",
        json_schema_extra=EXECUTION,
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other argument of TRL's SFTConfig / transformers' TrainingArguments (optim, max_grad_norm, "
        "lr_scheduler_kwargs, torch_compile, neftune_noise_alpha, ...), passed through as given. Keys rscaffold "
        "sets itself are refused (set their training.* field). Part of the training fingerprint, except "
        "logging, progress-bar, data-loader-worker and tracker keys (disable_tqdm, run_name, ...).",
        json_schema_extra={"execution_keys": EXECUTION_TRAINER_ARGS},
    )
    padding_free: bool = Field(
        default=False, description="Pack each batch into one row without padding (flash-attention varlen kernels)."
    )
    lora: LoraSettings | None = Field(
        default=None,
        description="Train LoRA adapters (peft) instead of all weights; the signal-token rows of the input embeddings and (untied) of the LM head are trained too; the saved student is merged.",
    )
    num_processes: int = Field(
        default=1,
        ge=1,
        description="Train on this many processes (GPUs) with `accelerate launch`, started by the training task; the "
        "effective batch is per_device_batch_size x processes x gradient_accumulation_steps.",
        json_schema_extra=EXECUTION,
    )
    num_machines: int = Field(
        default=1,
        ge=1,
        description="Machines of a multi-node launch (see accelerate's docs).",
        json_schema_extra=EXECUTION,
    )
    accelerate_config: str | None = Field(
        default=None,
        description="An accelerate config file for the launch (e.g. deployments/accelerate/fsdp.yaml); "
        "None: plain data parallelism (DDP) over num_processes.",
        json_schema_extra=EXECUTION,
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_max_steps(cls, data: Any) -> Any:
        # `epochs` given without `max_steps`: train by epochs (max_steps' default would win otherwise).
        if isinstance(data, dict) and data.get("epochs") is not None and "max_steps" not in data:
            data = {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _check_training(self) -> TrainingConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.max_steps and training.epochs (the other null)")
        if self.warmup_steps is not None and self.warmup_ratio:
            raise ValueError("set training.warmup_steps or training.warmup_ratio, not both")
        if self.load_in_4bit and self.lora is None:
            raise ValueError("training.load_in_4bit (QLoRA) trains LoRA adapters on the 4-bit base: set training.lora")
        if self.load_in_4bit and self.tiny is not None:
            raise ValueError("training.load_in_4bit needs a real student, not training.tiny")
        refused = {k: TRAINER_ARGS_SET_BY_RSCAFFOLD[k] for k in self.args if k in TRAINER_ARGS_SET_BY_RSCAFFOLD}
        if refused:
            raise ValueError(
                "; ".join(
                    f"training.args.{k} is set by rscaffold itself"
                    + (f" from {where}: set it there" if where else " (the pipeline decides it)")
                    for k, where in refused.items()
                )
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _train_baseline(cls, data: Any) -> Any:
        # The old switch 'train_baseline: false' (no baseline: only the scaffolded student) still reads.
        if isinstance(data, dict) and "train_baseline" in data:
            data = dict(data)
            if not data.pop("train_baseline"):
                data["students"] = ["scaffolded"]
        return data

    @field_validator("students")
    @classmethod
    def _unique_students(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("train at least one student")
        if len(set(v)) != len(v):
            raise ValueError(f"each student may be listed once: {v}")
        return [s for s in TRAINED_STUDENTS if s in v]  # one order (training order), one fingerprint


class GuidedInferenceConfig(_Section):
    """Signal-guided decoding of the scaffolded student (see :mod:`rscaffold.decoding.policy`).

    Gating and pruning (the paper's adaptive gating and pruning of non-essential steps) are on by
    default; the ablation rows ``scaffolded-nogate`` / ``scaffolded-noprune`` of
    ``evaluation.models`` switch one of them off, ``scaffolded-freefallback`` lets free decoding
    after an uncommitted gate emit a signal. The token budget is ``evaluation.max_new_tokens``,
    the same as plain decoding.
    """

    confidence_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Adaptive gating: commit the predicted signal when its probability is at least this, else decode the step freely. None: calibrated on the dataset's validation split (the threshold that maximises the number of correct minus calibration_precision x the number of committed teacher-forced next-signal predictions); 0: no gating (always commit).",
    )
    calibration_precision: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Calibration target: the gate commits where the student's predicted signal was right at least this often on the validation boundaries (0.5: more often right than wrong). Also the threshold when there is no validation data.",
    )
    prune_signals: list[str] | None = Field(
        default=None,
        description="Pruning: signals never committed (their steps are not started, their tokens suppressed). None: the taxonomy's non-essential signals (essential: false); []: no pruning.",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Most steps per answer; None: no bound but the token budget (evaluation.max_new_tokens).",
    )
    max_step_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Per-step safety cap in tokens (a step cut there is closed and the next one begins). None: the longest step of the student's training data (recorded in the evaluation manifest).",
    )
    fallback_may_emit_signal: bool = Field(
        default=False,
        description="Free decoding of a step the gate did not commit a signal to: false: signal tokens are suppressed in it (the step is text under no signal); true: it draws from the whole vocabulary, so a signal token of the model's own choosing may open the step (what the evaluation row 'scaffolded-freefallback' does).",
    )


class BenchmarkSource(_Section):
    """One benchmark the evaluation stage answers.

    ``source``: the published file, a directory holding it (directly or under ``<name>/``, e.g.
    a folder with all five benchmarks), or ``hub:<dataset id>[@<config>][:<split>]``.
    ``limit``: a seeded subsample of that many problems (``seed``); ``None`` falls back to
    ``evaluation.limit``. ``part``: ``heldout`` keeps the held-out share (``heldout_fraction``,
    by a seeded hash of the problem id) of a file that has no separate test split (StrategyQA's
    published file is its train split), ``train`` the rest, ``all`` everything.
    """

    name: BenchmarkName | Literal["custom"] = Field(
        description="Which benchmark: its file layout, answer checker and prompt; 'custom': your own problems "
        "(with 'custom')."
    )
    source: str = Field(
        description="The published file, a directory holding it (directly or under <name>/), or "
        "hub:<dataset id>[@<config>][:<split>]."
    )
    limit: int | None = Field(
        default=None, ge=1, description="A seeded subsample of this many problems (default: evaluation.limit)."
    )
    seed: int = Field(default=0, description="Seed of the subsample and of the held-out part.")
    part: Literal["all", "train", "heldout"] = Field(
        default="all",
        description="'heldout': the held-out share of a file that is a train split (StrategyQA); 'train': the rest; 'all': everything.",
    )
    heldout_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share held out for part 'heldout' (by a seeded hash of the problem id)."
    )
    custom: CustomFormat | None = Field(
        default=None, description="name 'custom': the problem set's name, answer type and field mapping."
    )

    @model_validator(mode="after")
    def _check_format(self) -> BenchmarkSource:
        _check_custom(self.name, self.custom, "name")
        return self

    @property
    def label(self) -> str:
        """The benchmark's name in reports: the built-in name, or the custom set's name."""
        return self.custom.name if self.custom is not None else self.name


def _check_placeholders(field: str, template: str, allowed: tuple[str, ...]) -> None:
    """``template`` formats with ``allowed`` placeholders (str.format): checked when the config
    loads, not when the stage that fills it starts."""
    try:
        template.format(**dict.fromkeys(allowed, "x"))
    except (KeyError, IndexError, ValueError) as err:
        names = ", ".join("{" + a + "}" for a in allowed)
        raise ValueError(
            f"{field} {template!r}: {err!r}; it may use {names}; write a literal brace as {{{{ or }}}}"
        ) from None


class StudentServerConfig(_Section):
    """A server the evaluation starts for each student it decodes through a server.

    ``command`` is formatted with ``{model_dir}`` (the student's directory), ``{port}``, ``{host}``
    and ``{model}`` (the name requests use: ``evaluation.llm.model``, default ``{model_dir}``)
    and run as a child process, without a shell; the evaluation waits until ``/health`` or
    ``/v1/models`` answers, sends the student's requests, and stops it.
    """

    command: str = Field(
        description="The server command, e.g. 'vllm serve {model_dir} --port {port} --logprobs-mode "
        "processed_logprobs' or 'transformers serve {model_dir} --port {port}'."
    )
    host: str = Field(default="127.0.0.1", description="Where the server listens.", json_schema_extra=EXECUTION)
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Its port (default: a free one).", json_schema_extra=EXECUTION
    )
    startup_timeout_s: float = Field(
        default=900.0, gt=0, description="Seconds to wait for it to answer.", json_schema_extra=EXECUTION
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables added for the server (e.g. CUDA_VISIBLE_DEVICES); recorded in the "
        "manifest like the rest of the config, so no secrets: the server inherits this process's environment.",
        json_schema_extra=EXECUTION,
    )

    @field_validator("command")
    @classmethod
    def _check_command(cls, v: str) -> str:
        _check_placeholders("evaluation.server.command", v, ("model_dir", "port", "host", "model"))
        return v


class EvaluationConfig(_Section):
    """The evaluation stage.

    ``benchmarks`` empty (the default): the problems stage's eval split, in ``problems.format``.
    Otherwise each listed benchmark is loaded and answered (its name must be unique).
    ``prompt``: ``benchmark`` sends each question through its benchmark family's prompt
    (:func:`rscaffold.prompts.benchmark_prompt`), the builder the teacher and the students'
    training data use, so a student is asked what it was trained on; ``question`` sends the bare
    question (an ablation). The system prompt is always the student's own.
    ``limit``: the first N eval problems (default source), or the per-benchmark default limit.
    Every model gets the same token budget ``max_new_tokens``, plain or guided decoding.
    """

    models: list[EvalModelName] = Field(
        default_factory=lambda: list(EVAL_MODELS),
        description="Which models answer, side by side (default: all that training.students gives): 'base' (the untrained student), the trained students of training.students ('short_cot', 'cot_sft', 'scaffolded'), and the scaffolded student's ablations 'scaffolded-nogate' (no adaptive gating: every predicted signal committed) and 'scaffolded-noprune' (no pruning of non-essential signals); on request only, 'scaffolded-freefallback' (free decoding after an uncommitted gate may emit a signal).",
    )
    benchmarks: list[BenchmarkSource] = Field(
        default_factory=list,
        description="Benchmarks to answer (each name once). Empty: the problems stage's eval split, as problems.format.",
    )
    prompt: Literal["benchmark", "question"] = Field(
        default="benchmark",
        description="'benchmark': the benchmark family's prompt (rscaffold.prompts.benchmark_prompt), the same builder the teacher and the students' training data use; 'question': the bare question (an ablation: not what the students were trained on).",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="At most this many problems per benchmark (the first N of the eval split, or each benchmark's default limit).",
    )
    max_new_tokens: int = Field(
        default=160,
        ge=1,
        description="Most output tokens per answer, the same for every model: plain decoding and signal-guided decoding (signal tokens included) share this budget.",
    )
    batch_size: int = Field(
        default=8, ge=1, description="Questions decoded together (plain and guided).", json_schema_extra=EXECUTION
    )
    kv_cache: bool = Field(
        default=True,
        description="Guided decoding keeps each question's KV cache across signal prediction, step generation "
        "and rounds (the same outputs under greedy decoding); false: re-encode the context at every step.",
        json_schema_extra=EXECUTION,
    )
    shard_size: int = Field(
        default=256,
        ge=1,
        description="Problems per persisted shard of one model's answers to one benchmark (the unit of resume, "
        "and of fan-out with run.task_runner: ray); best a multiple of batch_size.",
        json_schema_extra=EXECUTION,
    )
    guided: GuidedInferenceConfig = Field(
        default_factory=GuidedInferenceConfig,
        description="Signal-guided decoding of the scaffolded student (adaptive gating, pruning, step cap).",
    )
    llm: BackendConfig | None = Field(
        default=None,
        description="Where the students decode: none or backend 'transformers' (default): in this process; "
        "backend 'openai': through an OpenAI-compatible server (vllm serve, SGLang, ...), with the teacher's "
        "client, concurrency, retries and request cache; its 'model' may hold {student} and {model_dir}. "
        "With 'server' and no 'llm': openai with model '{model_dir}'.",
    )
    server: StudentServerConfig | None = Field(
        default=None,
        description="Start a server for each served student (otherwise evaluation.llm.base_url is one that runs).",
    )
    served_students: list[StudentName] | None = Field(
        default=None,
        description="The students decoded through the server (default: all of them); the others decode in this "
        "process (e.g. the scaffolded student on a server without logprobs).",
    )
    bootstrap_samples: int = Field(
        default=1000, ge=0, description="Resamples of the 95% percentile bootstrap interval of accuracy (0: none)."
    )
    seed: int = Field(default=0, description="Seed of the bootstrap.")

    @field_validator("benchmarks")
    @classmethod
    def _unique_benchmarks(cls, v: list[BenchmarkSource]) -> list[BenchmarkSource]:
        names = [b.label for b in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each benchmark may be listed once; repeated: {dup}")
        return v

    @model_validator(mode="after")
    def _check_serving(self) -> EvaluationConfig:
        if self.llm is not None and self.llm.backend == "vllm":
            raise ValueError(
                "evaluation.llm: backend 'vllm' (in-process) is not offered for students; serve them with "
                "backend 'openai' and evaluation.server.command 'vllm serve {model_dir} --port {port}'"
            )
        if self.server is not None and self.llm is not None and self.llm.backend != "openai":
            raise ValueError("evaluation.server needs evaluation.llm.backend 'openai' (or no evaluation.llm)")
        if self.llm is not None and self.llm.backend == "openai":
            _check_placeholders("evaluation.llm.model", self.llm.model, ("student", "model_dir"))
            if self.server is None and not self.llm.base_url:
                raise ValueError(
                    "evaluation.llm with backend 'openai' needs base_url (the server hosting the students) "
                    "or evaluation.server (a server the stage starts); the students are not sent to a default endpoint"
                )
        return self

    def served_llm(self) -> BackendConfig | None:
        """The backend of served students (None: every student decodes in this process)."""
        if self.llm is not None and self.llm.backend == "openai":
            return self.llm
        if self.server is not None:
            return BackendConfig(backend="openai", model="{model_dir}")  # base_url: the started server's
        return None

    def is_served(self, student: str) -> bool:
        return self.served_llm() is not None and (self.served_students is None or student in self.served_students)


class RaySettings(_Section):
    """Where the shards of the data-parallel stages run with ``run.task_runner: ray``."""

    address: str | None = Field(
        default=None,
        description="The Ray cluster: None starts a local one; 'auto' joins the cluster this machine belongs to; "
        "'ray://<head>:10001' a remote one (Ray Client).",
    )
    cpus_per_shard: float = Field(default=1, gt=0, description="CPUs Ray reserves for one shard task.")
    gpus_per_shard: float = Field(
        default=0, ge=0, description="GPUs Ray reserves for one shard task (1: one model replica per GPU)."
    )
    resources_per_shard: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources one shard task reserves (e.g. {'a100': 1} to keep shards on the "
        "nodes started with that resource).",
    )
    init_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of ray.init (e.g. runtime_env, num_cpus)."
    )


class RunSettings(_Section):
    # Relative to the working directory (not to the config file), like any output location.
    artifacts_dir: str = Field(
        default="artifacts",
        description="Root of the content-addressed stage outputs; relative to the working directory (not to the config file).",
    )
    retries: int = Field(default=1, ge=0, description="Prefect retries of a failed stage task.")
    retry_delay_s: float = Field(default=2.0, ge=0, description="Seconds between retries.")
    wait_for_locks: bool = Field(
        default=True,
        description="When another run is writing a stage of the same artifacts directory, wait for it "
        "(then reuse its output); false: fail at once, naming the holder (rscaffold run --no-wait).",
    )
    task_runner: Literal["local", "ray"] = Field(
        default="local",
        description="'local': each stage runs as one task here; 'ray': teacher generation, labeling and "
        "evaluation run one Prefect task per shard on a Ray cluster (prefect-ray; pip install 'rscaffold[ray]'), "
        "then assemble here.",
    )
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster for task_runner 'ray'.")
    isolate_model_stages: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Run a stage that loads a model in a child process (spawned), whose exit returns all its "
        "memory (vLLM does not give GPU memory back in-process): 'auto' for stages with a local model "
        "(teacher/labeler backend transformers or vllm, training, evaluation), 'always', 'never'.",
    )
    request_cache: Literal["use", "refresh", "off"] = Field(
        default="use",
        description="The LLM request cache under <artifacts_dir>/requests: 'use' answers every request it has seen "
        "from it; 'refresh' sends every request again and stores the new answer (rscaffold run --refresh-requests); "
        "'off' neither reads nor writes it.",
    )
    request_cache_store: Literal["sqlite", "files"] = Field(
        default="sqlite",
        description="How the request cache stores its entries: 'sqlite', one database file (WAL mode) for any "
        "number of entries, shared by processes on one host; 'files', one JSON file per request, for a cache "
        "shared by several machines (NFS, a mounted bucket), where SQLite's locking does not hold. The sqlite "
        "store also reads (and copies in) entries an earlier 'files' store left.",
    )
    lock_timeout_s: float | None = Field(
        default=None, ge=0, description="Give up waiting for another run's stage lock after this many seconds."
    )
    server_start_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a command-line run waits for its temporary Prefect server to answer (without "
        "PREFECT_API_URL) before giving up; unset: $RSCAFFOLD_SERVER_START_TIMEOUT_S, else 120.",
    )

    @property
    def artifacts_root(self) -> Path:
        """``artifacts_dir`` as an absolute path (``~`` expanded; a relative one against the current
        directory): the one place the artifacts root is resolved."""
        return Path(os.path.abspath(os.path.expanduser(self.artifacts_dir)))


class PipelineConfig(_Section):
    run: RunSettings = Field(
        default_factory=RunSettings, description="Where outputs go and how failed stages are retried."
    )
    problems: ProblemsConfig = Field(
        default_factory=ProblemsConfig, description="Stage 1: the training and evaluation problems."
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="Stage 2: the teacher and its reasoning traces."
    )
    labeling: LabelingConfig = Field(
        default_factory=LabelingConfig,
        description="Stage 3: splitting traces into steps and labeling each with a semantic signal.",
    )
    dataset: DatasetConfig = Field(
        default_factory=DatasetConfig, description="Stage 4: assembly of the training dataset."
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Stage 5: the students (scaffolded, and the baselines short-CoT and CoT-SFT).",
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Stage 6: benchmarks, decoding and scoring."
    )

    @model_validator(mode="after")
    def _check_across_sections(self) -> PipelineConfig:
        """What one section asks of another, checked before any stage starts."""
        trained = {"base", *self.training.students}
        if "models" not in self.evaluation.model_fields_set:
            # the default compares every model the trained students give: no error for a user who
            # only narrowed training.students
            self.evaluation.models = [m for m in EVAL_MODELS if student_of(m) in trained]
        missing = sorted({student_of(m) for m in self.evaluation.models} - trained)
        if missing:
            raise ValueError(
                f"evaluation.models needs the students {missing}, which training does not produce "
                f"(training.students: {self.training.students}); drop those models from evaluation.models "
                "or add the students to training.students"
            )
        for what, backend, size in (
            ("teacher", self.teacher.llm.backend, self.teacher_shard_size()),
            (
                "labeling",
                self.labeler_llm().backend if self.labeling.method == "llm" else None,
                self.labeling_shard_size(),
            ),
        ):
            if backend in AUTO_SHARD_SIZE and size < ENGINE_MIN_SHARD:
                warnings.warn(
                    f"{what}.shard_size {size} is small for the {backend} engine: it sees at most {size} sequences "
                    f"at a time, a small fraction of what fills a GPU; use 'auto' ({AUTO_SHARD_SIZE[backend]}) or "
                    f"at least {ENGINE_MIN_SHARD}",
                    stacklevel=2,
                )
        return self

    def labeler_llm(self) -> BackendConfig:
        return self.labeling.llm or self.teacher.llm

    def teacher_shard_size(self) -> int:
        """``teacher.shard_size``, with 'auto' resolved for the teacher's backend."""
        return shard_size_for(self.teacher.shard_size, self.teacher.llm.backend)

    def labeling_shard_size(self) -> int:
        """``labeling.shard_size``, with 'auto' resolved for the labeler's backend (none for keyword labels)."""
        backend = self.labeler_llm().backend if self.labeling.method == "llm" else None
        return shard_size_for(self.labeling.shard_size, backend)


# ---------------------------------------------------------------------------------------------
# loading

_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "problems": ("train", "eval"),
    "labeling": ("taxonomy",),
    "training": ("student", "tokenizer", "accelerate_config"),
}
_LLM_PATH_FIELDS = ("model", "tokenizer")


def _resolve(value: Any, base: Path) -> Any:
    """Resolve a relative local path against ``base``; leave hub ids and absolute paths alone."""
    if not isinstance(value, str) or value.startswith("hub:") or "://" in value:
        return value
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    candidate = base / p
    # A bare hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct" has no local counterpart; keep it.
    if (
        value.startswith((".", "~"))
        or candidate.exists()
        or value.endswith((".jsonl", ".yaml", ".json", ".csv", ".parquet"))
    ):
        return str(candidate.resolve())
    return value


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(raw)
    for section, keys in _PATH_FIELDS.items():
        sec = out.get(section)
        if isinstance(sec, dict):
            sec = dict(sec)
            for k in keys:
                if k in sec:
                    sec[k] = _resolve(sec[k], base)
            out[section] = sec
    for section in ("teacher", "labeling"):
        sec = out.get(section)
        if isinstance(sec, dict) and isinstance(sec.get("llm"), dict):
            llm = dict(sec["llm"])
            for k in _LLM_PATH_FIELDS:
                if k in llm:
                    llm[k] = _resolve(llm[k], base)
            out[section] = {**sec, "llm": llm}
    ev = out.get("evaluation")
    if isinstance(ev, dict) and isinstance(ev.get("benchmarks"), list):
        out["evaluation"] = {
            **ev,
            "benchmarks": [
                {**b, "source": _resolve(b["source"], base)} if isinstance(b, dict) and "source" in b else b
                for b in ev["benchmarks"]
            ],
        }
    return out


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The config keys next to the one at ``loc`` (the fields of the section holding it)."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_flat_keys(v, key + ".") if isinstance(v, dict) and v else [key])
    return out


def format_validation_error(err: ValidationError, overridden: Collection[str] = ()) -> str:
    """One line per error; an unknown key gets the closest known one as a suggestion, and a key
    that a command-line override (``overridden``: dotted keys of ``--set``) set says so."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        notes = []
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(e["loc"][-1]), _keys_at(e["loc"]), n=1)
            if close:
                notes.append(f"did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])}?")
        elif not isinstance(e.get("input"), dict):
            notes.append(f"got {e['input']!r}")
        origin = next((k for k in overridden if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")), None)
        if origin is not None:
            notes.insert(0, f"from --set {origin}")
        lines.append(f"  {loc}: {msg}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def config_from_dict(
    raw: dict[str, Any], base: Path | None = None, source: str = "<dict>", *, overridden: Collection[str] = ()
) -> PipelineConfig:
    """Validate ``raw``; ``overridden``: the dotted keys set on the command line (errors name them)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    if base is not None:
        raw = _resolve_paths(raw, base)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}:\n{format_validation_error(err, overridden)}") from None
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a YAML config (``None``: the built-in default, ``data/default.yaml``)."""
    path = Path(path) if path is not None else data_dir() / "default.yaml"
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if overrides:
        raw = deep_merge(raw, overrides)
        source = f"{path} with the command-line overrides"
    else:
        source = str(path)
    return config_from_dict(
        raw, base=path.parent.resolve(), source=source, overridden=_flat_keys(overrides) if overrides else ()
    )


def parse_assignments(assignments: list[str] | tuple[str, ...], base: Path | None = None) -> dict[str, Any]:
    """``["training.max_steps=200", "teacher.sampling.temperature=0.6"]`` as a nested override dict.

    Each value is read as YAML (``200`` an int, ``0.6`` a float, ``null``, ``[a, b]``, ``{r: 8}``,
    anything else a string), so it is typed and then validated exactly like the same key in a
    config file. Relative paths in it are resolved against ``base`` (the working directory of a
    command line), not against the config file's directory. Raises :class:`ConfigError` for an
    assignment that is not ``dotted.key=value``.
    """
    out: dict[str, Any] = {}
    for item in assignments:
        key, eq, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not eq or not key or any(not p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=200")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: the value is not valid YAML: {err}") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is also set to a value")
            node = child
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"--set {key}: keys below it are set too")
        node[parts[-1]] = deep_merge(node[parts[-1]], value) if isinstance(node.get(parts[-1]), dict) else value
    return _resolve_paths(out, base) if base is not None else out


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def check_inputs_exist(cfg: PipelineConfig) -> None:
    """Fail fast on local files the run will need (before any stage starts)."""
    problems: list[str] = []
    for name in ("train", "eval"):
        v = getattr(cfg.problems, name)
        if not v.startswith("hub:") and not Path(v).exists():
            problems.append(f"  problems.{name}: file not found: {v}")
    for i, b in enumerate(cfg.evaluation.benchmarks):
        if not b.source.startswith("hub:") and not Path(b.source).expanduser().exists():
            problems.append(f"  evaluation.benchmarks.{i}.source: file not found: {b.source}")
    if not Path(cfg.labeling.taxonomy).exists():
        problems.append(f"  labeling.taxonomy: file not found: {cfg.labeling.taxonomy}")

    for where, llm in (("teacher.llm", cfg.teacher.llm), ("labeling.llm", cfg.labeling.llm)):
        if llm is None or llm.backend == "openai":
            continue
        if _looks_local(llm.model) and not Path(llm.model).exists():
            problems.append(
                f"  {where}.model: model directory not found: {llm.model} "
                "(run `rscaffold models fetch` for the built-in SmolLM2-135M-Instruct)"
            )
    if cfg.training.tiny is None and _looks_local(cfg.training.student) and not Path(cfg.training.student).exists():
        problems.append(f"  training.student: model directory not found: {cfg.training.student}")
    if problems:
        raise ConfigError("the config points at missing inputs:\n" + "\n".join(problems))


def _looks_local(value: str) -> bool:
    # hub ids look like "org/name"; local paths are absolute or start with . or ~
    return value.startswith(("/", ".", "~")) or Path(value).is_absolute()


# ---------------------------------------------------------------------------------------------
# documentation


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section class of a field (``X`` or ``X | None``), else None."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), None)


def explain_config(cfg: BaseModel, indent: int = 0) -> str:
    """``cfg`` as YAML with every key's help text as a comment above it (``rscaffold show-config
    --explain``); the output loads back as the same config."""
    pad = " " * indent
    lines: list[str] = []
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        for line in textwrap.wrap(field.description or "", width=max(40, 100 - indent)):
            lines.append(f"{pad}# {line}")
        if isinstance(value, BaseModel) and _section_type(field.annotation) is not None:
            lines.append(f"{pad}{name}:")
            lines.append(explain_config(value, indent + 2))
            continue
        dumped = yaml.safe_dump({name: _plain(value)}, sort_keys=False, default_flow_style=False, width=1000)
        lines.extend(pad + ln for ln in dumped.rstrip("\n").splitlines())
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def fingerprint_view(section: BaseModel) -> dict[str, Any]:
    """A config section as it enters a fingerprint: its values, without the execution settings
    (fields marked :data:`EXECUTION`), recursively."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("execution"):
            continue
        value = getattr(section, name)
        if isinstance(value, dict) and extra.get("execution_keys"):
            value = {k: v for k, v in value.items() if k not in extra["execution_keys"]}
        if isinstance(value, BaseModel):
            out[name] = fingerprint_view(value)
        elif isinstance(value, list):
            out[name] = [fingerprint_view(v) if isinstance(v, BaseModel) else v for v in value]
        else:
            out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out
