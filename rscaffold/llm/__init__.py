"""LLM backends behind one protocol (:class:`~rscaffold.llm.base.LLMBackend`).

A backend is chosen by ``BackendConfig.backend``. Adding one means one module with a class taking
a ``BackendConfig`` and one line in :data:`BACKENDS` (plus the name in ``config.BackendName``).
Backends are imported lazily, so a heavy or optional dependency (vLLM) is loaded only when used.
"""

from __future__ import annotations

import importlib

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


def create_backend(cfg: BackendConfig, *, cache: RequestCache | None = None) -> LLMBackend:
    """The backend ``cfg.backend`` names (its module is imported only now).

    With a ``cache`` (:mod:`rscaffold.llm.cache`), a :class:`~rscaffold.llm.cache.CachedBackend`
    that answers known requests from it and creates the real backend only for the first one it
    cannot answer.
    """
    cls = backend_class(cfg.backend)
    if cache is None or cache.mode == "off":
        return cls(cfg)
    return CachedBackend(cfg, lambda: cls(cfg), capabilities=cls.capabilities, name=cls.name, cache=cache)


__all__ = ["BACKENDS", "ChatRequest", "Completion", "LLMBackend", "ResultCallback", "backend_class", "create_backend"]
