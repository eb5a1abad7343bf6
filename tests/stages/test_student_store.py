"""The training stage shares a student across configs that differ only in what it does not depend on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_config, run_upstream_stages

import rscaffold.training.trainer as trainer_mod
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.training import run_training, student_store

pytestmark = pytest.mark.slow


def test_a_new_signal_loss_weight_trains_only_the_scaffolded_student(
    tiny_model_dir, smollm2_dir, tmp_path, monkeypatch
):
    def config(weight: float):
        return make_config(
            tiny_model_dir,
            smollm2_dir,
            tmp_path / "artifacts",
            max_steps=1,
            students=["scaffolded", "cot_sft"],
            signal_loss_weight=weight,
        )

    cfg1, cfg2 = config(1.0), config(2.0)
    fps1, fps2 = plan_fingerprints(cfg1), plan_fingerprints(cfg2)
    assert fps1["dataset"] == fps2["dataset"] and fps1["training"] != fps2["training"]
    upstream = run_upstream_stages(cfg1, fps1)

    trained: list[tuple[bool, float]] = []
    original = trainer_mod.train_student

    def recording(rows, tcfg, *a, scaffolded, **kw):
        trained.append((scaffolded, tcfg.signal_loss_weight))
        return original(rows, tcfg, *a, scaffolded=scaffolded, **kw)

    monkeypatch.setattr(trainer_mod, "train_student", recording)
    ref1 = run_training(cfg1, fps1, upstream["dataset"])
    ref2 = run_training(cfg2, fps2, upstream["dataset"])
    assert trained == [(True, 1.0), (False, 1.0), (True, 2.0)]

    # the second stage's baseline is the stored one: its files are the same files
    store = student_store(cfg1, fps1["dataset"], "cot_sft")
    assert store.is_complete() and not store.verify()
    stored = store.path / "model" / "model.safetensors"
    for ref in (ref1, ref2):
        assert os.path.samefile(Path(ref.path) / ref.outputs["cot_sft"] / "model.safetensors", stored)
    # the scaffolded students differ, and each is in the store under its own fingerprint
    scaffolded = [student_store(c, fps1["dataset"], "scaffolded") for c in (cfg1, cfg2)]
    assert scaffolded[0].path != scaffolded[1].path and all(s.is_complete() for s in scaffolded)


def test_two_runs_needing_one_baseline_at_once_train_it_once(tiny_model_dir, smollm2_dir, tmp_path, monkeypatch):
    """Two configs (cells of an experiment run side by side) that share a baseline: one trains it
    under the student store's lock, the other waits for it and takes the stored model."""
    import threading
    import time

    def config(weight: float):
        return make_config(
            tiny_model_dir,
            smollm2_dir,
            tmp_path / "artifacts",
            max_steps=1,
            students=["cot_sft"],
            signal_loss_weight=weight,
        )

    cfgs = [config(1.0), config(2.0)]
    fps = [plan_fingerprints(c) for c in cfgs]
    assert fps[0]["training"] != fps[1]["training"]
    upstream = run_upstream_stages(cfgs[0], fps[0])

    trained: list[str] = []
    original = trainer_mod.train_student

    def slow_recording(rows, tcfg, *a, **kw):
        trained.append(threading.current_thread().name)
        time.sleep(1.0)  # the other run reaches this student while it is being trained
        return original(rows, tcfg, *a, **kw)

    monkeypatch.setattr(trainer_mod, "train_student", slow_recording)
    refs: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            refs[i] = run_training(cfgs[i], fps[i], upstream["dataset"])
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,), name=f"cell{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(trained) == 1, trained
    stored = student_store(cfgs[0], fps[0]["dataset"], "cot_sft").path / "model" / "model.safetensors"
    for ref in refs.values():
        assert os.path.samefile(Path(ref.path) / ref.outputs["cot_sft"] / "model.safetensors", stored)
