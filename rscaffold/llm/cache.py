"""The request cache: every LLM request is paid for once.

Every teacher, labeler and server-side evaluation request goes through a :class:`CachedBackend`,
which looks the request up in a :class:`RequestCache` before sending it. The key is a hash of
what decides the answer:

* the backend kind and the model's identity (:func:`model_identity`: a local model directory by
  the content of its files, a hub id with its revision, a served model by its name and
  ``llm.revision``), and for local engines the dtype;
* the exact messages (or, for a text completion, the prompt, stop strings, logprobs and
  server options), the sampling parameters (``max_new_tokens``, ``temperature``, ``top_p``),
  the request's seed when it samples (``temperature > 0``; greedy answers do not depend on it),
  the number of samples, and the structured-output spec (JSON schema, line choices).

Every request rscaffold sends carries a seed derived from what it is (run seed, problem id, sample
index), so sampled requests are cacheable too: asking again with the same seed is asking for the
same sample. (A server that ignores seeds may have answered differently the first time; the cache
keeps that first answer, which is what an uninterrupted run would have used.)

The value is the raw response: text, reasoning, finish reason, token counts, latency. Only
successful completions are stored; failures are asked again. Entries are files
``<root>/<key[:2]>/<key>.json``, written atomically (temporary file + rename), so several
processes (two runs, shard tasks in parallel) can share one cache safely; the root is
``<artifacts>/requests`` by default, shared across stage fingerprints and runs.

``run.request_cache``: ``use`` (default), ``refresh`` (send everything again and overwrite what is
stored: ``rscaffold run --refresh-requests``), ``off``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import Capabilities, ChatRequest, Completion, LLMBackend, ResultCallback
from rscaffold.llm.parsing import request_seed

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Files of a model directory that do not change what it computes.
_IGNORED_MODEL_FILES = ("README.md", ".gitattributes")


# ---------------------------------------------------------------------------------------------
# model identity


def _digest_file(path: Path, index: dict[str, Any]) -> str:
    """sha256 of a file, remembered in ``index`` by (path, size, mtime) so it is read once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in index:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        index[key] = h.hexdigest()
    return index[key]


_INDEX_LOCK = threading.Lock()


def model_identity(cfg: BackendConfig, index_path: Path | None = None) -> str:
    """What the backend's model is, for cache keys.

    A local directory (or GGUF file) is identified by the content of its files (each hashed once
    and remembered in ``index_path``, by path, size and modification time), so copying or moving
    it keeps its cache entries and changing a weight invalidates them. A hub id is identified by
    ``id@revision`` (pin ``llm.revision`` to a commit to be safe from a moving branch); a model
    behind an OpenAI-compatible server by its served name and ``llm.revision`` (set it when
    different models are served under one name).
    """
    parts = [cfg.backend]
    local = Path(os.path.expanduser(cfg.model))
    if cfg.backend != "openai" and local.exists():
        with _INDEX_LOCK:
            index: dict[str, Any] = {}
            if index_path is not None and index_path.exists():
                try:
                    index = json.loads(index_path.read_text())
                except ValueError:
                    index = {}
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
            h = hashlib.sha256()
            for p in files:
                if p.name in _IGNORED_MODEL_FILES or p.name.startswith("."):
                    continue
                if cfg.gguf_file and p.suffix == ".gguf" and p.name != cfg.gguf_file:
                    continue
                rel = p.name if local.is_file() else str(p.relative_to(local))
                h.update(f"{rel}:{_digest_file(p, index)}\n".encode())
            if index_path is not None:
                _write_json_atomic(index_path, index)
        parts.append("local:" + h.hexdigest()[:32])
    else:
        parts.append(f"{cfg.model}@{cfg.revision or ''}")
    if cfg.tokenizer:
        parts.append(f"tokenizer:{cfg.tokenizer}")
    if cfg.backend != "openai":
        parts.append(f"dtype:{cfg.dtype}")
    return "|".join(parts)


# ---------------------------------------------------------------------------------------------
# the store


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, sort_keys=True))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class RequestCache:
    """Content-addressed LLM responses under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path, mode: str = "use"):
        if mode not in ("use", "refresh", "off"):
            raise ValueError(f"request cache mode must be 'use', 'refresh' or 'off', got {mode!r}")
        self.root = Path(root)
        self.mode = mode

    @property
    def model_index(self) -> Path:
        return self.root / "model-files.json"

    def key_fields(self, *, model: str, request: ChatRequest, sampling: SamplingConfig) -> dict[str, Any]:
        sampled = sampling.temperature > 0
        return {
            "format": CACHE_FORMAT,
            "model": model,
            "messages": request.messages,
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampled else None,
            "seed": request_seed(request, sampling.seed) if sampled else None,
            "n": request.n,
            "json_schema": request.json_schema,
            "line_choices": request.line_choices,
            # text completions only (absent from chat requests, whose keys stay as they were)
            **{
                k: v
                for k, v in (
                    ("prompt", request.prompt),
                    ("stop", request.stop),
                    ("logprobs", request.logprobs),
                    ("options", request.options),
                )
                if v is not None
            },
        }

    def key(self, *, model: str, request: ChatRequest, sampling: SamplingConfig) -> str:
        blob = json.dumps(self.key_fields(model=model, request=request, sampling=sampling), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[dict[str, Any]] | None:
        if self.mode != "use":
            return None
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:  # a damaged entry is a miss (and is rewritten)
            log.warning("request cache entry %s is unreadable (%s); asking again", path, err)
            return None
        return entry.get("completions")

    def put(self, key: str, completions: Sequence[Completion], fields: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        entry = {
            "key": fields,
            "completions": [
                {k: v for k, v in dataclasses.asdict(c).items() if k not in ("request_id", "error", "error_kind")}
                for c in completions
            ],
        }
        _write_json_atomic(self._path(key), entry)


# ---------------------------------------------------------------------------------------------
# the backend


@dataclass
class RequestStats:
    """What a backend's requests cost: sent to the model vs served from the cache, and tokens."""

    requests: int = 0
    from_cache: int = 0
    sent: int = 0
    failed: int = 0
    prompt_tokens: int = 0  # of the requests sent
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of the requests served from the cache (what they had cost)
    cached_completion_tokens: int = 0

    def add(self, other: RequestStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self, cfg: BackendConfig | None = None) -> dict[str, Any]:
        """A JSON-able summary; with prices in ``cfg``, the estimated cost of what was sent and of
        what the cache saved."""
        out: dict[str, Any] = dataclasses.asdict(self)
        if cfg is not None and (cfg.price_per_million_prompt_tokens or cfg.price_per_million_completion_tokens):
            pp = cfg.price_per_million_prompt_tokens or 0.0
            pc = cfg.price_per_million_completion_tokens or 0.0
            out["cost"] = round((self.prompt_tokens * pp + self.completion_tokens * pc) / 1e6, 6)
            out["cost_saved_by_cache"] = round(
                (self.cached_prompt_tokens * pp + self.cached_completion_tokens * pc) / 1e6, 6
            )
        return out


class CachedBackend:
    """An :class:`~rscaffold.llm.base.LLMBackend` that serves what the cache holds and sends the rest.

    The real backend is created on the first request the cache cannot answer, so a fully cached
    stage never loads a model or opens a connection.
    """

    def __init__(
        self,
        cfg: BackendConfig,
        factory: Callable[[], LLMBackend],
        *,
        capabilities: Capabilities,
        name: str,
        cache: RequestCache,
    ):
        self.cfg = cfg
        self.name = name
        self.model_id = cfg.model
        self.capabilities = capabilities
        self.cache = cache
        self.stats = RequestStats()
        self._factory = factory
        self._inner: LLMBackend | None = None
        self._identity: str | None = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = model_identity(self.cfg, self.cache.model_index)
        return self._identity

    @property
    def inner(self) -> LLMBackend:
        if self._inner is None:
            self._inner = self._factory()
        return self._inner

    def generate(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: ResultCallback | None = None,
    ) -> list[Completion]:
        results: list[Completion] = []
        misses: list[ChatRequest] = []
        keys: dict[str, tuple[str, dict[str, Any], int]] = {}
        for req in requests:
            fields = self.cache.key_fields(model=self.identity, request=req, sampling=sampling)
            key = self.cache.key(model=self.identity, request=req, sampling=sampling)
            stored = self.cache.get(key)
            self.stats.requests += 1
            if stored is None or len(stored) < req.n:
                misses.append(req)
                keys[req.request_id] = (key, fields, req.n)
                continue
            self.stats.from_cache += 1
            for data in stored[: req.n]:
                c = Completion(request_id=req.request_id, **data)
                c.extra = {**c.extra, "cached": True}
                self.stats.cached_prompt_tokens += c.prompt_tokens or 0
                self.stats.cached_completion_tokens += c.completion_tokens or 0
                results.append(c)
                if on_result:
                    on_result(c)
        if not misses:
            return results
        pending: dict[str, list[Completion]] = {}

        def record(c: Completion) -> None:
            with self._lock:
                key, fields, n = keys.get(c.request_id, (None, None, 0))
                got = pending.setdefault(c.request_id, [])
                got.append(c)
                if len(got) == 1:  # answered (or failed): sent; a request cancelled unanswered is not
                    self.stats.sent += 1
                if c.ok:
                    self.stats.prompt_tokens += (c.prompt_tokens or 0) if c.sample_index == 0 else 0
                    self.stats.completion_tokens += c.completion_tokens or 0
                if key is not None and len(got) == n:
                    if all(x.ok for x in got):
                        self.cache.put(key, sorted(got, key=lambda x: x.sample_index), fields)
                    else:
                        self.stats.failed += 1
            if on_result:
                on_result(c)

        returned = self.inner.generate(misses, sampling, on_result=record)
        # A backend that does not call on_result (or skipped some) still returns them.
        seen = {(c.request_id, c.sample_index) for cs in pending.values() for c in cs}
        for c in returned:
            if (c.request_id, c.sample_index) not in seen:
                record(c)
        results.extend(c for cs in pending.values() for c in cs)
        return results

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
