"""How a stage declares itself: one :class:`Stage` value per stage module (``STAGE``), from which
the fingerprint plan (:mod:`rscaffold.stages.plan`), the flow, its Prefect tasks and the choice of
process isolation are derived. The stages, in order, are listed in :mod:`rscaffold.stages.registry`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rscaffold.config import PipelineConfig

Fingerprint = Callable[[PipelineConfig, Mapping[str, str]], Sequence[Any]]
"""``parts(cfg, fps)``: what the stage's fingerprint hashes besides its name, given the
fingerprints of the stages before it (``fps``)."""


def _never(cfg: PipelineConfig) -> bool:
    return False


@dataclass(frozen=True)
class Shards:
    """A stage that can fan out as one task per shard (``run.task_runner: ray``).

    ``keys(cfg, **refs)`` lists the shard keys and ``run(cfg, fps, *, key, **refs)`` makes one
    shard in the stage's work directory; each takes, by name, the upstream references it declares
    as parameters. The stage's own ``run`` then finds every shard done and assembles them.
    """

    keys: Callable[..., list[str]]
    run: Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class SummaryTable:
    """A table of the stage's summary to publish beside it: the first of ``summary_keys`` present,
    under ``key`` with ``description``."""

    key: str
    description: str
    summary_keys: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once.

    * ``name``: its name (a :data:`rscaffold.vocabulary.StageName`), its directory under the
      artifacts root and its Prefect task's name;
    * ``run``: ``run(cfg, fps, *, <upstream refs by name>, force, fresh[, progress])`` returning the
      stage's :class:`~rscaffold.store.StageRef` (``progress`` when it reports progress);
    * ``upstream``: the stages whose output it reads, passed to ``run`` by name; ``optional``: those
      of them it can do without (passed as None when not run);
    * ``needs(cfg)``: the upstream stages a config really needs (default: all of ``upstream``), so
      a run computes only what the requested outputs need;
    * ``fingerprint(cfg, fps)``: the parts of its fingerprint (see :mod:`rscaffold.stages.plan`);
    * ``outputs``: the names of its outputs (keys of the manifest's ``outputs``);
    * ``shards``: its shard functions, when it can fan out;
    * ``loads_model(cfg)``: whether it loads a model in this process (then it runs in a child
      process, ``run.isolate_model_stages``);
    * ``distributed(cfg)``: whether it runs as several processes under ``accelerate launch``;
    * ``run_name(cfg)``: the name of its task runs; ``report``: the output holding a markdown report
      to publish beside it; ``table``: a table of its summary to publish; ``description``: one line
      on what it does.
    """

    name: str
    run: Callable[..., Any]
    fingerprint: Fingerprint
    description: str
    upstream: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    needs: Callable[[PipelineConfig], Collection[str]] | None = None
    outputs: tuple[str, ...] = ()
    shards: Shards | None = None
    loads_model: Callable[[PipelineConfig], bool] = _never
    distributed: Callable[[PipelineConfig], bool] = _never
    run_name: Callable[[PipelineConfig], str] | None = None
    report: str | None = None
    table: SummaryTable | None = None

    def __post_init__(self) -> None:
        unknown = set(self.optional) - set(self.upstream)
        if unknown:
            raise ValueError(f"stage {self.name}: optional inputs {sorted(unknown)} are not upstream")

    def needed(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The upstream stages ``cfg`` needs this stage to read, in declaration order."""
        if self.needs is None:
            return self.upstream
        wanted = set(self.needs(cfg))
        unknown = wanted - set(self.upstream)
        if unknown:
            raise ValueError(f"stage {self.name}: needs {sorted(unknown)}, which are not upstream")
        missing = set(self.upstream) - set(self.optional) - wanted
        if missing:
            raise ValueError(f"stage {self.name}: cannot run without {sorted(missing)}")
        return tuple(u for u in self.upstream if u in wanted)

    @property
    def target(self) -> str:
        """``module:function`` of ``run`` (looked up when called, so the module's current attribute runs)."""
        return f"{self.run.__module__}:{self.run.__name__}"

    @property
    def reports_progress(self) -> bool:
        return "progress" in inspect.signature(self.run).parameters


def refs_for(fn: Callable[..., Any], refs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``refs`` that ``fn`` takes as parameters (by name)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in refs.items() if k in params}


LOCAL_BACKENDS = ("transformers", "vllm")
"""LLM backends that load the model in the stage's own process."""
