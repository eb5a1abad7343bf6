"""End-to-end: an experiment grid (two signal-loss weights x two seeds) through the real Prefect
flow on tiny random-init models; then a third weight, with one of its cells failing once."""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import tiny_config_dict
from prefect.testing.utilities import prefect_test_harness

import rscaffold.training.trainer as trainer_mod
from rscaffold.experiment.grid import experiment_cost, load_experiment_file
from rscaffold.vocabulary import STAGES

pytestmark = pytest.mark.slow

MODELS = ["cot_sft", "scaffolded"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _experiment(path: Path, cfg: dict, weights: list[float]) -> Path:
    cfg = {
        **cfg,
        "training": {**cfg["training"], "students": MODELS},
        "evaluation": {**cfg["evaluation"], "models": MODELS},
    }
    path.write_text(
        yaml.safe_dump(
            {
                "name": "lambda-grid",
                "config": cfg,
                "axes": {"training.signal_loss_weight": weights, "training.seed": [0, 1]},
                "bootstrap_samples": 200,
            },
            sort_keys=False,
        )
    )
    return path


def test_grid_shares_upstream_and_baselines_and_adds_cells_alone(
    harness, tiny_model_dir, smollm2_dir, tmp_path, monkeypatch
):
    from rscaffold_flows.experiment import ExperimentCellsFailedError, rscaffold_experiment

    cfg = tiny_config_dict(tiny_model_dir, smollm2_dir, tmp_path / "artifacts", max_steps=1)
    path = _experiment(tmp_path / "grid.yaml", cfg, [0.5, 1.0])

    calls: Counter[str] = Counter()
    for stage in STAGES:
        mod = importlib.import_module(f"rscaffold.stages.{stage}")
        original_stage = getattr(mod, f"run_{stage}")

        def counted(*a, __orig=original_stage, __stage=stage, **kw):
            calls[__stage] += 1
            return __orig(*a, **kw)

        monkeypatch.setattr(mod, f"run_{stage}", counted)
    trained: list[tuple[bool, int, float]] = []
    original = trainer_mod.train_student
    fail_for: set[tuple[int, float]] = set()

    def recording(rows, tcfg, *a, scaffolded, **kw):
        if (tcfg.seed, tcfg.signal_loss_weight) in fail_for and scaffolded:
            raise RuntimeError("injected failure in training")
        trained.append((scaffolded, tcfg.seed, tcfg.signal_loss_weight))
        return original(rows, tcfg, *a, scaffolded=scaffolded, **kw)

    monkeypatch.setattr(trainer_mod, "train_student", recording)

    cost = experiment_cost(load_experiment_file(path))
    assert (cost.cells, cost.teacher_runs, cost.labeling_runs, cost.evaluations) == (4, 1, 1, 4)
    assert cost.teacher_requests == 8 and cost.labeler_requests == 8  # 8 train problems, one sample each
    # 4 scaffolded students (2 weights x 2 seeds) and one baseline per seed
    assert Counter(name for name, _ in cost.training_runs) == {"scaffolded": 4, "cot_sft": 2}

    out = rscaffold_experiment(str(path))
    assert out["failed"] == {} and len(out["evaluations"]) == 4
    assert calls["problems"] == calls["teacher"] == calls["labeling"] == calls["dataset"] == 1
    assert calls["training"] == calls["evaluation"] == 4
    scaffolded = Counter((seed, w) for s, seed, w in trained if s)
    assert scaffolded == {(0, 0.5): 1, (1, 0.5): 1, (0, 1.0): 1, (1, 1.0): 1}
    # the baseline is trained once per seed, in the seed's first cell; the other weight reuses it
    assert [(seed, w) for s, seed, w in trained if not s] == [(0, 0.5), (1, 0.5)]

    results = pl.read_parquet(out["files"]["results"])
    assert results.height == 4 * len(MODELS)  # cells x models x one benchmark
    assert {"training.signal_loss_weight", "training.seed", "seed", "label", "diff_ci_low"} <= set(results.columns)
    tested = results.filter(pl.col("model") != "cot_sft")
    assert tested["p_mcnemar"].is_between(0, 1).all() and tested["p_holm"].is_not_null().all()
    assert tested["n_comparisons"].unique().to_list() == [4]
    summary = pl.read_parquet(out["files"]["summary"])
    # the baseline is one row (it does not depend on the weight), the scaffolded student one per weight
    assert summary["label"].to_list() == [
        "cot_sft",
        "scaffolded (signal_loss_weight=0.5)",
        "scaffolded (signal_loss_weight=1.0)",
    ]
    assert summary["seeds"].to_list() == [2, 2, 2]
    report = Path(out["files"]["report"]).read_text()
    assert "Holm's correction over all 4 comparisons" in report and "scaffolded (signal_loss_weight=0.5)" in report
    assert Path(out["files"]["plot"]).read_bytes()[:4] == b"\x89PNG"

    # a third weight: the dry run counts one new scaffolded student per seed and nothing upstream
    path3 = _experiment(tmp_path / "grid.yaml", cfg, [0.5, 1.0, 2.0])
    cost = experiment_cost(load_experiment_file(path3))
    assert (cost.teacher_runs, cost.labeling_runs, cost.evaluations, cost.evaluations_reused) == (0, 0, 2, 4)
    assert sorted(name for name, _ in cost.training_runs) == ["scaffolded", "scaffolded"]

    # ... whose seed-1 cell fails once: the other cells complete and are reported, the flow fails
    calls.clear()
    trained.clear()
    fail_for.add((1, 2.0))
    with pytest.raises(ExperimentCellsFailedError, match=r"1 of 6 cell\(s\) failed: signal_loss_weight=2.0,seed=1"):
        rscaffold_experiment(str(path3))
    assert [t for t in trained if t[0]] == [(True, 0, 2.0)]
    assert pl.read_parquet(out["files"]["results"])["cell"].n_unique() == 5
    # run again: only the failed cell's scaffolded student trains
    fail_for.clear()
    trained.clear()
    out = rscaffold_experiment(str(path3))
    assert trained == [(True, 1, 2.0)]
    assert calls["teacher"] == calls["labeling"] == calls["dataset"] == 0
    assert pl.read_parquet(out["files"]["results"])["cell"].n_unique() == 6
