"""Pydantic configuration of every pipeline stage, and YAML loading/validation.

Every model forbids unknown keys, so a typo in a user's YAML stops the run before any stage
starts, with a message that names the field (see :func:`load_config`).

Relative paths inside a YAML file are resolved against the directory of that file, so a config
can be moved together with its data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

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
from rscaffold.vocabulary import BenchmarkName, StudentName

BackendName = Literal["transformers", "openai", "vllm"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class BackendConfig(_Section):
    """Which LLM serves requests, and how to reach it.

    ``transformers``: ``model`` is a local directory or hub id (``gguf_file`` optional).
    ``openai``: any OpenAI-compatible server; ``model`` is the served model name, the key is read
    from the environment variable named by ``api_key_env`` (never from the config itself).
    ``vllm``: in-process ``vllm.LLM`` (install ``rscaffold[vllm]``).
    """

    backend: BackendName = "transformers"
    model: str = Field(default_factory=lambda: str(default_model_dir()))
    gguf_file: str | None = None
    tokenizer: str | None = None
    # transformers / vllm
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=8, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # openai
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    concurrency: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _check_backend(self) -> BackendConfig:
        if self.backend == "openai" and not self.base_url and not os.environ.get("OPENAI_BASE_URL"):
            # The official endpoint is a legitimate default for the openai client, so this is not
            # an error; but a model name must be given explicitly for it.
            if self.model == str(default_model_dir()):
                raise ValueError("backend 'openai' needs 'model' (the served model name) and usually 'base_url'")
        return self


class SamplingConfig(_Section):
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0


class ProblemsConfig(_Section):
    """Where the training and evaluation problems come from.

    ``train`` / ``eval`` are a local file (GSM8K-format JSONL: ``question`` and ``answer`` ending in
    ``#### <final>``) or ``hub:<dataset id>[:<split>]`` (for example ``hub:openai/gsm8k:test``),
    which needs network access to the Hugging Face hub.
    """

    format: BenchmarkName = "gsm8k"
    train: str = Field(default_factory=lambda: str(data_dir() / "problems" / "train.jsonl"))
    eval: str = Field(default_factory=lambda: str(data_dir() / "problems" / "eval.jsonl"))
    limit_train: int | None = Field(default=None, ge=1)
    limit_eval: int | None = Field(default=None, ge=1)
    seed: int = 0


# The answer-format instruction comes from the benchmark family's prompt template.
DEFAULT_SYSTEM_PROMPT = "You are a careful tutor. Think step by step. Put a blank line between steps."


class TeacherConfig(_Section):
    llm: BackendConfig = Field(default_factory=BackendConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    samples_per_problem: int = Field(default=1, ge=1)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    prompt_template: str | None = Field(
        default=None,
        description="User prompt with '{question}'; None: the template of the problems' benchmark family "
        "(math: 'The answer is N.', yes/no, multiple-choice letter).",
    )
    keep: Literal["correct", "all"] = "all"
    shard_size: int = Field(default=8, ge=1)
    max_failure_rate: float = Field(default=0.5, ge=0, le=1)

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str | None) -> str | None:
        if v is not None and "{question}" not in v:
            raise ValueError("prompt_template must contain '{question}'")
        return v


class SegmentationConfig(_Section):
    """How a trace is split into steps (the paper splits at blank lines)."""

    split_on_discourse_turns: bool = False
    min_chars: int = Field(default=8, ge=0)
    max_chars: int = Field(default=1200, ge=50)
    max_steps: int = Field(default=64, ge=1)


class LabelingConfig(_Section):
    taxonomy: str = Field(default_factory=lambda: str(data_dir() / "signals.yaml"))
    method: Literal["llm", "keyword"] = "llm"
    llm: BackendConfig | None = Field(default=None, description="Labeler LLM; None means the teacher's backend.")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=160))
    retries_on_invalid: int = Field(default=1, ge=0)
    with_rationale: bool = False
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    shard_size: int = Field(default=8, ge=1)
    max_fallback_rate: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="With method 'llm': fail the stage (after saving the labels) when a larger share of traces fell back to keyword labels.",
    )


class DatasetConfig(_Section):
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    min_steps: int = Field(default=1, ge=1)
    only_correct: bool = False


class TinyModelConfig(_Section):
    """A random-init Llama-style model built from a config (tests, smoke runs)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0


class LoraSettings(_Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


class TrainingConfig(_Section):
    student: str = Field(default_factory=lambda: str(default_model_dir()))
    student_gguf_file: str | None = None
    tokenizer: str | None = None
    tiny: TinyModelConfig | None = None
    signal_objective: Literal["token", "head"] = "token"
    signal_loss_weight: float = Field(default=1.0, ge=0, description="lambda in L = L_step + lambda * L_signal")
    train_baseline: bool = True
    max_steps: int = Field(default=20, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    per_device_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=16)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    logging_steps: int = Field(default=5, ge=1)
    save_steps: int = Field(default=10, ge=1)
    keep_checkpoints: bool = Field(
        default=False,
        description="Keep the intermediate checkpoints after the final model is saved (they exist to resume a killed run).",
    )
    seed: int = 0
    bf16: Literal["auto", True, False] = "auto"
    gradient_checkpointing: bool = False
    padding_free: bool = False
    lora: LoraSettings | None = None


class GuidedInferenceConfig(_Section):
    """Signal-guided decoding of the scaffolded student (see :mod:`rscaffold.inference`)."""

    confidence_threshold: float = Field(default=0.0, ge=0, le=1)
    max_steps: int = Field(default=8, ge=1)
    max_step_tokens: int = Field(default=64, ge=1)
    prune_signals: list[str] = Field(default_factory=list)


class BenchmarkSource(_Section):
    """One benchmark the evaluation stage answers.

    ``source``: the published file, a directory holding it (directly or under ``<name>/``, e.g.
    a folder with all five benchmarks), or ``hub:<dataset id>[@<config>][:<split>]``.
    ``limit``: a seeded subsample of that many problems (``seed``); ``None`` falls back to
    ``evaluation.limit``. ``part``: ``heldout`` keeps the held-out share (``heldout_fraction``,
    by a seeded hash of the problem id) of a file that has no separate test split (StrategyQA's
    published file is its train split), ``train`` the rest, ``all`` everything.
    """

    name: BenchmarkName
    source: str
    limit: int | None = Field(default=None, ge=1)
    seed: int = 0
    part: Literal["all", "train", "heldout"] = "all"
    heldout_fraction: float = Field(default=0.2, gt=0, lt=1)


class EvaluationConfig(_Section):
    """The evaluation stage.

    ``benchmarks`` empty (the default): the problems stage's eval split, in ``problems.format``.
    Otherwise each listed benchmark is loaded and answered (its name must be unique).
    ``prompt``: ``benchmark`` wraps each question in the benchmark's answer-format instruction
    (:attr:`rscaffold.evalsets.loaders.Benchmark.prompt_template`, e.g. "... 'The answer is
    yes.' or 'The answer is no.'"); ``question`` sends the bare question, as in training. The
    system prompt is always the student's own (the one it was trained with).
    ``limit``: the first N eval problems (default source), or the per-benchmark default limit.
    """

    models: list[StudentName] = Field(default_factory=lambda: ["base", "cot_sft", "scaffolded"])
    benchmarks: list[BenchmarkSource] = Field(default_factory=list)
    prompt: Literal["benchmark", "question"] = "benchmark"
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=160, ge=1)
    batch_size: int = Field(default=8, ge=1)
    guided: GuidedInferenceConfig = Field(default_factory=GuidedInferenceConfig)
    bootstrap_samples: int = Field(default=1000, ge=0)
    seed: int = 0

    @field_validator("benchmarks")
    @classmethod
    def _unique_benchmarks(cls, v: list[BenchmarkSource]) -> list[BenchmarkSource]:
        names = [b.name for b in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each benchmark may be listed once; repeated: {dup}")
        return v


class RunSettings(_Section):
    # Relative to the working directory (not to the config file), like any output location.
    artifacts_dir: str = "artifacts"
    retries: int = Field(default=1, ge=0)
    retry_delay_s: float = Field(default=2.0, ge=0)


class PipelineConfig(_Section):
    run: RunSettings = Field(default_factory=RunSettings)
    problems: ProblemsConfig = Field(default_factory=ProblemsConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    def labeler_llm(self) -> BackendConfig:
        return self.labeling.llm or self.teacher.llm


# ---------------------------------------------------------------------------------------------
# loading

_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "problems": ("train", "eval"),
    "labeling": ("taxonomy",),
    "training": ("student", "tokenizer"),
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
    if value.startswith((".", "~")) or candidate.exists() or value.endswith((".jsonl", ".yaml", ".json", ".csv")):
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


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(
            f"  {loc}: {msg}"
            + (
                f" (got {e['input']!r})"
                if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
                else ""
            )
        )
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], base: Path | None = None, source: str = "<dict>") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    if base is not None:
        raw = _resolve_paths(raw, base)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}:\n{format_validation_error(err)}") from None
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
    return config_from_dict(raw, base=path.parent.resolve(), source=str(path))


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
