"""The dataset section (stage 4): assembly of the training dataset."""

from __future__ import annotations

from pydantic import Field

from rscaffold.config.base import _Section


class DatasetConfig(_Section):
    validation_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of problems (not traces) held out as the validation split."
    )
    seed: int = Field(default=0, description="Seed of the split.")
    min_steps: int = Field(default=1, ge=1, description="Drop traces with fewer steps.")
    only_correct: bool = Field(default=False, description="Keep only traces whose answer is correct.")
