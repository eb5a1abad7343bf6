"""End-to-end: the real Prefect flow on a tiny random-init model, under prefect_test_harness.

Every stage does its real work (generation, LLM labeling with validation + fallback, TRL training,
evaluation); the tiny model makes each stage take seconds. Checks real rows in every Parquet
output, Prefect cache hits on a second run, selective re-runs, and resume after a failure
injected into the training stage.
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from helpers import make_config, tiny_config_dict
from prefect.testing.utilities import prefect_test_harness

from rscaffold.config import config_from_dict
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.store import StageDir
from rscaffold.vocabulary import EVAL_MODELS, STAGES, TRAINED_STUDENTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


class CallCounter:
    """Counts how often each stage's library function actually ran (a Prefect cache hit skips it)."""

    def __init__(self, monkeypatch):
        self.calls: Counter[str] = Counter()
        for stage in STAGES:
            stage_mod = importlib.import_module(f"rscaffold.stages.{stage}")
            original = getattr(stage_mod, f"run_{stage}")

            def wrapped(*a, __orig=original, __stage=stage, **kw):
                self.calls[__stage] += 1
                return __orig(*a, **kw)

            monkeypatch.setattr(stage_mod, f"run_{stage}", wrapped)


def test_pipeline_end_to_end(harness, tiny_model_dir, smollm2_dir, tmp_path, monkeypatch):
    from rscaffold_flows.pipeline import rscaffold_pipeline

    cfg = make_config(tiny_model_dir, smollm2_dir, tmp_path / "artifacts")
    counter = CallCounter(monkeypatch)
    refs = rscaffold_pipeline(config=cfg)
    assert set(refs) == set(STAGES)
    assert counter.calls == Counter({s: 1 for s in STAGES})

    # real rows in every Parquet output, readable with plain pyarrow / polars
    def table(stage: str, name: str):
        return pq.read_table(Path(refs[stage]["path"]) / refs[stage]["outputs"][name])

    problems = table("problems", "problems")
    assert Counter(problems.column("split").to_pylist()) == {"train": 8, "eval": 4}
    traces = table("teacher", "traces")
    assert traces.num_rows == 8 and all(traces.column("model").to_pylist())
    steps = pl.read_parquet(Path(refs["labeling"]["path"]) / "labeled_steps.parquet")
    assert steps.height > 0 and set(steps["source"].unique()) <= {"llm", "keyword", "fallback"}
    examples = table("dataset", "examples")
    assert examples.num_rows > 0 and set(examples.column("split").to_pylist()) <= {"train", "validation"}
    assert min(examples.column("n_steps").to_pylist()) >= 1
    preds = pl.read_parquet(Path(refs["evaluation"]["path"]) / "predictions.parquet")
    assert preds.height == len(EVAL_MODELS) * 4 and set(preds["model"].unique()) == set(EVAL_MODELS)
    metrics = pl.read_parquet(Path(refs["evaluation"]["path"]) / "metrics.parquet")
    assert metrics.height == len(EVAL_MODELS) and metrics["accuracy"].is_between(0, 1).all()
    for model in TRAINED_STUDENTS:
        assert (Path(refs["training"]["path"]) / refs["training"]["outputs"][model] / "config.json").exists()

    # second run, nothing changed: Prefect cache hit for every stage, nothing recomputed
    counter.calls.clear()
    refs2 = rscaffold_pipeline(config=cfg)
    assert counter.calls == Counter()
    assert {s: r["fingerprint"] for s, r in refs2.items()} == {s: r["fingerprint"] for s, r in refs.items()}

    # changing only the training config re-runs training and evaluation only
    cfg_lr = make_config(tiny_model_dir, smollm2_dir, tmp_path / "artifacts", learning_rate=1e-4)
    rscaffold_pipeline(config=cfg_lr)
    assert counter.calls == Counter({"training": 1, "evaluation": 1})

    # --refresh labeling forces labeling and everything after it
    counter.calls.clear()
    rscaffold_pipeline(config=cfg, refresh=["labeling"])
    assert counter.calls == Counter({"labeling": 1, "dataset": 1, "training": 1, "evaluation": 1})


def test_evaluating_only_the_base_student_runs_only_what_it_needs(
    harness, tiny_model_dir, smollm2_dir, tmp_path, monkeypatch
):
    """``evaluation.models: [base]`` (how good is the student before distillation?) runs the
    problems and the evaluation: no teacher, no labels, no training."""
    from rscaffold_flows.pipeline import rscaffold_pipeline

    raw = tiny_config_dict(tiny_model_dir, smollm2_dir, tmp_path / "artifacts")
    raw["training"].update(student=str(tiny_model_dir), tiny=None, tokenizer=None)
    raw["evaluation"]["models"] = ["base"]
    cfg = config_from_dict(raw)
    counter = CallCounter(monkeypatch)
    refs = rscaffold_pipeline(config=cfg)
    assert set(refs) == {"problems", "evaluation"}
    assert counter.calls == Counter({"problems": 1, "evaluation": 1})
    preds = pl.read_parquet(Path(refs["evaluation"]["path"]) / "predictions.parquet")
    assert preds.height == 4 and set(preds["model"].unique()) == {"base"}
    assert not (Path(cfg.run.artifacts_dir) / "teacher").exists()


def test_training_failure_keeps_upstream_and_resumes(harness, tiny_model_dir, smollm2_dir, tmp_path, monkeypatch):
    from rscaffold_flows.pipeline import rscaffold_pipeline

    import rscaffold.training.trainer as trainer_mod

    cfg = make_config(tiny_model_dir, smollm2_dir, tmp_path / "artifacts", max_steps=3)
    fps = plan_fingerprints(cfg)
    original = trainer_mod.train_student
    trained: list[bool] = []

    def failing_after_scaffolded(rows, tcfg, names, *, signal_tokens, output_dir, scaffolded, model_card_info, **kw):
        # Injected failure: the scaffolded student trains, then the baseline's training crashes.
        if not scaffolded:
            raise RuntimeError("injected failure in training")
        trained.append(scaffolded)
        return original(
            rows,
            tcfg,
            names,
            signal_tokens=signal_tokens,
            output_dir=output_dir,
            scaffolded=scaffolded,
            model_card_info=model_card_info,
            **kw,
        )

    monkeypatch.setattr(trainer_mod, "train_student", failing_after_scaffolded)
    with pytest.raises(RuntimeError, match="injected failure"):
        rscaffold_pipeline(config=cfg)
    root = Path(cfg.run.artifacts_dir)
    for stage in ("problems", "teacher", "labeling", "dataset"):
        assert (root / stage / fps[stage] / "manifest.json").exists(), stage
    training = StageDir(root, "training", fps["training"])
    assert not training.is_complete()
    # the finished student is kept in the stage's work directory, for the next attempt
    assert (training.work / "scaffolded" / "model" / "rscaffold_student.json").exists(), "the finished student is kept"

    retrained: list[bool] = []

    def counting(rows, tcfg, names, *, signal_tokens, output_dir, scaffolded, model_card_info, **kw):
        retrained.append(scaffolded)
        return original(
            rows,
            tcfg,
            names,
            signal_tokens=signal_tokens,
            output_dir=output_dir,
            scaffolded=scaffolded,
            model_card_info=model_card_info,
            **kw,
        )

    monkeypatch.setattr(trainer_mod, "train_student", counting)
    counter = CallCounter(monkeypatch)
    refs = rscaffold_pipeline(config=cfg)
    # upstream stages come from Prefect's cache; training resumes with the baseline only
    assert counter.calls == Counter({"training": 1, "evaluation": 1})
    assert retrained == [False]
    assert (Path(refs["training"]["path"]) / "manifest.json").exists()
    assert pq.read_table(Path(refs["evaluation"]["path"]) / "metrics.parquet").num_rows == len(EVAL_MODELS)
