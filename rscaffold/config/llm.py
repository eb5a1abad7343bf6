"""The LLM backend and sampling settings, shared by the teacher, the labeler and served students."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, model_validator

from rscaffold.config.base import EXECUTION, _Section
from rscaffold.paths import default_model_dir

BackendName = Literal["transformers", "openai", "vllm"]


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
