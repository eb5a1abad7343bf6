"""LLM backends behind one protocol (:class:`~rscaffold.llm.base.LLMBackend`).

A backend is chosen by ``BackendConfig.backend``. Adding one means one module with a class taking
a ``BackendConfig`` and one line in :data:`BACKENDS` (plus the name in ``config.BackendName``).
Backends are imported lazily, so a heavy or optional dependency (vLLM) is loaded only when used.
"""

from __future__ import annotations

import importlib

from rscaffold.config import BackendConfig
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend, ResultCallback

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


def create_backend(cfg: BackendConfig) -> LLMBackend:
    """Instantiate the backend ``cfg.backend`` names (importing its module only now)."""
    return backend_class(cfg.backend)(cfg)


__all__ = ["BACKENDS", "ChatRequest", "Completion", "LLMBackend", "ResultCallback", "backend_class", "create_backend"]
