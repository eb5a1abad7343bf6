"""An experiment's cells in parallel on a real local Ray cluster (2 CPU workers, started by the
test): each cell one task in a worker process, a failing cell fails alone (after its retry) while
the others complete, and two cells needing one baseline student train it once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config_dict
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from rscaffold.experiment.grid import load_experiment_file
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.training import student_store

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the Ray tests need rscaffold[ray]")
pytest.importorskip("prefect_ray", reason="the Ray tests need rscaffold[ray]")

MODELS = ["cot_sft", "scaffolded"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, namespace="prefect", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_cells_run_in_parallel_on_ray_and_a_failed_cell_fails_alone(
    ray_cluster, harness, tiny_model_dir, smollm2_dir, tmp_path
):
    from rscaffold_flows.experiment import run_experiment

    cfg = tiny_config_dict(tiny_model_dir, smollm2_dir, tmp_path / "artifacts", max_steps=1, students=MODELS)
    cfg["run"].update(task_runner="ray", retries=1, retry_delay_s=0)
    cfg["evaluation"]["models"] = MODELS
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "parallel",
                "config": cfg,
                "axes": {
                    "variant": {
                        "low": {"training.signal_loss_weight": 0.5},
                        "high": {"training.signal_loss_weight": 2.0},
                        # its students' examples do not fit in 16 tokens: the training stage refuses
                        "broken": {"training.signal_loss_weight": 1.0, "training.max_length": 16},
                    }
                },
                "bootstrap_samples": 50,
            }
        )
    )
    experiment = load_experiment_file(path)

    @flow
    def experiment_flow():
        return run_experiment(experiment)

    out = experiment_flow()
    ids = {c.id: c for c in experiment.cells}
    broken = next(i for i in ids if "broken" in i)
    assert set(out["failed"]) == {broken} and "max_length" in out["failed"][broken]
    assert set(out["evaluations"]) == set(ids) - {broken}
    assert Path(out["files"]["report"]).exists()
    # every cell ran in a Ray worker, not here
    pids = {w["pid"] for w in out["cells_ran_at"].values()}
    assert pids and os.getpid() not in pids
    # the baseline both finished cells need was trained once: both use the stored model's files
    ok = [ids[i].config for i in out["evaluations"]]
    dataset = plan_fingerprints(ok[0])["dataset"]
    stored = student_store(ok[0], dataset, "cot_sft").path / "model" / "model.safetensors"
    for c in ok:
        fp = plan_fingerprints(c)["training"]
        model = Path(c.run.artifacts_dir) / "training" / fp / "cot_sft" / "model" / "model.safetensors"
        assert os.path.samefile(model, stored)
