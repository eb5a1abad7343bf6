"""Which stages a run computes follows from the stage declarations and the requested models."""

from __future__ import annotations

import pytest

from rscaffold.config import config_from_dict
from rscaffold.stages.registry import stages_to_run

ALL = ["problems", "teacher", "labeling", "dataset", "training", "evaluation"]


def _cfg(models, **training):
    return config_from_dict({"evaluation": {"models": models}, "training": training})


def test_evaluating_only_the_base_student_runs_no_teacher_labeling_or_training():
    assert stages_to_run(_cfg(["base"]), "evaluation") == ["problems", "evaluation"]


def test_a_random_init_base_is_made_by_the_training_stage_so_it_runs():
    cfg = _cfg(["base"], tiny={}, students=["short_cot"])
    assert stages_to_run(cfg, "evaluation") == ["problems", "teacher", "labeling", "dataset", "training", "evaluation"]


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (["base", "short_cot"], ALL[:2] + ["labeling", "dataset", "training", "evaluation"]),
        (["base", "scaffolded"], ALL),
    ],
)
def test_trained_students_need_training_and_its_inputs(models, expected):
    assert stages_to_run(_cfg(models), "evaluation") == expected


def test_labels_are_read_by_the_evaluation_only_for_a_scaffolded_student():
    from rscaffold.stages.registry import stage

    assert "labeling" not in stage("evaluation").needed(_cfg(["base", "cot_sft"]))
    assert "labeling" in stage("evaluation").needed(_cfg(["scaffolded-nogate"]))


def test_a_stage_asked_for_runs_even_when_the_final_stage_does_not_need_it():
    cfg = _cfg(["base"])
    assert stages_to_run(cfg, "evaluation", also={"teacher"}) == ["problems", "teacher", "evaluation"]
    assert stages_to_run(cfg, "teacher") == ["problems", "teacher"]
