"""What every stage task shares: cache keys, progress, UI artifacts and the library's logs.

The cache key of a stage task is the stage's fingerprint (config section + upstream fingerprints
+ code version, see ``rscaffold.stages.plan.plan_fingerprints``) and the artifacts root, so
Prefect's cache and the content-addressed artifact store agree on what "the same work" is, and a
cached result never points into another run's artifacts directory.

The library logs through the ``rscaffold.*`` loggers; :func:`attach_library_logs` (run when this
module is imported) sends them to the Prefect UI of the run they happen in, and at INFO to the
console.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from rscaffold_tasks._child import needs_isolation, run_in_child

from rscaffold.config import PipelineConfig
from rscaffold.stages import registry
from rscaffold.store import StageRef


def root_hash(config: PipelineConfig) -> str:
    """A short hash of the artifacts root (a cached result never points into another root)."""
    return hashlib.sha256(str(config.run.artifacts_root).encode()).hexdigest()[:12]


def stage_cache_key(stage: str):
    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        return f"rscaffold-{stage}-{params['fps'][stage]}-{root_hash(params['config'])}"

    key.__name__ = f"{stage}_cache_key"
    return key


class _InRun(logging.Filter):
    """Only records emitted inside a flow or task run go to the API (others have no run to go to)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def attach_library_logs() -> None:
    """Send the ``rscaffold.*`` loggers' records to the Prefect UI of the current run (and, at
    INFO, to the console through the root logger). Idempotent."""
    lib = logging.getLogger("rscaffold")
    if not any(isinstance(h, APILogHandler) for h in lib.handlers):
        handler = APILogHandler()
        handler.addFilter(_InRun())
        lib.addHandler(handler)
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)


attach_library_logs()


def artifact_key(stage: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return f"rscaffold-{stage}"


# What a stage's progress(done, total) counts.
PROGRESS_UNITS = {"teacher": "traces", "labeling": "shards", "evaluation": "shards"}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(stage: str, done: int, total: int, *, unit: str, first: int, elapsed: float) -> str:
    """``teacher: 3/6 traces (50%), 0.40 traces/s, about 8 s left``: the rate over what this run
    did (``first``: the count it started from, e.g. resumed work), and the time left at that rate."""
    pct = 100.0 * done / total if total else 100.0
    line = f"{stage}: {done}/{total} {unit} ({pct:.0f}%)"
    made = done - first
    if made > 0 and elapsed > 0:
        rate = made / elapsed
        line += f", {rate:.2f} {unit}/s"
        if done < total:
            line += f", about {_duration((total - done) / rate)} left"
        else:
            line += f", in {_duration(elapsed)}"
    return line


class ProgressReporter:
    """A Prefect progress artifact (and log lines with the unit, the rate and the time left) for
    a long stage; throttled."""

    def __init__(self, stage: str, every_s: float = 2.0, unit: str | None = None):
        self.stage = stage
        self.unit = unit or PROGRESS_UNITS.get(stage, "items")
        self.every_s = every_s
        self._last = 0.0
        self._start: tuple[int, float] | None = None  # (done, time) of the first report
        self._id = None
        try:
            self._id = create_progress_artifact(progress=0.0, description=f"{stage} progress")
        except Exception:  # no API available: progress is informative, never fatal
            self._id = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = (done, now)
        if done < total and now - self._last < self.every_s:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        first, started = self._start
        get_run_logger().info(
            "%s", progress_line(self.stage, done, total, unit=self.unit, first=first, elapsed=now - started)
        )
        if self._id is not None:
            try:
                update_progress_artifact(self._id, progress=pct)
            except Exception:
                pass


_PNG = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def embed_images(markdown: str, base: str | os.PathLike, max_bytes: int = 1 << 20) -> str:
    """``markdown`` with each ``![alt](file.png)`` of a file under ``base`` inlined as a data URI
    (the UI shows the picture, not a file name); larger or missing files keep their link."""

    def inline(m: re.Match) -> str:
        path = Path(base) / m.group(2)
        if not path.is_file() or path.stat().st_size > max_bytes:
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return _PNG.sub(inline, markdown)


def publish_stage(ref: StageRef, extra_markdown: str = "", *, report: str = "") -> None:
    """Log where the stage's outputs are and publish a markdown artifact describing them.
    ``report``: a readable report (markdown; its pictures are inlined), shown first."""
    logger = get_run_logger()
    lines = []
    if report:
        lines += [embed_images(report, ref.path), ""]
    lines += [
        f"## {ref.stage} `{ref.fingerprint}`",
        "",
        f"Directory: `{ref.path}`",
        "",
        "| output | path |",
        "|---|---|",
    ]
    for name, rel in ref.outputs.items():
        lines.append(f"| {name} | `{rel}` |")
        logger.info("%s output %s: %s", ref.stage, name, os.path.join(ref.path, rel))  # rel may be absolute
    if ref.summary:
        lines += ["", "```json", _json(ref.summary), "```"]
    if extra_markdown:
        lines += ["", extra_markdown]
    create_markdown_artifact("\n".join(lines), key=artifact_key(ref.stage), description=f"{ref.stage} outputs")


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)[:20000]


def run_stage(stage: str, config: PipelineConfig, *, progress: bool = False, **kwargs: Any) -> StageRef:
    """Run the stage's declared ``run`` function (``rscaffold.stages.<stage>.run_<stage>(config,
    **kwargs)``): in a spawned child process when the stage loads a model
    (``run.isolate_model_stages``, see :mod:`rscaffold_tasks._child`), else here. ``progress``:
    report the stage's progress as a Prefect progress artifact."""
    target = registry.stage(stage).target
    reporter = ProgressReporter(stage) if progress else None
    if needs_isolation(stage, config):
        logging.getLogger("rscaffold.stages").info("%s: running in a child process (run.isolate_model_stages)", stage)
        return run_in_child(target, {"cfg": config, **kwargs}, progress=reporter)
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)  # looked up now: the module's current function
    return fn(config, **kwargs, **({"progress": reporter} if reporter else {}))
