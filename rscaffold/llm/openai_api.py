"""Any OpenAI-compatible chat-completions server (OpenAI, vLLM ``serve``, SGLang, llama.cpp,
``transformers serve``, hosted APIs).

Transport robustness is the ``openai`` client's: it retries 408/409/429/5xx, timeouts and
dropped connections ``cfg.max_retries`` times with exponential backoff (honouring
``Retry-After``), and times a request out after ``cfg.request_timeout_s``. This module adds:

- bounded concurrency (``asyncio.Semaphore(cfg.concurrency)``) on one event loop;
- per-request isolation: a request that still fails (HTTP 400, an invalid or empty response,
  retries exhausted) becomes error Completions, never an exception;
- fallbacks for servers that reject parts of the request with HTTP 400: ``response_format``
  (JSON-schema constrained output) is retried once without it, ``max_tokens`` is switched to
  ``max_completion_tokens`` and a rejected ``temperature``/``top_p``/``seed`` is dropped (newer
  OpenAI reasoning models); a fallback that works is kept for the rest of the backend's life;
- ``n`` samples per request; servers that ignore ``n`` (return fewer choices) are asked again
  for the missing ones, each with its own derived seed;
- reasoning: the ``reasoning_content`` / ``reasoning`` message field (vLLM, DeepSeek, SGLang,
  OpenRouter) and ``<think>`` blocks in the content both go to ``Completion.reasoning``;
- text completions (``/v1/completions``) for requests that carry a rendered ``prompt`` (a student
  continuing its own partial answer, :mod:`rscaffold.decoding.served`): the text is kept exactly as
  generated (empty included), with ``stop`` strings, top ``logprobs`` (in ``extra["top_logprobs"]``,
  one ``{token: logprob}`` per output token) and server-specific ``options`` (sent as extra body
  fields); the stop reason a server reports (vLLM's ``stop_reason``) is in ``extra["stop_reason"]``.

The API key is read from ``$<cfg.api_key_env>`` ("EMPTY" when unset, which local servers accept)
and is never logged; it is masked in any error text that would carry it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import Capabilities, ChatRequest, Completion, ResultCallback
from rscaffold.llm.parsing import (
    RATE_LIMITED,
    completion_from_output,
    describe_error,
    error_completions,
    request_seed,
)

log = logging.getLogger(__name__)

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
INVALID_RESPONSE = "invalid response"
# Sampling parameters some models reject with HTTP 400 (e.g. OpenAI reasoning models accept only
# the default temperature); when the error names one of them in quotes, it is dropped and retried.
DROPPABLE_PARAMS = ("temperature", "top_p", "seed")
INVALID_RETRY_BASE_S = 0.5  # the first wait before asking again after an invalid answer (doubling, at most 8 s)


class InvalidResponseError(ValueError):
    """The server answered 200 with something that is not a usable chat completion."""


def response_format_for(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``response_format`` argument that asks for output following ``schema``."""
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", str(schema.get("title") or "response"))[:64] or "response"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def message_reasoning(message: Any) -> str | None:
    """The separate reasoning field of a chat message, under any of its common names."""
    extra = getattr(message, "model_extra", None) or {}
    for key in ("reasoning_content", "reasoning"):
        value = getattr(message, key, None)
        if value is None:
            value = extra.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _text_completion(choice: Any, resp: Any, *, request_id: str, index: int, one: bool, latency: float) -> Completion:
    """A ``/v1/completions`` choice, its text exactly as generated (an empty text is an answer)."""
    text = getattr(choice, "text", None)
    if not isinstance(text, str):
        raise InvalidResponseError(f"{INVALID_RESPONSE}: expected a text completion, got {type(choice).__name__}")
    usage = getattr(resp, "usage", None)
    extra: dict[str, Any] = {"response_id": getattr(resp, "id", None)}
    stop_reason = getattr(choice, "stop_reason", None)
    if stop_reason is None:
        stop_reason = (getattr(choice, "model_extra", None) or {}).get("stop_reason")
    if stop_reason is not None:
        extra["stop_reason"] = stop_reason
    top = getattr(getattr(choice, "logprobs", None), "top_logprobs", None)
    if top is not None:
        extra["top_logprobs"] = [dict(t or {}) for t in top]
    return Completion(
        request_id,
        text=text,
        finish_reason=getattr(choice, "finish_reason", None),
        prompt_tokens=getattr(usage, "prompt_tokens", None),
        completion_tokens=getattr(usage, "completion_tokens", None) if one else None,
        latency_s=latency,
        sample_index=index,
        extra=extra,
    )


class OpenAIBackend:
    """:class:`~rscaffold.llm.base.LLMBackend` over an OpenAI-compatible HTTP API."""

    name = "openai"
    capabilities = Capabilities(
        json_schema=True, batch_invariant=True, raw_prompt=True
    )  # response_format json_schema, dropped if refused

    def __init__(self, cfg: BackendConfig):
        import openai  # core dependency; imported here so that importing the registry stays cheap

        self._openai = openai
        self.cfg = cfg
        self.model_id = cfg.model
        self._api_key = os.environ.get(cfg.api_key_env) or "EMPTY"
        if self._api_key == "EMPTY" and not self._is_local():
            log.warning("no API key in $%s; a remote server will probably answer 401", cfg.api_key_env)
        self._use_response_format = True
        self._max_tokens_param = "max_tokens"
        self._unsupported_params: set[str] = set()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    def _is_local(self) -> bool:
        url = self.cfg.base_url or os.environ.get("OPENAI_BASE_URL") or ""
        return any(h in url for h in _LOCAL_HOSTS)

    def _mask(self, text: str) -> str:
        if self._api_key != "EMPTY" and len(self._api_key) >= 6:
            text = text.replace(self._api_key, "***")
        return text

    def _client(self):
        return self._openai.AsyncOpenAI(
            base_url=self.cfg.base_url,
            api_key=self._api_key,
            max_retries=self.cfg.max_retries,
            timeout=self.cfg.request_timeout_s,
        )

    # -- one HTTP call, with the 400 fallbacks ------------------------------------------------
    async def _create(self, client, req: ChatRequest, sampling: SamplingConfig, *, n: int, seed: int):
        kwargs: dict[str, Any] = {"model": self.cfg.model, "temperature": sampling.temperature, "seed": seed}
        if req.prompt is not None:
            kwargs["prompt"] = req.prompt
            if req.stop:
                kwargs["stop"] = list(req.stop)
            if req.logprobs is not None:
                kwargs["logprobs"] = req.logprobs
            if req.options:
                kwargs["extra_body"] = dict(req.options)
        else:
            kwargs["messages"] = req.messages
        if sampling.top_p < 1.0:
            kwargs["top_p"] = sampling.top_p
        for name in self._unsupported_params:
            kwargs.pop(name, None)
        if n > 1:
            kwargs["n"] = n
        kwargs[self._max_tokens_param] = sampling.max_new_tokens
        if req.json_schema and self._use_response_format:
            kwargs["response_format"] = response_format_for(req.json_schema)
        tried_without_format = tried_other_max = False
        endpoint = client.completions if req.prompt is not None else client.chat.completions
        while True:
            try:
                resp = await endpoint.create(**kwargs)
            except self._openai.BadRequestError as err:
                msg = str(err)
                if "max_completion_tokens" in msg and "max_tokens" in kwargs and not tried_other_max:
                    tried_other_max = True
                    kwargs["max_completion_tokens"] = kwargs.pop("max_tokens")
                    if self._max_tokens_param != "max_completion_tokens":
                        log.warning("server wants 'max_completion_tokens' instead of 'max_tokens'; switching")
                        self._max_tokens_param = "max_completion_tokens"
                    continue
                rejected = [p for p in DROPPABLE_PARAMS if p in kwargs and f"'{p}'" in msg]
                if rejected:
                    for p in rejected:
                        kwargs.pop(p)
                        if p not in self._unsupported_params:
                            log.warning("server rejects parameter %r (HTTP 400); not sending it from now on", p)
                            self._unsupported_params.add(p)
                    continue
                if "response_format" in kwargs and not tried_without_format:
                    tried_without_format = True
                    kwargs.pop("response_format")
                    continue
                raise
            if tried_without_format and self._use_response_format:
                log.warning(
                    "server rejected response_format json_schema (HTTP 400) but accepted the request "
                    "without it; sending no response_format from now on (outputs are validated by the caller)"
                )
                self._use_response_format = False
            return resp

    def _describe(self, err: BaseException) -> str:
        """One line for ``Completion.error``, with the API key masked (before any cut)."""
        secrets = (self._api_key,) if self._api_key != "EMPTY" else ()
        if isinstance(err, InvalidResponseError):
            return self._mask(str(err))
        if isinstance(err, self._openai.RateLimitError):
            return f"{RATE_LIMITED} (HTTP 429 after {self.cfg.max_retries} retries): {describe_error(err, secrets=secrets)}"
        if isinstance(err, (ValueError, self._openai.APIResponseValidationError)):
            # undecodable JSON, a body that does not validate as a chat completion
            return f"{INVALID_RESPONSE}: {describe_error(err, secrets=secrets)}"
        return describe_error(err, secrets=secrets)

    def _is_invalid_response(self, err: BaseException) -> bool:
        """An answer with status 200 that is not a usable completion (undecodable JSON, a body that
        does not validate, no choices)."""
        return isinstance(err, (InvalidResponseError, self._openai.APIResponseValidationError)) or (
            isinstance(err, ValueError) and not isinstance(err, self._openai.APIError)
        )

    def _error_kind(self, err: BaseException) -> str:
        """``transport`` when the server could not be reached or kept failing after the client's
        retries (connection errors, timeouts, 408/409/429/5xx, answers that are not completions),
        else ``request``."""
        o = self._openai
        if self._is_invalid_response(err):
            return "transport"
        if isinstance(err, (o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return "transport"  # APITimeoutError is an APIConnectionError
        if isinstance(err, o.APIStatusError) and (err.status_code >= 500 or err.status_code in (408, 409, 429)):
            return "transport"
        return "request"

    def _parse(self, resp: Any, req: ChatRequest, start_index: int, *, latency: float) -> list[Completion]:
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list):
            kind = "text completion" if req.prompt is not None else "chat completion"
            raise InvalidResponseError(f"{INVALID_RESPONSE}: expected a {kind}, got {type(resp).__name__}")
        usage = getattr(resp, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        total_completion = getattr(usage, "completion_tokens", None)
        out: list[Completion] = []
        ordered = sorted(choices, key=lambda c: getattr(c, "index", 0) or 0)
        if req.prompt is not None:
            return [
                _text_completion(
                    choice,
                    resp,
                    request_id=req.request_id,
                    index=start_index + k,
                    one=len(ordered) == 1,
                    latency=latency,
                )
                for k, choice in enumerate(ordered[: req.n - start_index])
            ]
        for k, choice in enumerate(ordered[: req.n - start_index]):
            message = getattr(choice, "message", None)
            if message is None:
                out.append(
                    Completion(
                        req.request_id,
                        sample_index=start_index + k,
                        error=f"{INVALID_RESPONSE}: choice without message",
                        latency_s=latency,
                    )
                )
                continue
            extra = {"response_id": getattr(resp, "id", None)}
            if len(ordered) > 1 and total_completion is not None:
                extra["usage_completion_tokens_total"] = total_completion
            c = completion_from_output(
                req.request_id,
                start_index + k,
                message.content,
                finish_reason=getattr(choice, "finish_reason", None),
                reasoning_field=message_reasoning(message),
                prompt_tokens=prompt_tokens,
                completion_tokens=total_completion if len(ordered) == 1 else None,
                latency_s=latency,
                extra=extra,
            )
            refusal = getattr(message, "refusal", None)
            if c.error and refusal:
                c.error = f"refusal: {refusal}"
            out.append(c)
        return out

    # -- one request (all its samples) ------------------------------------------------------
    async def _run_request(
        self, client, sem, req: ChatRequest, *, sampling: SamplingConfig, on_result
    ) -> list[Completion]:
        got: list[Completion] = []
        async with sem:
            t0 = time.perf_counter()
            try:
                call = 0
                invalid = 0
                while len(got) < req.n:
                    seed = request_seed(req, sampling.seed, call)
                    try:
                        resp = await self._create(client, req, sampling, n=req.n - len(got), seed=seed)
                        parsed = self._parse(resp, req, len(got), latency=time.perf_counter() - t0)
                        if not parsed:
                            raise InvalidResponseError(f"{INVALID_RESPONSE}: no choices")
                    except Exception as err:
                        # A 200 whose body is not a completion is a server fault like a 5xx: asked
                        # again with the client's backoff (the client retries only by status code).
                        if not self._is_invalid_response(err) or invalid >= self.cfg.max_retries:
                            raise
                        invalid += 1
                        await asyncio.sleep(min(8.0, INVALID_RETRY_BASE_S * 2 ** (invalid - 1)))
                        continue
                    got.extend(parsed)
                    call += 1
            except Exception as err:  # isolate: this request fails, the run goes on
                error = self._describe(err)
                log.debug("request %s failed: %s", req.request_id, error)
                got.extend(
                    error_completions(
                        req.request_id,
                        req.n - len(got),
                        error,
                        latency_s=time.perf_counter() - t0,
                        start_index=len(got),
                        error_kind=self._error_kind(err),
                    )
                )
        # Outside the try: the caller's callback may raise, and that must stop the run.
        if on_result:
            for c in got:
                on_result(c)
        return got

    async def _generate_async(
        self, requests: Sequence[ChatRequest], sampling: SamplingConfig, on_result
    ) -> list[Completion]:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        async with self._client() as client:
            tasks = [
                asyncio.create_task(self._run_request(client, sem, r, sampling=sampling, on_result=on_result))
                for r in requests
            ]
            try:
                per_request = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [c for cs in per_request for c in cs]

    # -- LLMBackend ---------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: ResultCallback | None = None,
    ) -> list[Completion]:
        """Run all requests concurrently; ``on_result`` is called on the thread running the event
        loop (this thread, or a helper thread when this thread already runs a loop)."""
        if not requests:
            return []

        def run() -> list[Completion]:
            return asyncio.run(self._generate_async(requests, sampling, on_result))

        try:
            asyncio.get_running_loop()
            in_a_loop = True
        except RuntimeError:
            in_a_loop = False
        if not in_a_loop:  # outside the except block: its errors are not chained to "no running event loop"
            return run()
        # Called from async code (a running loop in this thread): asyncio.run would refuse, so the
        # requests get a loop of their own on a fresh thread, and this call blocks until done.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rscaffold-openai") as ex:
            return ex.submit(run).result()

    def close(self) -> None:
        pass
