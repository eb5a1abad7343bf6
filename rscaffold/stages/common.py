"""What every stage shares: finding and opening its content-addressed directory, naming its inputs,
small JSON files, and the progress callback type."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from rscaffold.code_version import code_version
from rscaffold.config import PipelineConfig
from rscaffold.store import ReadOnlyArtifactsError, StageDir, StageRef, file_digest, write_text

log = logging.getLogger("rscaffold.stages")

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called as a stage makes progress (the flow feeds a progress artifact)."""


def stage_code_version(stage: str) -> str:
    """The code version of a stage: its module's import closure (see :mod:`rscaffold.code_version`)."""
    return code_version(f"rscaffold.stages.{stage}")


def stage_dir(cfg: PipelineConfig, stage: str, fps: dict[str, str]) -> StageDir:
    """The content-addressed directory of ``stage`` under the run's artifacts root."""
    return StageDir(cfg.run.artifacts_root, stage, fps[stage])


def source_digest(source: str) -> str:
    """Content digest of a local input file; hub sources are identified by their id."""
    return source if source.startswith("hub:") else file_digest(source)


@contextlib.contextmanager
def open_stage(
    cfg: PipelineConfig, stage: str, fps: dict[str, str], *, force: bool = False, fresh: bool = False
) -> Iterator[tuple[StageDir, StageRef | None]]:
    """Hold the stage's lock and yield ``(stage dir, complete output or None)``.

    The complete output is reused unless ``force`` (a refresh: recompute it beside the old one,
    which is replaced only on success) or it is damaged (:meth:`StageDir.verify`: it is then set
    aside as ``<fingerprint>.damaged-<time>`` with a warning and recomputed). When there is
    nothing to reuse, the work directory is ready; it keeps the partial work (shards,
    checkpoints) of earlier attempts unless ``fresh``. The lock is held until the ``with`` block
    ends, so a second run on the same artifacts directory waits (``run.wait_for_locks``) and then
    finds the output complete.
    """
    sd = stage_dir(cfg, stage, fps)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(sd.lock(wait=cfg.run.wait_for_locks, timeout_s=cfg.run.lock_timeout_s))
        except ReadOnlyArtifactsError as err:
            yield sd, read_only_output(sd, err, force=force)
            return
        done = None if force else reusable_output(sd)
        if done is None:
            sd.prepare(fresh=fresh)
        yield sd, done


def read_only_output(sd: StageDir, err: ReadOnlyArtifactsError, *, force: bool = False) -> StageRef:
    """The complete, intact output of a stage whose artifacts directory is read-only here (only
    writing needs the lock); anything else is an error saying why the stage cannot run."""
    problems = ["a refresh was asked for"] if force else ([] if sd.is_complete() else ["it has no complete output"])
    if not problems:
        problems = sd.verify()
    if problems:
        raise ReadOnlyArtifactsError(
            err.errno,
            f"{sd.stage} ({sd.fingerprint}) must be computed, but the artifacts directory {sd.root} is read-only "
            f"here ({err.strerror}): {'; '.join(problems[:3])}. Run it where the artifacts are writable, or "
            "set run.artifacts_dir to a writable copy",
            err.filename,
        )
    log.info("%s: complete output found at %s (artifacts read-only: reused without the lock)", sd.stage, sd.path)
    return sd.ref()


def reusable_output(sd: StageDir) -> StageRef | None:
    """The stage's complete output if it is intact; a damaged one is set aside (and None returned)."""
    if not sd.is_complete():
        return None
    problems = sd.verify()
    if problems:
        aside = sd.set_aside("damaged")
        log.warning(
            "%s: the complete output was damaged (%s); moved to %s and recomputing",
            sd.stage,
            "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
            aside,
        )
        return None
    log.info("%s: complete output found at %s", sd.stage, sd.path)
    return sd.ref()


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
    """Write a small JSON file atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str))


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default
