"""The labeling stage (rscaffold.stages.labeling): its fallback threshold, on a real (tiny) teacher
stage output."""

import pytest

from rscaffold.config import config_from_dict
from rscaffold.llm.base import Capabilities
from rscaffold.paths import data_dir
from rscaffold.records import LabeledStepRecord
from rscaffold.stages import labeling as labeling_stage
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems
from rscaffold.stages.teacher import run_teacher
from rscaffold.store import StageDir


def test_fallback_rate_above_threshold_fails_after_saving(tiny_model_dir, tmp_path, monkeypatch):
    d = data_dir() / "problems"
    cfg = config_from_dict(
        {
            "run": {"artifacts_dir": str(tmp_path)},
            "problems": {
                "train": str(d / "train.jsonl"),
                "eval": str(d / "eval.jsonl"),
                "limit_train": 4,
                "limit_eval": 2,
            },
            "teacher": {
                "llm": {"model": str(tiny_model_dir)},
                "sampling": {"max_new_tokens": 16, "temperature": 1.0, "seed": 1},
                "keep": "all",  # a random-init teacher's traces all hit the token limit
            },
            "labeling": {"max_fallback_rate": 0.5, "retries_on_invalid": 0},
        }
    )
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    teacher = run_teacher(cfg, fps, problems)

    import rscaffold.llm.transformers_local as tl

    # A labeler whose answers are never valid (unconstrained, and cut to one token).
    monkeypatch.setattr(tl.TransformersBackend, "capabilities", Capabilities(line_choices=False))
    cfg.labeling.sampling.max_new_tokens = 1
    monkeypatch.setattr(tl.TransformersBackend, "_constraints", lambda self, batch: [None] * len(batch))
    with pytest.raises(labeling_stage.LabelingFailureError, match="fell back to keyword labels"):
        labeling_stage.run_labeling(cfg, fps, teacher)
    sd = StageDir(tmp_path, "labeling", fps["labeling"])
    assert not sd.is_complete()
    saved = sd.read_shards("labeled_steps", LabeledStepRecord)
    assert saved and {s.source for s in saved} <= {"fallback", "keyword"}


def test_a_shard_task_reads_only_its_own_shard(tiny_model_dir, tmp_path, monkeypatch):
    import rscaffold.store as store

    d = data_dir() / "problems"
    cfg = config_from_dict(
        {
            "run": {"artifacts_dir": str(tmp_path)},
            "problems": {"train": str(d / "train.jsonl"), "eval": str(d / "eval.jsonl"), "limit_train": 4},
            "teacher": {
                "llm": {"model": str(tiny_model_dir)},
                "sampling": {"max_new_tokens": 16, "temperature": 1.0, "seed": 1},
                "keep": "all",
            },
            "labeling": {"method": "keyword", "shard_size": 1},
        }
    )
    fps = plan_fingerprints(cfg)
    teacher = run_teacher(cfg, fps, run_problems(cfg, fps))
    keys = labeling_stage.labeling_shards(cfg, teacher)
    for key in keys:
        labeling_stage.run_labeling_shard(cfg, fps, teacher, key=key)
    made = StageDir(tmp_path, "labeling", fps["labeling"]).shard_keys("labeled_steps")
    assert len(made) >= 2
    read: list[str] = []
    real = store.read_records
    monkeypatch.setattr(store, "read_records", lambda path, *a, **k: read.append(path.name) or real(path, *a, **k))
    assert labeling_stage.run_labeling_shard(cfg, fps, teacher, key=made[-1])["labeled"] == 0  # done before
    assert read == [f"labeled_steps-{made[-1]}.parquet"]
