"""Data-parallel stages on a real local Ray cluster (2 CPU workers, started by the test) through
prefect-ray: one Prefect task per shard, in different worker processes; a worker killed mid-shard
is retried; the stage's Parquet output is the one a sequential run writes; a worker holding a GPU
serves many shards with one model load, or one student server (the cluster declares 2 GPUs that do not exist: Ray then
schedules `num_gpus` tasks on them and sets CUDA_VISIBLE_DEVICES, which is all these tests need)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from helpers import tiny_config_dict
from prefect.testing.utilities import prefect_test_harness

from rscaffold.config import config_from_dict

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the Ray tests need rscaffold[ray]")
pytest.importorskip("prefect_ray", reason="the Ray tests need rscaffold[ray]")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, namespace="prefect", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def config(tiny_model_dir: Path, smollm2_dir: Path, artifacts: Path, runner: str, **teacher):
    raw = tiny_config_dict(tiny_model_dir, smollm2_dir, artifacts)
    raw["run"].update(task_runner=runner, retries=1, retry_delay_s=0)
    raw["teacher"].update(shard_size=2, **teacher)
    raw["labeling"].update(shard_size=2)
    raw["training"].update(students=["scaffolded"])
    raw["evaluation"].update(models=["base", "scaffolded"], shard_size=2)
    return config_from_dict(raw)


def table(ref: dict, name: str) -> list[dict]:
    rows = pq.read_table(Path(ref["path"]) / ref["outputs"][name]).to_pylist()
    return [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]


def test_shards_run_on_ray_workers_like_a_sequential_run(ray_cluster, harness, tiny_model_dir, smollm2_dir, tmp_path):
    from rscaffold_flows.pipeline import rscaffold_stage

    on_ray = rscaffold_stage(config=config(tiny_model_dir, smollm2_dir, tmp_path / "ray", "ray"), stage="evaluation")
    sequential = rscaffold_stage(
        config=config(tiny_model_dir, smollm2_dir, tmp_path / "seq", "local"), stage="evaluation"
    )
    shards = on_ray["teacher"]["shards"]
    assert [s["key"] for s in shards] == ["000000-000001", "000002-000003", "000004-000005", "000006-000007"]
    assert len({s["pid"] for s in shards}) >= 2 and os.getpid() not in {s["pid"] for s in shards}
    assert sum(s["generated"] for s in shards) == 8
    assert len({s["pid"] for s in on_ray["labeling"]["shards"]}) >= 1
    # evaluation: one shard per model, benchmark and 2 problems, each answered once
    answered = {s["key"]: s["answered"] for s in on_ray["evaluation"]["shards"]}
    assert list(answered) == [f"{m}-gsm8k-{lo:06d}-{lo + 1:06d}" for m in ("base", "scaffolded") for lo in (0, 2)]
    assert set(answered.values()) == {2}
    assert all("shards" not in sequential[stage] for stage in ("teacher", "labeling", "evaluation"))
    assert table(on_ray["teacher"], "traces") == table(sequential["teacher"], "traces")
    assert table(on_ray["labeling"], "labeled_steps") == table(sequential["labeling"], "labeled_steps")
    assert table(on_ray["evaluation"], "predictions") == table(sequential["evaluation"], "predictions")


def test_a_worker_killed_mid_shard_is_retried(ray_cluster, harness, tiny_model_dir, smollm2_dir, tmp_path):
    from rscaffold_flows.pipeline import rscaffold_stage

    cfg = config(tiny_model_dir, smollm2_dir, tmp_path / "kill", "ray")
    cfg.teacher.sampling.max_new_tokens = 96  # long enough to be caught mid-shard
    killed: list[int] = []

    def kill_a_busy_worker():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for p in psutil.process_iter(["cmdline"]):
                if " ".join(p.info["cmdline"] or []).startswith("ray::teacher-shard"):
                    time.sleep(0.3)  # inside the shard's generation
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    refs = rscaffold_stage(config=cfg, stage="teacher")
    killer.join(timeout=5)
    assert killed, "no shard was seen running"
    pids = {s["pid"] for s in refs["teacher"]["shards"]}
    assert killed[0] not in pids  # the killed worker's shard was done again elsewhere
    assert len(pq.read_table(Path(refs["teacher"]["path"]) / "traces.parquet")) == 8


def by_worker(shards: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for s in shards:
        out.setdefault(s["pid"], []).append(s)
    return out


def test_a_gpu_worker_serves_many_shards_with_one_model_load(
    ray_cluster, harness, tiny_model_dir, smollm2_dir, tmp_path
):
    from rscaffold_flows.pipeline import rscaffold_stage

    raw = tiny_config_dict(tiny_model_dir, smollm2_dir, tmp_path / "gpu")
    raw["run"].update(task_runner="ray", ray={"gpus_per_shard": 1})
    raw["teacher"].update(shard_size=1)
    raw["teacher"]["sampling"].update(max_new_tokens=4)
    raw["problems"].update(limit_train=6, limit_eval=4)
    raw["training"].update(tiny=None, student=str(tiny_model_dir), tokenizer=None)
    raw["evaluation"].update(models=["base"], shard_size=1, max_new_tokens=4)
    cfg = config_from_dict(raw)

    teacher = by_worker(rscaffold_stage(config=cfg, stage="teacher")["teacher"]["shards"])
    assert sum(len(v) for v in teacher.values()) == 6
    assert max(len(v) for v in teacher.values()) >= 2  # a worker is reused for several shards
    for shards in teacher.values():
        assert [s["loads"]["llm"] for s in shards] == [1] * len(shards)  # ...and loads the teacher once

    evaluation = by_worker(rscaffold_stage(config=cfg, stage="evaluation")["evaluation"]["shards"])
    assert sum(len(v) for v in evaluation.values()) == 4
    assert max(len(v) for v in evaluation.values()) >= 2
    for shards in evaluation.values():
        assert [s["loads"]["student"] for s in shards] == [1] * len(shards)


def test_a_gpu_worker_runs_one_student_server_for_its_evaluation_shards(
    ray_cluster, harness, tiny_model_dir, smollm2_dir, tmp_path
):
    from helpers import SERVE_ENV, TRANSFORMERS_SERVE, serve_available
    from rscaffold_flows.pipeline import rscaffold_stage

    why = serve_available()
    if why:
        pytest.skip(why)
    raw = tiny_config_dict(tiny_model_dir, smollm2_dir, tmp_path / "served")
    raw["run"].update(task_runner="ray", ray={"gpus_per_shard": 1})
    raw["problems"].update(limit_eval=4)
    raw["training"].update(tiny=None, student=str(tiny_model_dir), tokenizer=None)
    raw["evaluation"].update(
        models=["base"],
        shard_size=1,
        max_new_tokens=4,
        server={"command": TRANSFORMERS_SERVE, "env": SERVE_ENV},
        llm={"backend": "openai", "model": "{model_dir}", "base_url": "http://x/v1", "max_retries": 0},
    )
    evaluation = by_worker(rscaffold_stage(config=config_from_dict(raw), stage="evaluation")["evaluation"]["shards"])
    assert sum(len(v) for v in evaluation.values()) == 4
    assert max(len(v) for v in evaluation.values()) >= 2
    for shards in evaluation.values():
        assert [s["loads"]["server"] for s in shards] == [1] * len(shards)  # one server per worker
