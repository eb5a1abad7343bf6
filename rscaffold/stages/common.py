"""What every stage shares: opening its content-addressed directory, naming its inputs, small
JSON files, and the progress callback type."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from rscaffold.code_version import code_version
from rscaffold.config import PipelineConfig
from rscaffold.store import StageDir, StageRef, file_digest

log = logging.getLogger("rscaffold.stages")

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called as a stage makes progress (the flow feeds a progress artifact)."""


def stage_code_version(stage: str) -> str:
    """The code version of a stage: its module's import closure (see :mod:`rscaffold.code_version`)."""
    return code_version(f"rscaffold.stages.{stage}")


def source_digest(source: str) -> str:
    """Content digest of a local input file; hub sources are identified by their id."""
    return source if source.startswith("hub:") else file_digest(source)


def open_stage(
    cfg: PipelineConfig, stage: str, fps: dict[str, str], *, force: bool
) -> tuple[StageDir, StageRef | None]:
    """The stage's directory, and its complete output if there is one (``force``: recompute)."""
    sd = StageDir(cfg.run.artifacts_dir, stage, fps[stage])
    if sd.is_complete() and not force:
        log.info("%s: complete output found at %s", stage, sd.path)
        return sd, sd.ref()
    sd.prepare(fresh=force)
    return sd, None


def stage_inputs(*refs: StageRef) -> dict[str, str]:
    """The ``inputs`` of a manifest: stage name -> fingerprint of each input."""
    return {r.stage: r.fingerprint for r in refs}


def as_dict(obj: Any) -> dict[str, Any]:
    """A pydantic model, dataclass or mapping as a JSON-able dict."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if is_dataclass(obj):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(obj).items()}
    return dict(obj)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default
