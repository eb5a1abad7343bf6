"""Agreement of the generated signals with the teacher's transitions (rscaffold.evaluation.signals)."""

from __future__ import annotations

import math

import pytest
from helpers import TOY_SIGNALS

from rscaffold.evaluation.signals import transition_agreement, transition_counts


def test_transition_agreement_identical_and_disjoint():
    teacher = transition_counts([["A", "B", "C"], ["A", "B", "C"]], TOY_SIGNALS)
    assert teacher == [[0, 2, 0], [0, 0, 2], [0, 0, 0]]
    same = transition_agreement([["A", "B", "C"]], teacher, TOY_SIGNALS, teacher_signal_counts={"A": 2, "B": 2, "C": 2})
    assert same["transition_tv"] == 0 and same["transition_coverage"] == 1 and same["signal_tv"] == 0
    assert same["rows_compared"] == 2 and same["generated_transitions"] == 2
    assert same["transition_kl"] == pytest.approx(math.log(2.5 / 1.5))  # smoothing only: (1 + .5) / (1 + 3 * .5)
    # from A the student always goes to C, from B always back to A: disjoint next-signal rows
    other = transition_agreement(
        [["A", "C"], ["B", "A"]], teacher, TOY_SIGNALS, teacher_signal_counts={"A": 2, "B": 2, "C": 2}
    )
    assert other["transition_tv"] == pytest.approx(1.0) and other["transition_kl"] > same["transition_kl"]


def test_transition_agreement_weights_rows_by_teacher_mass():
    teacher = [[3, 1, 0], [0, 0, 0], [0, 0, 1]]  # A: 4 transitions, C: 1
    gen = [["A", "A", "B"], ["C", "A"]]  # A -> A, A -> B; C -> A
    out = transition_agreement(gen, teacher, TOY_SIGNALS)
    tv_a = 0.5 * (abs(0.75 - 0.5) + abs(0.25 - 0.5))
    tv_c = 0.5 * (1 + 1)
    assert out["transition_tv"] == pytest.approx(0.8 * tv_a + 0.2 * tv_c)
    assert out["transition_coverage"] == 1.0 and out["signal_tv"] is None
    # rows the student never leaves are not compared; coverage says how much of the teacher is left out
    only_a = transition_agreement([["A", "B"]], teacher, TOY_SIGNALS)
    assert only_a["rows_compared"] == 1 and only_a["transition_coverage"] == pytest.approx(0.8)
    assert transition_agreement([[]], teacher, TOY_SIGNALS)["transition_tv"] is None
