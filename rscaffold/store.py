"""Content-addressed stage directories: locks, atomic publication, manifests with file digests,
shards named by the work they hold, and Parquet I/O.

Layout under the artifacts root, for one stage and fingerprint::

    <stage>/<fingerprint>/          the complete output; appears in one atomic rename, never partial
    <stage>/<fingerprint>.partial/  where a run builds it: outputs, shards/, checkpoints (kept
                                    across failures, kills and refreshes, so a re-run resumes)
    <stage>/<fingerprint>.lock      the OS-level lock of whoever is writing that stage

A stage run holds the lock (:meth:`StageDir.lock`) from the moment it looks for a complete output
until it has published one, so two runs on one artifacts directory never write the same stage at
once: the second waits (and then finds the output complete) or, asked not to wait, fails with the
name of the holder. :meth:`StageDir.finish` writes the manifest (row counts, config, code version,
and the size, mtime and sha256 of every output file) into the work directory and then renames it
into place; a recomputation (a refresh) therefore builds beside the old output and replaces it
only on success. :meth:`StageDir.verify` checks a complete output against its manifest before it
is reused: a file whose size changed, or whose modification time changed and whose content digest
no longer matches, makes the output damaged (the stage then recomputes, see
:func:`rscaffold.stages.common.open_stage`).

Every Parquet file of the project is written by :func:`write_records` and read by
:func:`read_records`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

import rscaffold
from rscaffold.records import SCHEMA_VERSION, Record, arrow_schema

R = TypeVar("R", bound=Record)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"  # <artifacts>/<stage>/LATEST: the fingerprint of the stage's last published output
WORK_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
SHARDS = "shards"
DAMAGED = "damaged"  # where unreadable shards are set aside (inside shards/)
# Partial work that stays inside a complete output but is not part of it (not verified).
UNVERIFIED_DIRS = (SHARDS, "checkpoints")


class StageLockedError(RuntimeError):
    """Another process is writing this stage and the caller asked not to wait."""


class ReadOnlyArtifactsError(PermissionError):
    """The lock file of a stage cannot be created: the artifacts directory is read-only here (a
    read-only share, or another user's artifacts). Complete outputs can still be read."""


_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


# ---------------------------------------------------------------------------------------------
# fingerprints and digests


def _canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A stable short hash of JSON-able parts (pydantic models included)."""
    blob = json.dumps([_canonical(p) for p in parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(path: str | Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _file_entry(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_digest(path, length=64)}


# ---------------------------------------------------------------------------------------------
# Parquet


def _atomic_write(path: Path, write: Any) -> Path:
    """Write ``path`` through a temporary file in the same directory and rename it into place.

    The temporary file is created with ``open(..., "xb")``, so it gets the process umask's mode
    (``tempfile.mkstemp`` would make it 0600 for good).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def current_umask() -> int:
    """This process's umask (read from ``/proc`` on Linux; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask gives a new
    file or folder, for outputs written by libraries that create them private (``safetensors``
    writes 0600): evaluation, a served student or a colleague under another user can read them."""
    mask = current_umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_records(path: str | Path, records: Iterable[Record], record_type: type[R]) -> Path:
    """Write rows of one record type to Parquet, atomically (temp file + rename)."""
    schema = arrow_schema(record_type)
    rows = [r.model_dump(mode="python") for r in records]
    table = pa.Table.from_pylist(rows, schema=schema)
    return _atomic_write(Path(path), lambda f: pq.write_table(table, f))


def write_table(path: str | Path, table: Any, record_type: type[R]) -> Path:
    """Write a columnar table (pyarrow, or anything with ``to_arrow()`` such as a polars frame) of
    one record type to Parquet, atomically: its columns in the record's order, cast to the
    record's schema (a missing column, or one that does not cast, is an error)."""
    schema = arrow_schema(record_type)
    if not isinstance(table, pa.Table):
        table = table.to_arrow()
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{record_type.__name__} table lacks column(s) {missing}")
    table = table.select(schema.names).cast(schema)
    return _atomic_write(Path(path), lambda f: pq.write_table(table, f))


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temp file + rename)."""
    return _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def read_records(path: str | Path, record_type: type[R]) -> list[R]:
    table = pq.read_table(path, schema=arrow_schema(record_type))
    return [record_type.model_validate(row) for row in table.to_pylist()]


# ---------------------------------------------------------------------------------------------
# stage directories


@dataclass
class StageRef:
    """The small reference a stage returns: where its outputs are and what identifies them."""

    stage: str
    fingerprint: str
    path: str
    outputs: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> Path:
        return Path(self.path) / self.outputs[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "path": self.path,
            "outputs": self.outputs,
            "summary": self.summary,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRef:
        return cls(**{k: d[k] for k in ("stage", "fingerprint", "path", "outputs", "summary")})


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "argv": sys.argv[:4]}


def _describe_holder(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (since {since}: {' '.join(map(str, info.get('argv', [])))})"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _file_lock(
    path: Path, *, what: str, wait: bool, timeout_s: float | None = None, poll_s: float = 1.0
) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path`` holding who holds it (pid, host, since, command)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if err.errno in _READ_ONLY_ERRNOS:
            raise ReadOnlyArtifactsError(
                err.errno, f"{what}: cannot create its lock file ({err.strerror})", str(path)
            ) from None
        raise
    try:
        start = time.monotonic()
        announced = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _describe_holder(_read_holder(path))
                waited = time.monotonic() - start
                if not wait or (timeout_s is not None and waited >= timeout_s):
                    raise StageLockedError(f"{what} is being written by {holder}; lock file {path}") from None
                if waited - announced >= 30 or announced == 0.0:
                    log.warning("%s: waiting for %s, which is writing it (lock %s)", what, holder, path)
                    announced = max(waited, 1e-9)
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_published_name(name: str) -> bool:
    """Whether a directory name under ``<stage>/`` is a published output (a bare fingerprint),
    not a work directory (``.partial``), a set-aside one (``.damaged-<time>``, ``.replaced-<id>``)
    or a lock file."""
    return bool(name) and "." not in name


def published_dirs(root: str | Path, stage: str) -> list[StageDir]:
    """The published outputs of ``stage`` under an artifacts root (those with a manifest)."""
    base = Path(root) / stage
    if not base.is_dir():
        return []
    return [
        sd
        for d in sorted(base.iterdir())
        if d.is_dir() and is_published_name(d.name) and (sd := StageDir(root, stage, d.name)).is_complete()
    ]


class StageDir:
    """One stage's content-addressed output directory (see the module docstring)."""

    def __init__(self, root: str | Path, stage: str, fp: str):
        self.root = Path(root)
        self.stage = stage
        self.fingerprint = fp
        self.path = self.root / stage / fp
        self.work = self.root / stage / (fp + WORK_SUFFIX)
        self.shards = self.work / SHARDS
        self.lock_path = self.root / stage / (fp + LOCK_SUFFIX)

    @classmethod
    def at(cls, path: str | Path) -> StageDir:
        """The stage directory ``path`` (``<root>/<stage>/<fingerprint>``) names."""
        path = Path(path)
        return cls(path.parent.parent, path.parent.name, path.name)

    # -- completion -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def ref(self) -> StageRef:
        m = self.read_manifest()
        return StageRef(self.stage, self.fingerprint, str(self.path), m["outputs"], m.get("summary", {}))

    def verify(self) -> list[str]:
        """What is wrong with the complete output, by its manifest (empty: intact).

        A file is checked by size, then, if its modification time changed, by its sha256 (so an
        untouched output costs one ``stat`` per file, and a copied one is re-hashed once).
        """
        try:
            manifest = self.read_manifest()
        except (OSError, ValueError) as err:
            return [f"{MANIFEST}: unreadable ({err})"]
        problems = []
        for rel, entry in manifest.get("files", {}).items():
            p = self.path / rel
            try:
                st = p.stat()
            except OSError:
                problems.append(f"{rel}: missing")
                continue
            if st.st_size != entry["size"]:
                problems.append(f"{rel}: size {st.st_size} != {entry['size']}")
            elif st.st_mtime_ns != entry["mtime_ns"] and file_digest(p, length=64) != entry["sha256"]:
                problems.append(f"{rel}: content changed (sha256 differs)")
        return problems

    def set_aside(self, reason: str) -> Path:
        """Move the complete output out of the way (kept for inspection), e.g. when damaged."""
        target = self.root / self.stage / f"{self.fingerprint}.{reason}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(self.path, target)
        return target

    # -- the lock ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait: bool = True, timeout_s: float | None = None, poll_s: float = 1.0) -> Iterator[None]:
        """Hold this stage's OS-level lock (``fcntl.flock``; released by the OS if the process dies).

        ``wait``: block until the holder is done, logging who holds it; else raise
        :class:`StageLockedError` at once (and after ``timeout_s`` when waiting).
        """
        with _file_lock(
            self.lock_path, what=f"{self.stage} ({self.fingerprint})", wait=wait, timeout_s=timeout_s, poll_s=poll_s
        ):
            yield

    @contextlib.contextmanager
    def shard_lock(self, name: str, key: str) -> Iterator[None]:
        """Hold the lock of one shard (parallel shard tasks of one stage, on any machine that sees
        the artifacts directory, never compute the same shard at once)."""
        self.shards.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.shards / f".{name}-{key}.lock", what=f"{self.stage} shard {key}", wait=True, poll_s=0.2):
            yield

    def _read_holder(self) -> dict[str, Any]:
        return _read_holder(self.lock_path)

    # -- building ---------------------------------------------------------------------------
    def prepare(self, fresh: bool = False) -> StageDir:
        """Create the work directory; ``fresh`` first discards the partial work in it (shards,
        checkpoints) for a clean start. A complete output is never touched here."""
        if fresh and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        return self

    def finish(
        self,
        *,
        outputs: dict[str, str],
        config: Any,
        inputs: dict[str, str],
        summary: dict[str, Any],
        started: float,
        code: str,
    ) -> StageRef:
        """Write the manifest into the work directory and publish it as the complete output.

        ``outputs`` maps names to paths relative to the stage directory (files or folders; a value
        that is not a path inside it, such as a hub id, is recorded as is). The manifest records
        the size, mtime and sha256 of every file they hold, which :meth:`verify` checks.
        """
        files: dict[str, dict[str, Any]] = {}
        for rel in outputs.values():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                continue  # not ours (e.g. the student a training stage started from)
            p = self.work / rel
            if p.is_file():
                files[rel] = _file_entry(p)
            elif p.is_dir():
                for f in sorted(p.rglob("*")):
                    r = f.relative_to(self.work)
                    if f.is_file() and not any(part in UNVERIFIED_DIRS for part in r.parts):
                        files[str(r)] = _file_entry(f)
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "schema_version": SCHEMA_VERSION,
            "rscaffold_version": rscaffold.__version__,
            "code_version": code,
            "inputs": inputs,
            "config": _canonical(config),
            "outputs": outputs,
            "files": files,
            "summary": summary,
            "started_at": started,
            "finished_at": time.time(),
            "duration_s": round(time.time() - started, 3),
        }
        write_text(self.work / MANIFEST, json.dumps(manifest, indent=2, default=str))
        self._publish()
        return StageRef(self.stage, self.fingerprint, str(self.path), outputs, summary)

    def _publish(self) -> None:
        """Rename the work directory into place; an older output is replaced only now."""
        old = None
        if self.path.exists():
            old = self.path.with_name(f"{self.fingerprint}.replaced-{uuid.uuid4().hex[:8]}")
            os.rename(self.path, old)
        os.rename(self.work, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # the stage's newest complete output, for readers that do not want to read manifests
        write_text(self.path.parent / LATEST, self.fingerprint + "\n")

    # -- partial work -----------------------------------------------------------------------
    def shard_path(self, name: str, key: str) -> Path:
        return self.shards / f"{name}-{key}.parquet"

    def write_shard(self, name: str, records: Sequence[Record], record_type: type[R], *, key: str) -> Path | None:
        """Persist finished rows as the shard ``<name>-<key>.parquet``; ``key`` names the work the
        rows are (e.g. the index range of the items), so a shard never overwrites another's."""
        if not records:
            return None
        return write_records(self.shard_path(name, key), records, record_type)

    def shard_keys(self, name: str) -> list[str]:
        """The keys of the readable shards of ``name`` (see :meth:`read_shards`), sorted."""
        return sorted(key for key, _ in self._shards(name))

    def read_shards(self, name: str, record_type: type[R], *, keys: Collection[str] | None = None) -> list[R]:
        """The rows of every shard of ``name`` (only those with ``keys`` when given), in key order.
        A shard that cannot be read (a truncated or corrupt file) is set aside into
        ``shards/damaged/`` with a warning, so its work is redone instead of failing every re-run."""
        out: list[R] = []
        for key, path in self._shards(name):
            if keys is not None and key not in keys:
                continue
            try:
                out.extend(read_records(path, record_type))
            except Exception as err:  # noqa: BLE001 - any unreadable file is the same case
                self._set_shard_aside(path, err)
        return out

    def read_shard_map(self, name: str, record_type: type[R]) -> dict[str, list[R]]:
        """Like :meth:`read_shards`, keyed by shard key."""
        out: dict[str, list[R]] = {}
        for key, path in self._shards(name):
            try:
                out[key] = read_records(path, record_type)
            except Exception as err:  # noqa: BLE001
                self._set_shard_aside(path, err)
        return out

    def _shards(self, name: str) -> list[tuple[str, Path]]:
        if not self.shards.exists():
            return []
        prefix = f"{name}-"
        return sorted(
            (p.name[len(prefix) : -len(".parquet")], p)
            for p in self.shards.glob(f"{name}-*.parquet")
            if not p.name.startswith(".")
        )

    def _set_shard_aside(self, path: Path, err: BaseException) -> None:
        target = self.shards / DAMAGED / f"{path.name}.{uuid.uuid4().hex[:6]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.warning(
            "%s: shard %s is unreadable (%s); set aside as %s, its work is redone", self.stage, path.name, err, target
        )
