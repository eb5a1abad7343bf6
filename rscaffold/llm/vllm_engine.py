"""In-process vLLM (``vllm.LLM``): the fast teacher backend on one or several GPUs.

Install with ``pip install 'rscaffold[vllm]'``. vLLM does its own continuous batching, so requests
are handed to ``LLM.chat`` in large chunks; a chunk is also the unit of persistence (``on_result``
is called when a chunk finishes) and of failure (an exception fails the chunk's requests only).
The chunk size is ``max(cfg.batch_size, VLLM_MIN_CHUNK)``.

Request building and output parsing are pure functions (:func:`build_sampling_kwargs`,
:func:`parse_request_output`) so they are tested without vLLM installed.

Structured output for requests with a JSON schema uses ``StructuredOutputsParams(json=...)``
(``SamplingParams(structured_outputs=...)``, vLLM >= 0.10.2) and falls back to the older
``GuidedDecodingParams(json=...)`` (``SamplingParams(guided_decoding=...)``, removed in 0.12).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import Capabilities, ChatRequest, Completion, ResultCallback
from rscaffold.llm.parsing import (
    completion_from_output,
    describe_error,
    error_completions,
    request_seed,
)
from rscaffold.models import free_accelerator_memory

log = logging.getLogger(__name__)

MISSING_VLLM = "backend 'vllm' needs the vllm package: pip install 'rscaffold[vllm]'"
VLLM_MIN_CHUNK = 256
JSON_SCHEMA_KEY = "json_schema"  # keys of build_sampling_kwargs' output that are not SamplingParams fields
REGEX_KEY = "regex"


class VLLMUnavailableError(ImportError):
    pass


def import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise VLLMUnavailableError(MISSING_VLLM) from None
    return vllm


def build_sampling_kwargs(sampling: SamplingConfig, request: ChatRequest) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request.

    The seed is derived from the request id (stable across runs and resumes). A request's JSON
    schema is returned under ``"json_schema"``; :func:`make_sampling_params` turns it into the
    structured-output parameter of the installed vLLM version.
    """
    kw: dict[str, Any] = {
        "n": request.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "seed": request_seed(request, sampling.seed),
    }
    if request.line_choices:
        kw[REGEX_KEY] = line_choices_regex(request.line_choices)
    elif request.json_schema:
        kw[JSON_SCHEMA_KEY] = request.json_schema
    return kw


def line_choices_regex(line_choices: list[list[str]]) -> str:
    """A regex accepting exactly the lines of ``ChatRequest.line_choices`` (joined by newlines)."""
    return "\n".join("(" + "|".join(re.escape(c) for c in choices) + ")" for choices in line_choices)


def structured_output_kwargs(
    vllm_module: Any, schema: dict[str, Any] | None = None, regex: str | None = None
) -> dict[str, Any]:
    """``{"structured_outputs": StructuredOutputsParams(json=schema | regex=...)}`` on current
    vLLM, ``{"guided_decoding": GuidedDecodingParams(...)}`` on older ones, ``{}`` when neither
    exists (the caller then validates the unconstrained output)."""
    spec = {"regex": regex} if regex is not None else {"json": schema}
    sp = getattr(vllm_module, "sampling_params", None)
    cls = getattr(sp, "StructuredOutputsParams", None)
    if cls is not None:
        return {"structured_outputs": cls(**spec)}
    cls = getattr(sp, "GuidedDecodingParams", None)
    if cls is not None:
        return {"guided_decoding": cls(**spec)}
    return {}


def make_sampling_params(vllm_module: Any, kwargs: dict[str, Any]):
    """Build ``vllm.SamplingParams`` from :func:`build_sampling_kwargs` output."""
    kw = dict(kwargs)
    schema = kw.pop(JSON_SCHEMA_KEY, None)
    regex = kw.pop(REGEX_KEY, None)
    if schema is not None or regex is not None:
        try:
            kw.update(structured_output_kwargs(vllm_module, schema, regex))
        except Exception as err:  # an API shape we do not know: generate unconstrained
            log.warning("vLLM structured outputs unavailable (%s); generating without them", describe_error(err))
    try:
        return vllm_module.SamplingParams(**kw)
    except TypeError:
        # e.g. a version whose SamplingParams lacks the structured-output field
        for key in ("structured_outputs", "guided_decoding"):
            kw.pop(key, None)
        return vllm_module.SamplingParams(**kw)


def parse_request_output(
    output: Any, request_id: str, latency_s: float = 0.0, *, n: int | None = None
) -> list[Completion]:
    """``vllm.RequestOutput`` -> one Completion per sample (``outputs[i].index`` = sample index).

    Reads only ``prompt_token_ids`` and ``outputs[*].{index, text, token_ids, finish_reason}``.
    ``finish_reason`` "abort" or a missing sample becomes an error Completion.
    """
    prompt_ids = getattr(output, "prompt_token_ids", None)
    prompt_tokens = len(prompt_ids) if prompt_ids is not None else None
    results: list[Completion] = []
    seen: set[int] = set()
    for pos, sample in enumerate(getattr(output, "outputs", None) or []):
        index = getattr(sample, "index", pos)
        seen.add(index)
        token_ids = getattr(sample, "token_ids", None)
        finish = getattr(sample, "finish_reason", None)
        c = completion_from_output(
            request_id,
            index,
            getattr(sample, "text", ""),
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(token_ids) if token_ids is not None else None,
            latency_s=latency_s,
            extra={"stop_reason": getattr(sample, "stop_reason", None)}
            if getattr(sample, "stop_reason", None) is not None
            else None,
        )
        if finish == "abort":
            c.error = "generation aborted"
        results.append(c)
    for index in range(n or 0):
        if index not in seen:
            results.append(
                Completion(
                    request_id, sample_index=index, error="invalid response: sample missing", latency_s=latency_s
                )
            )
    results.sort(key=lambda c: c.sample_index)
    return results


class VLLMBackend:
    """:class:`~rscaffold.llm.base.LLMBackend` on an in-process ``vllm.LLM``."""

    name = "vllm"
    capabilities = Capabilities(
        line_choices=True, json_schema=True, batch_invariant=True
    )  # structured outputs (regex / JSON)

    def __init__(self, cfg: BackendConfig, llm: Any = None, vllm_module: Any = None):
        """``llm`` / ``vllm_module`` inject an engine and module (tests, or sharing one engine)."""
        self._vllm = vllm_module if vllm_module is not None else import_vllm()
        self.cfg = cfg
        self.model_id = cfg.model
        if llm is None:
            kwargs: dict[str, Any] = {
                "model": cfg.model,
                "tensor_parallel_size": cfg.tensor_parallel_size,
                "gpu_memory_utilization": cfg.gpu_memory_utilization,
                "seed": 0,
                "dtype": cfg.dtype,
            }
            if cfg.tokenizer:
                kwargs["tokenizer"] = cfg.tokenizer
            if cfg.gguf_file:
                # vLLM loads a GGUF from the file path itself; the tokenizer comes from cfg.tokenizer / the model dir.
                kwargs["model"] = f"{cfg.model.rstrip('/')}/{cfg.gguf_file}"
                kwargs.setdefault("tokenizer", cfg.model)
            llm = self._vllm.LLM(**kwargs)
        self.llm = llm

    def generate(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: ResultCallback | None = None,
    ) -> list[Completion]:
        results: list[Completion] = []
        chunk = max(self.cfg.batch_size, VLLM_MIN_CHUNK)
        for start in range(0, len(requests), chunk):
            part = list(requests[start : start + chunk])
            t0 = time.perf_counter()
            try:
                params = [make_sampling_params(self._vllm, build_sampling_kwargs(sampling, r)) for r in part]
                outputs = self.llm.chat([r.messages for r in part], sampling_params=params, use_tqdm=False)
                latency = time.perf_counter() - t0
                if len(outputs) != len(part):
                    raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(part)} requests")
                done = [c for r, o in zip(part, outputs) for c in parse_request_output(o, r.request_id, latency, n=r.n)]
            except Exception as err:  # isolate the failure to this chunk
                latency = time.perf_counter() - t0
                log.warning("vLLM chunk of %d requests failed: %s", len(part), describe_error(err))
                done = [
                    c
                    for r in part
                    for c in error_completions(
                        r.request_id, r.n, describe_error(err), latency_s=latency, error_kind="engine"
                    )
                ]
            for c in done:
                results.append(c)
                if on_result:
                    on_result(c)
        return results

    def close(self) -> None:
        self.llm = None
        free_accelerator_memory()
