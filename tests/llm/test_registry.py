"""The backends' registry (rscaffold.llm): lazy imports, unknown names, the openai backend's repr."""

from __future__ import annotations

import pytest

from rscaffold.config import BackendConfig
from rscaffold.llm import BACKENDS, backend_class, create_backend
from rscaffold.llm.base import LLMBackend


def test_registry_lazy_and_errors(monkeypatch):
    assert set(BACKENDS) >= {"transformers", "openai", "vllm"}
    with pytest.raises(ValueError, match="unknown backend"):
        backend_class("nope")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from rscaffold.llm.vllm_engine import MISSING_VLLM

        with pytest.raises(ImportError) as info:
            create_backend(BackendConfig(backend="vllm", model="x"))
        assert str(info.value) == MISSING_VLLM
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    b = create_backend(BackendConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1"))
    assert isinstance(b, LLMBackend) and b.name == "openai" and "EMPTY" not in repr(b)
