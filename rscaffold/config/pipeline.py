"""The root model: one config holding every section, and what one section asks of another."""

from __future__ import annotations

import warnings

from pydantic import Field, model_validator

from rscaffold.config.base import _Section
from rscaffold.config.dataset import DatasetConfig
from rscaffold.config.evaluation import EvaluationConfig
from rscaffold.config.labeling import LabelingConfig
from rscaffold.config.llm import AUTO_SHARD_SIZE, ENGINE_MIN_SHARD, BackendConfig, shard_size_for
from rscaffold.config.problems import ProblemsConfig
from rscaffold.config.run import RunSettings
from rscaffold.config.teacher import TeacherConfig
from rscaffold.config.training import TrainingConfig
from rscaffold.vocabulary import EVAL_MODELS, student_of


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
