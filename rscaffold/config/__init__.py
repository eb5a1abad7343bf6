"""Pydantic configuration of every pipeline stage, and YAML loading/validation.

Every model forbids unknown keys, so a typo in a user's YAML stops the run before any stage
starts, with a message that names the field (see :func:`load_config`).

Relative paths inside a YAML file are resolved against the directory of that file, so a config
can be moved together with its data.

One module per section (``run``, ``problems``, ``teacher``, ``labeling``, ``dataset``,
``training``, ``evaluation``; ``llm`` holds the backend and sampling settings the teacher, the
labeler and served students share), the root model :class:`PipelineConfig` in ``pipeline``,
loading in ``load``, the fingerprint view in ``fingerprint``, and what every section shares in
``base``. Every name is importable from ``rscaffold.config``.
"""

from __future__ import annotations

from rscaffold.config.base import EXECUTION, ConfigError
from rscaffold.config.dataset import DatasetConfig
from rscaffold.config.evaluation import (
    BenchmarkSource,
    EvaluationConfig,
    GuidedInferenceConfig,
    StudentServerConfig,
)
from rscaffold.config.fingerprint import fingerprint_view
from rscaffold.config.labeling import LabelingConfig, SegmentationConfig
from rscaffold.config.llm import (
    AUTO_SHARD_SIZE,
    DEFAULT_SHARD_SIZE,
    ENGINE_MIN_SHARD,
    BackendConfig,
    BackendName,
    SamplingConfig,
    ShardSize,
    shard_size_for,
)
from rscaffold.config.load import (
    check_inputs_exist,
    config_from_dict,
    deep_merge,
    explain_config,
    format_validation_error,
    load_config,
    parse_assignments,
)
from rscaffold.config.pipeline import PipelineConfig
from rscaffold.config.problems import CustomAnswerType, CustomFormat, FieldMapping, ProblemsConfig, ProblemSource
from rscaffold.config.run import RaySettings, RunSettings
from rscaffold.config.teacher import DEFAULT_SYSTEM_PROMPT, TeacherConfig
from rscaffold.config.training import (
    EXECUTION_TRAINER_ARGS,
    TRAINER_ARGS_SET_BY_RSCAFFOLD,
    LoraSettings,
    LrScheduler,
    TinyModelConfig,
    TrainingConfig,
)

__all__ = [
    "AUTO_SHARD_SIZE",
    "DEFAULT_SHARD_SIZE",
    "ENGINE_MIN_SHARD",
    "ShardSize",
    "shard_size_for",
    "DEFAULT_SYSTEM_PROMPT",
    "EXECUTION",
    "EXECUTION_TRAINER_ARGS",
    "TRAINER_ARGS_SET_BY_RSCAFFOLD",
    "BackendConfig",
    "BackendName",
    "BenchmarkSource",
    "ConfigError",
    "CustomAnswerType",
    "CustomFormat",
    "DatasetConfig",
    "EvaluationConfig",
    "FieldMapping",
    "GuidedInferenceConfig",
    "LabelingConfig",
    "LoraSettings",
    "LrScheduler",
    "PipelineConfig",
    "ProblemsConfig",
    "ProblemSource",
    "RaySettings",
    "RunSettings",
    "SamplingConfig",
    "SegmentationConfig",
    "StudentServerConfig",
    "TeacherConfig",
    "TinyModelConfig",
    "TrainingConfig",
    "check_inputs_exist",
    "config_from_dict",
    "deep_merge",
    "explain_config",
    "fingerprint_view",
    "format_validation_error",
    "load_config",
    "parse_assignments",
]
