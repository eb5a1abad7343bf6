"""The labeling section (stage 3): splitting traces into steps and labeling each with a signal."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rscaffold.config.base import EXECUTION, _Section
from rscaffold.config.llm import BackendConfig, SamplingConfig, ShardSize
from rscaffold.paths import data_dir


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
