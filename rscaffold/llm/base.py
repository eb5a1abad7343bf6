"""The one small interface every LLM backend implements (teacher and labeler alike)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rscaffold.config import SamplingConfig


@dataclass
class ChatRequest:
    """One chat completion to run. ``request_id`` is stable across re-runs (used for resume)."""

    request_id: str
    messages: list[dict[str, str]]
    # JSON schema the output must follow; backends constrain decoding where they can
    # (OpenAI response_format, vLLM guided decoding) and otherwise ignore it (caller validates).
    json_schema: dict[str, Any] | None = None
    n: int = 1  # samples for this request (vLLM / OpenAI ``n``); transformers loops
    # Output must be len(line_choices) lines, line i exactly one of line_choices[i]. Local
    # backends enforce it token by token (a closed-vocabulary answer even a tiny model gets
    # right in form); the others ignore it and rely on json_schema or the caller's parser.
    line_choices: list[list[str]] | None = None
    # The sampling seed of this request (sample ``k`` of an ``n > 1`` request uses ``seed + k``);
    # None: derived from the run seed and ``request_id``. Callers that resume work derive it
    # from what the request is (e.g. run seed, problem id, sample index), never from a counter.
    seed: int | None = None
    # A text completion (``/v1/completions``) of this exact prompt instead of a chat: the caller
    # has rendered the chat template (e.g. a student continuing its own partial answer); only
    # backends with ``Capabilities.raw_prompt`` take it. ``messages`` is then unused.
    prompt: str | None = None
    stop: list[str] | None = None  # stop strings (the stop string is not part of the text)
    logprobs: int | None = None  # ask for this many top log-probabilities per output token
    # Server-specific request fields sent as they are (e.g. vLLM's ``allowed_token_ids``,
    # ``stop_token_ids``, ``skip_special_tokens``); part of the request cache's key.
    options: dict[str, Any] | None = None


@dataclass
class Completion:
    """The result of one request (one sample). ``error`` is set when it failed."""

    request_id: str
    text: str = ""
    reasoning: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0
    sample_index: int = 0
    error: str | None = None
    # "transport": the server could not be reached or kept failing (connection errors, timeouts,
    # 429 / 5xx after the client's retries); "request": this request was refused or its answer
    # was unusable; "engine": a local engine failed on its batch.
    error_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


ResultCallback = Callable[[Completion], None]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can enforce while decoding (callers pick request shapes by it, and validate
    the answer either way).

    ``line_choices``: :attr:`ChatRequest.line_choices` is enforced token by token (the answer is
    always a valid set of lines). ``json_schema``: decoding is constrained to
    :attr:`ChatRequest.json_schema` (it may still fall back to unconstrained output on a server
    that rejects it). ``batch_invariant``: a request's output does not depend on the other
    requests sent with it (a server or engine that batches on its own), so a caller may hand over
    everything at once; a local batched engine is not (padding changes the numerics), and a
    caller that needs reproducible outputs hands it the same groups of requests every time.
    ``raw_prompt``: :attr:`ChatRequest.prompt` (a text completion of a rendered prompt) is served.
    """

    line_choices: bool = False
    json_schema: bool = False
    batch_invariant: bool = False
    raw_prompt: bool = False


@runtime_checkable
class LLMBackend(Protocol):
    name: str
    model_id: str
    capabilities: Capabilities

    def generate(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: ResultCallback | None = None,
    ) -> list[Completion]:
        """Run all requests; return one Completion per (request, sample), never raising for a
        single bad request (its Completion carries ``error``). ``on_result`` is called as each
        completion finishes so callers can persist work incrementally."""
        ...

    def close(self) -> None: ...
