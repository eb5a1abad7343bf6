"""The root model: one config holding every section, and what one section asks of another."""

from __future__ import annotations

from pydantic import Field, model_validator

from rscaffold.config.base import _Section
from rscaffold.config.dataset import DatasetConfig
from rscaffold.config.evaluation import EvaluationConfig
from rscaffold.config.labeling import LabelingConfig
from rscaffold.config.llm import BackendConfig
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
        return self

    def labeler_llm(self) -> BackendConfig:
        return self.labeling.llm or self.teacher.llm
