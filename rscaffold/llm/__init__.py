"""LLM backends behind one protocol (:class:`~rscaffold.llm.base.LLMBackend`).

A backend is chosen by ``BackendConfig.backend``. Adding one means one module with a class taking
a ``BackendConfig`` and one line in :data:`BACKENDS` (plus the name in ``config.BackendName``).
Backends are imported lazily, so a heavy or optional dependency (vLLM) is loaded only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rscaffold.config import BackendConfig
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend, ResultCallback
from rscaffold.llm.cache import CachedBackend, RequestCache

BACKENDS: dict[str, str] = {
    "transformers": "rscaffold.llm.transformers_local:TransformersBackend",
    "openai": "rscaffold.llm.openai_api:OpenAIBackend",
    "vllm": "rscaffold.llm.vllm_engine:VLLMBackend",
}


def backend_class(name: str) -> type:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class _Borrowed:
    """A shared backend lent to one user: everything passes through but ``close``, which is the
    process's business (the model stays loaded for the next shard on this worker)."""

    def __init__(self, inner: LLMBackend):
        self._inner = inner
        self.name, self.model_id, self.capabilities = inner.name, inner.model_id, inner.capabilities

    def generate(self, requests, sampling, on_result=None):
        return self._inner.generate(requests, sampling, on_result=on_result)

    def close(self) -> None:
        pass


def _shared(cfg: BackendConfig, cls: type) -> LLMBackend:
    """The process's backend for ``cfg`` (:mod:`rscaffold.process_cache`: one model per process,
    replaced when another config asks, closed at exit), lent to this caller."""
    from rscaffold import process_cache

    return _Borrowed(process_cache.kept("llm", cfg.model_dump_json(), lambda: cls(cfg), close=lambda b: b.close()))


def create_backend(
    cfg: BackendConfig,
    *,
    cache: RequestCache | None = None,
    shared: bool = False,
    connect: Callable[[], LLMBackend] | None = None,
) -> LLMBackend:
    """The backend ``cfg.backend`` names (its module is imported only now).

    With a ``cache`` (:mod:`rscaffold.llm.cache`), a :class:`~rscaffold.llm.cache.CachedBackend`
    that answers known requests from it and creates the real backend only for the first one it
    cannot answer. ``shared``: the real backend is kept for the life of the process and lent to
    every later call with the same config (a worker that runs shard after shard loads its model
    replica once); closing what this returns does not unload it. ``connect``: makes the real
    backend instead (e.g. after starting the server it talks to), called only when a request is
    not in the cache.
    """
    cls = backend_class(cfg.backend)

    def factory() -> LLMBackend:
        if connect is not None:
            return connect()
        return _shared(cfg, cls) if shared else cls(cfg)

    if cache is None or cache.mode == "off":
        return factory()
    return CachedBackend(cfg, factory, capabilities=cls.capabilities, name=cls.name, cache=cache)


__all__ = ["BACKENDS", "ChatRequest", "Completion", "LLMBackend", "ResultCallback", "backend_class", "create_backend"]
