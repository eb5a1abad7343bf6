"""The method at the stage level: a tiny run of the six stages (library stage functions) whose
student is the untied, padded tiny Qwen2, with the default training students and evaluation models.

* baselines: base, short-CoT, long-thinking (cot_sft) and scaffolded students, trained on the same
  data, answer side by side;
* gating: the scaffolded student also answers without gating and without pruning; the gate's
  threshold is calibrated on the validation rows and recorded in the evaluation manifest;
* budgets: every model gets the same token budget; the per-step cap is the longest training step,
  recorded in the evaluation manifest;
* prompts: every student was trained on the problems' benchmark family prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rscaffold.config import config_from_dict
from rscaffold.paths import data_dir
from rscaffold.records import ExampleRecord, MetricRecord
from rscaffold.store import read_records
from rscaffold.vocabulary import EVAL_MODELS, TRAINED_STUDENTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tiny_model_dir, smollm2_dir, tmp_path_factory):
    from rscaffold.stages.dataset import run_dataset
    from rscaffold.stages.evaluation import run_evaluation
    from rscaffold.stages.labeling import run_labeling
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.problems import run_problems
    from rscaffold.stages.teacher import run_teacher
    from rscaffold.stages.training import run_training

    problems_dir = data_dir() / "problems"
    cfg = config_from_dict(
        {
            "run": {"artifacts_dir": str(tmp_path_factory.mktemp("paper-scale") / "artifacts")},
            "problems": {
                "train": str(problems_dir / "train.jsonl"),
                "eval": str(problems_dir / "eval.jsonl"),
                "limit_train": 8,
                "limit_eval": 2,
            },
            "teacher": {
                "llm": {"model": str(tiny_model_dir), "batch_size": 8},
                # a random-init model decodes only newlines greedily; sampling gives it text
                "sampling": {"max_new_tokens": 24, "temperature": 1.0, "seed": 1},
                "keep": "all",  # a random-init teacher's traces all hit the token limit
            },
            "labeling": {"method": "keyword"},
            "dataset": {"validation_fraction": 0.25},
            "training": {
                "student": str(smollm2_dir),
                "tokenizer": str(smollm2_dir),
                "tiny": {"architecture": "qwen2", "tie_word_embeddings": False, "vocab_padding": 64},
                "max_steps": 2,
                "per_device_batch_size": 2,
                "max_length": 128,
            },
            "evaluation": {"max_new_tokens": 16, "batch_size": 2, "bootstrap_samples": 10},
        }
    )
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    teacher = run_teacher(cfg, fps, problems)
    labeling = run_labeling(cfg, fps, teacher)
    dataset = run_dataset(cfg, fps, teacher=teacher, labeling=labeling)
    training = run_training(cfg, fps, dataset)
    evaluation = run_evaluation(cfg, fps, problems=problems, training=training, labeling=labeling)
    return cfg, training, evaluation


def _meta(training, name) -> dict:
    return json.loads((Path(training.path) / training.outputs[name] / "rscaffold_student.json").read_text())


def test_all_students_are_trained_on_the_same_rows_with_the_family_prompt(finished):
    cfg, training, _ = finished
    assert cfg.training.students == list(TRAINED_STUDENTS)
    for name in TRAINED_STUDENTS:
        meta = _meta(training, name)
        assert meta["prompt_benchmark"] == "gsm8k"
        assert meta["target"] == ("answer" if name == "short_cot" else "trace")
    # the tiny teacher writes no reasoning block: its answer text is its whole trace, so the
    # short-CoT student is the long-thinking one (copied, not trained twice)
    assert _meta(training, "short_cot")["identical_to"] == "cot_sft"
    assert read_records(training.output("validation"), ExampleRecord)  # kept for the gate's calibration
    assert _meta(training, "scaffolded")["longest_step_tokens"] > 0


def test_every_model_and_ablation_answers_side_by_side_with_the_same_budget(finished):
    cfg, training, evaluation = finished
    metrics = read_records(evaluation.output("metrics"), MetricRecord)
    assert [m.model for m in metrics] == list(EVAL_MODELS)
    report = evaluation.output("report").read_text()
    assert all(f"| {m} |" in report for m in EVAL_MODELS)
    decoding = evaluation.summary["decoding"]
    assert {d["max_new_tokens"] for d in decoding.values()} == {cfg.evaluation.max_new_tokens}
    assert all(m.mean_output_tokens <= cfg.evaluation.max_new_tokens for m in metrics)


def test_the_manifest_records_the_gate_the_pruning_and_the_step_cap(finished):
    _, training, evaluation = finished
    manifest = json.loads((Path(evaluation.path) / "manifest.json").read_text())
    decoding = manifest["summary"]["decoding"]
    longest = _meta(training, "scaffolded")["longest_step_tokens"]
    main, nogate, noprune = (decoding[m] for m in ("scaffolded", "scaffolded-nogate", "scaffolded-noprune"))
    for d in (main, nogate, noprune):
        assert d["mode"] == "guided"
        assert d["settings"]["max_step_tokens"] == longest and d["max_step_tokens_source"] == "longest training step"
        assert d["settings"]["max_steps"] is None
    assert main["threshold_source"] == "calibrated" and main["calibration"]["boundaries"] > 0
    assert main["settings"]["confidence_threshold"] == main["calibration"]["threshold"]
    assert main["settings"]["prune_signals"] == ["Restatement and Clarification"]
    assert nogate["settings"]["confidence_threshold"] == 0 and nogate["threshold_source"] == "no gate"
    assert nogate["settings"]["prune_signals"] == ["Restatement and Clarification"]
    assert noprune["settings"]["prune_signals"] == [] and noprune["prune_source"] == "no pruning"
    assert noprune["threshold_source"] == "calibrated"
    assert decoding["base"] == {"mode": "plain", "max_new_tokens": 16}
