"""Content-addressed artifact directories, manifests, fingerprints and Parquet I/O.

Layout: ``<root>/<stage>/<fingerprint>/`` holds the stage's Parquet files, ``manifest.json``
(written last, so its presence means "complete") and ``shards/`` with partial work that a re-run
resumes from. The fingerprint of a stage is a hash of its config section, the fingerprints of its
inputs and the stage's code version, so the same inputs always land in the same directory.

Every Parquet file of the project is written by :func:`write_records` and read by
:func:`read_records`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

import rscaffold
from rscaffold.records import SCHEMA_VERSION, Record, arrow_schema

R = TypeVar("R", bound=Record)

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# fingerprints


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


_PKG = Path(rscaffold.__file__).parent


def code_version(*modules: str) -> str:
    """Hash of the source of the given library modules/packages (relative to ``rscaffold/``).

    A stage's cache key includes this, so editing the code a stage runs invalidates its cache and
    nothing else's.
    """
    h = hashlib.sha256(rscaffold.__version__.encode())
    for mod in sorted(modules):
        p = _PKG / mod
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py") if p.suffix != ".py" else p]
        for f in files:
            h.update(str(f.relative_to(_PKG)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Parquet


def write_records(path: str | Path, records: Iterable[Record], record_type: type[R]) -> Path:
    """Write rows of one record type to Parquet, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(record_type)
    rows = [r.model_dump(mode="python") for r in records]
    table = pa.Table.from_pylist(rows, schema=schema)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".parquet.tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


class StageDir:
    """One stage's content-addressed output directory."""

    def __init__(self, root: str | Path, stage: str, fp: str):
        self.root = Path(root)
        self.stage = stage
        self.fingerprint = fp
        self.path = self.root / stage / fp
        self.shards = self.path / "shards"

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

    def prepare(self, fresh: bool = False) -> StageDir:
        """Create the directory; ``fresh`` wipes it first (a forced refresh)."""
        if fresh and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
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
        """Write the manifest (last), which marks the stage complete."""
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "schema_version": SCHEMA_VERSION,
            "rscaffold_version": rscaffold.__version__,
            "code_version": code,
            "inputs": inputs,
            "config": _canonical(config),
            "outputs": outputs,
            "summary": summary,
            "started_at": started,
            "finished_at": time.time(),
            "duration_s": round(time.time() - started, 3),
        }
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, self.manifest_path)
        return StageRef(self.stage, self.fingerprint, str(self.path), outputs, summary)

    # -- partial work -----------------------------------------------------------------------
    def write_shard(self, name: str, records: Sequence[Record], record_type: type[R]) -> Path | None:
        """Persist a batch of finished rows as one shard (``<name>-<n>.parquet``)."""
        if not records:
            return None
        self.shards.mkdir(parents=True, exist_ok=True)
        n = len(list(self.shards.glob(f"{name}-*.parquet")))
        return write_records(self.shards / f"{name}-{n:05d}.parquet", records, record_type)

    def read_shards(self, name: str, record_type: type[R]) -> list[R]:
        if not self.shards.exists():
            return []
        out: list[R] = []
        for p in sorted(self.shards.glob(f"{name}-*.parquet")):
            out.extend(read_records(p, record_type))
        return out
