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
successful completions are stored; failures are asked again. An entry that does not validate as
a stored response (unreadable, not JSON, JSON of another shape: ``[]``, a completion with fields
it does not have or of the wrong type) is a miss: logged with where it is, asked again and
overwritten.

The store (``run.request_cache_store``):

* ``sqlite`` (default): one SQLite database ``<root>/requests.sqlite3`` in WAL mode, one row per
  request, each write its own transaction (atomic; after a crash the database is consistent and
  holds every committed entry), safe for concurrent processes and threads *on one host* (Ray
  workers included; writers wait for each other up to ``busy_timeout``). A million entries are
  one file instead of a million. SQLite's WAL needs shared memory between its processes, so it
  must not be shared by processes on *different machines* over NFS or an object-store mount: use
  ``files`` there. A database that is not one (damaged beyond SQLite's own recovery) is set aside
  as ``requests.sqlite3.damaged-<time>`` and a fresh one started (entries are asked again).
* ``files``: one JSON file ``<root>/<key[:2]>/<key>.json`` per request, written atomically
  (temporary file + rename): the earlier store, for a cache shared by several machines.

The sqlite store reads the files store as a fallback: an entry it lacks is looked up as a file,
and one found there is copied into the database (``RequestCache.migrate`` copies all at once), so
a cache written by an earlier version keeps hitting. Keys are the same in both stores. The root
is ``<artifacts>/requests`` by default, shared across stage fingerprints and runs.

``run.request_cache``: ``use`` (default), ``refresh`` (send everything again and overwrite what is
stored: ``rscaffold run --refresh-requests``), ``off``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

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


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json_atomic(path: Path, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, ensure_ascii=False, sort_keys=True))


class StoredCompletion(BaseModel):
    """One stored completion: :class:`~rscaffold.llm.base.Completion` without what belongs to one
    request (its id) or to a failure (failures are never stored). Strict: an entry with other
    fields or other types is not one."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    reasoning: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0
    sample_index: int = 0
    extra: dict[str, Any] = {}


class StoredEntry(BaseModel):
    """A request-cache entry: the key's fields (for reading the cache by eye) and the completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: dict[str, Any]
    completions: list[StoredCompletion]


_NOT_STORED = ("request_id", "error", "error_kind")  # Completion fields a stored completion lacks
DB_NAME = "requests.sqlite3"
BUSY_TIMEOUT_MS = 120_000
WAL_CHECK_WRITES = 500
WAL_LIMIT_BYTES = 64 * 2**20
Store = Literal["sqlite", "files"]


def parse_entry(raw: str | bytes, where: str) -> list[dict[str, Any]] | None:
    """The completions of a stored entry, or None (logged with ``where``) when it is not one."""
    try:
        entry = StoredEntry.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        what = f"{'.'.join(str(x) for x in first['loc']) or 'entry'}: {first['msg']}"
        log.warning("request cache entry %s is not a stored response (%s); asking again", where, what)
        return None
    return [c.model_dump() for c in entry.completions]


def entry_json(completions: Sequence[Completion], fields: dict[str, Any]) -> str:
    entry = {
        "key": fields,
        "completions": [{k: v for k, v in dataclasses.asdict(c).items() if k not in _NOT_STORED} for c in completions],
    }
    return json.dumps(entry, ensure_ascii=False, sort_keys=True)


class _SQLiteStore:
    """``key -> entry JSON`` in one SQLite database (WAL mode), one connection per thread and
    process (a connection must not cross a fork, nor be shared by threads without a lock)."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # pickled (to a worker): connections stay behind
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit is atomic and survives a killed process; a power cut may lose
            # the last commits (asked again), never the database's consistency
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            # a rowid table (entries packed in insertion order) with an index on the key: entries
            # are kilobytes, too large for a WITHOUT ROWID table's half-empty pages
            conn.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, entry TEXT NOT NULL)")
        except sqlite3.DatabaseError as err:
            conn.close()
            if "not a database" not in str(err) and "malformed" not in str(err):
                raise
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            log.warning("request cache %s is damaged (%s); set aside as %s, starting a new one", self.path, err, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    os.replace(src, Path(f"{aside}{suffix}"))
            return self._open()
        return conn

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn, local.pid = self._open(), os.getpid()
        return local.conn

    def get(self, key: str) -> str | None:
        # fetchall, not fetchone: an unfinished statement keeps its read transaction open, and an
        # open reader stops checkpoints, so the write-ahead log would grow without end
        rows = self._conn().execute("SELECT entry FROM entries WHERE key = ?", (key,)).fetchall()
        return rows[0][0] if rows else None

    def put(self, key: str, entry: str) -> None:
        self._conn().execute("INSERT OR REPLACE INTO entries (key, entry) VALUES (?, ?)", (key, entry))
        self._after_writes(1)

    def _after_writes(self, n: int) -> None:
        """Keep the write-ahead log bounded. SQLite's automatic checkpoints are passive: with
        writers in several processes there is rarely a moment without a transaction, the log is
        never restarted and grows (to gigabytes over a long run). Every ``WAL_CHECK_WRITES`` writes,
        a log above ``WAL_LIMIT_BYTES`` is checkpointed and truncated, waiting its turn."""
        local = self._local
        local.writes = getattr(local, "writes", 0) + n
        if local.writes < WAL_CHECK_WRITES:
            return
        local.writes = 0
        try:
            big = os.path.getsize(f"{self.path}-wal") > WAL_LIMIT_BYTES
        except OSError:
            return
        if big:
            self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def put_many(self, items: Sequence[tuple[str, str]]) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO entries (key, entry) VALUES (?, ?)", items)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._after_writes(len(items))

    def count(self) -> int:
        return self._conn().execute("SELECT count(*) FROM entries").fetchall()[0][0]


class RequestCache:
    """Content-addressed LLM responses under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path, mode: str = "use", store: Store = "sqlite"):
        if mode not in ("use", "refresh", "off"):
            raise ValueError(f"request cache mode must be 'use', 'refresh' or 'off', got {mode!r}")
        if store not in ("sqlite", "files"):
            raise ValueError(f"request cache store must be 'sqlite' or 'files', got {store!r}")
        self.root = Path(root)
        self.mode = mode
        self.store = store
        self._db = _SQLiteStore(self.root / DB_NAME) if store == "sqlite" else None
        self._files_checked_at = -1.0  # when the root was last looked at for a files store
        self._has_files = False

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

    def _files_present(self) -> bool:
        """Whether the root holds entries of the files store (looked at once a minute at most:
        with none there, a miss costs no file lookup)."""
        now = time.monotonic()
        if self._has_files or now - self._files_checked_at < 60:
            return self._has_files
        self._files_checked_at = now
        try:
            self._has_files = any(p.is_dir() and len(p.name) == 2 for p in self.root.iterdir())
        except OSError:
            self._has_files = False
        return self._has_files

    def _get_file(self, key: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        path = self._path(key)
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as err:  # unreadable, undecodable: a miss (and rewritten)
            log.warning("request cache entry %s is unreadable (%s); asking again", path, err)
            return None, None
        return raw, parse_entry(raw, str(path))

    def get(self, key: str) -> list[dict[str, Any]] | None:
        if self.mode != "use":
            return None
        if self._db is None:
            return self._get_file(key)[1]
        try:
            raw = self._db.get(key)
        except sqlite3.DatabaseError as err:
            log.warning("request cache %s cannot be read (%s); asking again", self._db.path, err)
            return None
        if raw is not None:
            return parse_entry(raw, f"{self._db.path} [key {key}]")
        if not self._files_present():
            return None
        raw, completions = self._get_file(key)
        if completions is not None:
            self._db.put(key, raw)  # migrated: found in the database from now on
        return completions

    def put(self, key: str, completions: Sequence[Completion], fields: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        entry = entry_json(completions, fields)
        if self._db is None:
            _write_text_atomic(self._path(key), entry)
        else:
            self._db.put(key, entry)

    def count(self) -> int:
        """Entries in the store (the database's rows; for ``files``, the entry files)."""
        if self._db is None:
            return sum(1 for _ in self.root.glob("??/*.json"))
        return self._db.count()

    def migrate(self, *, remove: bool = False, batch: int = 1000) -> int:
        """Copy every valid entry of the files store under ``root`` into the database (entries it
        already holds are kept), removing each file when ``remove``; returns how many were copied."""
        if self._db is None:
            raise ValueError("migrate copies the files store into the sqlite store; this cache is a files store")
        copied, pending, done = 0, [], []

        def flush() -> None:
            nonlocal copied
            if pending:
                have = {k for k, _ in pending if self._db.get(k) is not None}
                self._db.put_many([(k, e) for k, e in pending if k not in have])
                copied += len(pending) - len(have)
            if remove:
                for p in done:
                    p.unlink(missing_ok=True)
            pending.clear()
            done.clear()

        for path in sorted(self.root.glob("??/*.json")):
            raw, completions = self._get_file(path.stem)
            if completions is not None:
                pending.append((path.stem, raw))
                done.append(path)
            if len(pending) >= batch:
                flush()
        flush()
        self._has_files = False
        self._files_checked_at = -1.0
        return copied


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
