"""Label statistics (rscaffold.labeling.quality): transitions, Cohen's kappa, the quality report."""

from __future__ import annotations

import json

import pytest
from helpers import (
    CONTRAST,
    LABEL_SAMPLING,
    QWQ_PRELABELS,
    R1_GOLD,
    REASONING,
    RESTATE,
    SIGNAL_NAMES,
    VERIFY,
    ScriptedLabelerBackend,
    json_label_answer,
    labeling_traces,
    llm_labeling_config,
)

from rscaffold.labeling.labeler import label_traces
from rscaffold.labeling.quality import cohens_kappa, label_quality_report, transition_matrix
from rscaffold.labeling.taxonomy import Taxonomy


def test_transition_matrix() -> None:
    names = ["A", "B", "C"]
    m = transition_matrix([["A", "B", "B", "C"], ["C", "A"], ["B"], []], names)
    assert m == [
        [0, 1, 0],  # A->B
        [0, 1, 1],  # B->B, B->C
        [1, 0, 0],  # C->A
    ]
    with pytest.raises(ValueError, match="unknown signal 'D'"):
        transition_matrix([["A", "D"]], names)


def test_cohens_kappa_hand_computed() -> None:
    a = ["x", "x", "x", "y", "y", "y", "x", "y", "x", "x"]
    b = ["x", "x", "y", "y", "y", "x", "x", "y", "x", "y"]
    # p_o = 7/10; p_e = (6*5 + 4*5) / 100 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    assert cohens_kappa(a, b) == pytest.approx(0.4)


def test_cohens_kappa_three_categories() -> None:
    a = ["A", "A", "B", "B", "C", "C"]
    b = ["A", "B", "B", "B", "C", "A"]
    # p_o = 4/6; p_e = (2*2 + 2*3 + 2*1) / 36 = 12/36; kappa = (4/6 - 1/3) / (2/3) = 0.5
    assert cohens_kappa(a, b) == pytest.approx(0.5)


def test_cohens_kappa_edges() -> None:
    assert cohens_kappa(["A", "B", "A"], ["A", "B", "A"]) == 1.0
    assert cohens_kappa(["A", "A"], ["A", "A"]) == 1.0
    assert cohens_kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="differ in length"):
        cohens_kappa(["A"], ["A", "B"])
    with pytest.raises(ValueError, match="empty"):
        cohens_kappa([], [])


def test_label_quality_report(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({"r1": [json_label_answer(R1_GOLD)], "qwq": ["garbage", "garbage"]})
    records = [
        r
        for recs in label_traces(labeling_traces(), tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config())
        for r in recs
    ]
    report = label_quality_report(records, tax)
    json.dumps(report)  # JSON-able
    assert report["traces"] == 2 and report["steps"] == 16
    assert report["source_counts"] == {"llm": 10, "fallback": 6}
    assert report["keyword_coverage"] == pytest.approx(14 / 16)
    # only the R1 trace was LLM-labeled: 9 pre-labels checked, 8 kept
    assert report["prelabel_checked"] == 9
    assert report["prelabel_agreement"] == pytest.approx(8 / 9)
    expected = R1_GOLD + [p or REASONING for p in QWQ_PRELABELS]
    assert report["signal_counts"] == {k: expected.count(k) for k in SIGNAL_NAMES}
    m = report["transitions"]
    assert sum(map(sum, m)) == 9 + 5
    # contrast -> verify: R1 steps 3 -> 4 and QwQ (fallback labels) steps 4 -> 5
    assert m[SIGNAL_NAMES.index(CONTRAST)][SIGNAL_NAMES.index(VERIFY)] == 2
    assert m[SIGNAL_NAMES.index(VERIFY)][SIGNAL_NAMES.index(REASONING)] == 1  # R1 steps 4 -> 5
    assert report["first_signal_counts"] == {RESTATE: 2}
