"""Teacher generation fanned out on Ray vs sequential, measured in one run.

Runs the teacher stage (the flow's stage run, so Prefect, prefect-ray and the request path are
all real) on a tiny random-init model: once with the local task runner (one task, sequential
shards), then on a local Ray cluster with 1, 2 and 4 worker CPUs (one Prefect task per shard).
Prints wall time, shards/s and the speedup against sequential. Each run has its own artifacts
directory and the request cache off, so every run generates everything.

Torch parallelises one model's matrix work over the cores by itself, so on a small machine a
sequential run already uses every core: the script measures sequential runs with torch on all
cores and on one thread (OMP_NUM_THREADS=1, what each Ray worker gets), and Ray workers with one
thread each.

Two more figures, on Ray:

* engine reuse: the same stage with ``gpus_per_shard: 1`` on a cluster that declares ``--fake-gpus``
  GPUs (Ray schedules on them and sets CUDA_VISIBLE_DEVICES; the model still runs on the CPU):
  shards, worker processes and model loads, from the shard results (``pid``, ``loads``). Ray's
  default for a task that takes GPUs is a fresh worker per task (one load per shard); the flow's
  reusable workers load once per worker;
* a shard-size sweep (``--sweep``): wall time of the Ray run at each shard size, same work, on a
  2-worker cluster warmed by an untimed run.

    .venv/bin/python benchmarks/fanout.py [--problems 32] [--shard-size 4] [--tokens 96]
        [--workers 1 2 4] [--fake-gpus 2] [--sweep 2 8 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--fake-gpus", type=int, default=2, help="GPUs the engine-reuse cluster declares (0: skip)")
    ap.add_argument("--sweep", type=int, nargs="*", default=[2, 8, 32], help="shard sizes of the sweep (2 workers)")
    args = ap.parse_args()

    import ray
    import torch
    from helpers import tiny_config_dict
    from rscaffold_flows.ephemeral_server import prefect_api
    from rscaffold_flows.pipeline import rscaffold_stage

    from rscaffold.config import TinyModelConfig, config_from_dict
    from rscaffold.models import save_tiny_model
    from rscaffold.paths import default_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="rscaffold-fanout-"))
    smol = default_model_dir()
    tiny = save_tiny_model(str(smol), TinyModelConfig(hidden_size=128, intermediate_size=256), tmp / "tiny")
    n_shards = -(-args.problems // args.shard_size)

    def config(name: str, runner: str, *, shard_size: int = args.shard_size, gpus: float = 0):
        raw = tiny_config_dict(tiny, smol, tmp / name)
        raw["run"].update(task_runner=runner, request_cache="off", ray={"cpus_per_shard": 1, "gpus_per_shard": gpus})
        raw["problems"]["limit_train"] = args.problems
        raw["teacher"]["shard_size"] = shard_size
        raw["teacher"]["llm"]["batch_size"] = shard_size
        raw["teacher"]["sampling"]["max_new_tokens"] = args.tokens
        return config_from_dict(raw)

    rows = []
    with prefect_api():
        rscaffold_stage(config=config("warmup", "local"), stage="problems")  # server and imports warm
        for threads in (torch.get_num_threads(), 1):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            rscaffold_stage(config=config(f"seq-{threads}", "local"), stage="teacher")
            rows.append((f"sequential, torch on {threads} thread(s)", time.perf_counter() - t0))
        for n in args.workers:
            ray.init(num_cpus=n, include_dashboard=False, namespace="prefect", log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
            try:
                t0 = time.perf_counter()
                rscaffold_stage(config=config(f"ray-{n}", "ray"), stage="teacher")
                rows.append((f"Ray, {n} worker(s) x 1 thread", time.perf_counter() - t0))
            finally:
                ray.shutdown()
        reuse = None
        if args.fake_gpus:
            ray.init(num_cpus=args.fake_gpus, num_gpus=args.fake_gpus, include_dashboard=False, namespace="prefect",
                     log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
            try:
                t0 = time.perf_counter()
                shards = rscaffold_stage(config=config("ray-gpus", "ray", gpus=1), stage="teacher")["teacher"]["shards"]
                seconds = time.perf_counter() - t0
            finally:
                ray.shutdown()
            workers: dict[int, list[int]] = {}
            for sh in shards:
                workers.setdefault(sh["pid"], []).append(sh["loads"].get("llm", 0))
            reuse = (len(shards), len(workers), sum(max(v) for v in workers.values()), seconds)
        sweep = []
        if args.sweep:
            ray.init(num_cpus=2, include_dashboard=False, namespace="prefect", log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
            try:  # an untimed run first: every size then finds the workers started (as in a long run)
                rscaffold_stage(config=config("sweep-warm", "ray", shard_size=max(args.sweep)), stage="teacher")
                for size in args.sweep:
                    t0 = time.perf_counter()
                    rscaffold_stage(config=config(f"sweep-{size}", "ray", shard_size=size), stage="teacher")
                    sweep.append((size, -(-args.problems // size), time.perf_counter() - t0))
            finally:
                ray.shutdown()

    base = rows[0][1]
    print(f"cores: {os.cpu_count()}; {args.problems} problems, {n_shards} shards of {args.shard_size}, "
          f"{args.tokens} new tokens each, tiny model (hidden 128)")  # fmt: skip
    print(f"{'run':38s} {'wall s':>8s} {'shards/s':>9s} {'speedup':>8s}")
    for name, seconds in rows:
        print(f"{name:38s} {seconds:8.2f} {n_shards / seconds:9.3f} {base / seconds:8.2f}")
    if reuse is not None:
        n, w, loads, seconds = reuse
        print(f"\nengine reuse, gpus_per_shard 1 on {args.fake_gpus} declared GPUs: {n} shards on {w} worker "
              f"process(es), {loads} model load(s) ({loads / w:.1f} per worker; one per shard would be {n}), "
              f"{seconds:.2f} s")  # fmt: skip
    if sweep:
        print(f"\nshard-size sweep, Ray with 2 workers x 1 thread, {args.problems} problems:")
        print(f"{'shard size':>10s} {'shards':>7s} {'wall s':>8s} {'traces/s':>9s}")
        for size, shards_n, seconds in sweep:
            print(f"{size:10d} {shards_n:7d} {seconds:8.2f} {args.problems / seconds:9.2f}")


if __name__ == "__main__":
    main()
