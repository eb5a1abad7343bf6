"""The run section: where outputs go, retries, locks, the task runner and the request cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rscaffold.config.base import _Section


class RaySettings(_Section):
    """Where the shards of the data-parallel stages run with ``run.task_runner: ray``."""

    address: str | None = Field(
        default=None,
        description="The Ray cluster: None starts a local one; 'auto' joins the cluster this machine belongs to; "
        "'ray://<head>:10001' a remote one (Ray Client).",
    )
    cpus_per_shard: float = Field(default=1, gt=0, description="CPUs Ray reserves for one shard task.")
    gpus_per_shard: float = Field(
        default=0, ge=0, description="GPUs Ray reserves for one shard task (1: one model replica per GPU)."
    )
    resources_per_shard: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources one shard task reserves (e.g. {'a100': 1} to keep shards on the "
        "nodes started with that resource).",
    )
    init_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of ray.init (e.g. runtime_env, num_cpus)."
    )
    gpus_per_cell: float | None = Field(
        default=None,
        ge=0,
        description="An experiment's cells run in parallel, one Ray task each: the GPUs Ray reserves for one "
        "cell. None: training.num_processes (1 when unset) on a cluster with GPUs, 0 on one without.",
    )


class RunSettings(_Section):
    # Relative to the working directory (not to the config file), like any output location.
    artifacts_dir: str = Field(
        default="artifacts",
        description="Root of the content-addressed stage outputs; relative to the working directory (not to the config file).",
    )
    retries: int = Field(default=1, ge=0, description="Prefect retries of a failed stage task.")
    retry_delay_s: float = Field(default=2.0, ge=0, description="Seconds between retries.")
    wait_for_locks: bool = Field(
        default=True,
        description="When another run is writing a stage of the same artifacts directory, wait for it "
        "(then reuse its output); false: fail at once, naming the holder (rscaffold run --no-wait).",
    )
    task_runner: Literal["local", "ray"] = Field(
        default="local",
        description="'local': each stage runs as one task here; 'ray': teacher generation, labeling and "
        "evaluation run one Prefect task per shard on a Ray cluster (prefect-ray; pip install 'rscaffold[ray]'), "
        "then assemble here.",
    )
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster for task_runner 'ray'.")
    isolate_model_stages: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Run a stage that loads a model in a child process (spawned), whose exit returns all its "
        "memory (vLLM does not give GPU memory back in-process): 'auto' for stages with a local model "
        "(teacher/labeler backend transformers or vllm, training, evaluation), 'always', 'never'.",
    )
    request_cache: Literal["use", "refresh", "off"] = Field(
        default="use",
        description="The LLM request cache under <artifacts_dir>/requests: 'use' answers every request it has seen "
        "from it; 'refresh' sends every request again and stores the new answer (rscaffold run --refresh-requests); "
        "'off' neither reads nor writes it.",
    )
    request_cache_store: Literal["sqlite", "files"] = Field(
        default="sqlite",
        description="How the request cache stores its entries: 'sqlite', one database file (WAL mode) for any "
        "number of entries, shared by processes on one host; 'files', one JSON file per request, for a cache "
        "shared by several machines (NFS, a mounted bucket), where SQLite's locking does not hold. The sqlite "
        "store also reads (and copies in) entries an earlier 'files' store left.",
    )
    lock_timeout_s: float | None = Field(
        default=None, ge=0, description="Give up waiting for another run's stage lock after this many seconds."
    )
    server_start_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a command-line run waits for its temporary Prefect server to answer (without "
        "PREFECT_API_URL) before giving up; unset: $RSCAFFOLD_SERVER_START_TIMEOUT_S, else 120.",
    )

    @property
    def artifacts_root(self) -> Path:
        """``artifacts_dir`` as an absolute path (``~`` expanded; a relative one against the current
        directory): the one place the artifacts root is resolved."""
        return Path(os.path.abspath(os.path.expanduser(self.artifacts_dir)))
