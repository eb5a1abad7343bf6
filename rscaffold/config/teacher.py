"""The teacher section (stage 2): the teacher model and its reasoning traces."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rscaffold.config.base import EXECUTION, _Section
from rscaffold.config.llm import BackendConfig, SamplingConfig, ShardSize

# The answer-format instruction comes from the benchmark family's prompt template.
DEFAULT_SYSTEM_PROMPT = "You are a careful tutor. Think step by step. Put a blank line between steps."


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
