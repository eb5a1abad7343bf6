"""What the stages that send LLM requests share: the run's request cache, and the summary of
what their requests cost (sent vs served from the cache, tokens, estimated cost)."""

from __future__ import annotations

import logging
from typing import Any

from rscaffold.config import BackendConfig, PipelineConfig
from rscaffold.llm.cache import RequestCache, RequestStats

log = logging.getLogger("rscaffold.stages")


def request_cache(cfg: PipelineConfig) -> RequestCache:
    """The run's LLM request cache: ``<artifacts_dir>/requests``, in ``run.request_cache`` mode,
    stored as ``run.request_cache_store`` says."""
    return RequestCache(
        cfg.run.artifacts_root / "requests", mode=cfg.run.request_cache, store=cfg.run.request_cache_store
    )


def request_summary(backend: Any, llm: BackendConfig) -> dict[str, Any] | None:
    """Requests and tokens of a stage's backend (sent vs served from the cache, and the cost
    estimate when ``llm`` has prices), for the stage summary; None without a cache."""
    stats = getattr(backend, "stats", None)
    return stats.summary(llm) if isinstance(stats, RequestStats) else None


def log_request_stats(stage: str, backend: Any, llm: BackendConfig) -> None:
    summary = request_summary(backend, llm)
    if summary:
        cost = f", estimated cost {summary['cost']}" if "cost" in summary else ""
        log.info(
            "%s: %d requests, %d served from the request cache, %d sent (%d prompt + %d completion tokens)%s",
            stage,
            summary["requests"],
            summary["from_cache"],
            summary["sent"],
            summary["prompt_tokens"],
            summary["completion_tokens"],
            cost,
        )
