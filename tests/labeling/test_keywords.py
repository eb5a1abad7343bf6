"""Keyword pre-labels and fallback labels (rscaffold.labeling.keywords)."""

from __future__ import annotations

import pytest
from helpers import (
    ADDITION,
    CONCLUSION,
    CONTRAST,
    HYPOTHESIS,
    QWQ_PRELABELS,
    QWQ_TRACE,
    R1_CUES,
    R1_PRELABELS,
    R1_TRACE,
    REASONING,
    RESTATE,
    VERIFY,
)

from rscaffold.config import SegmentationConfig
from rscaffold.labeling.keywords import fallback_label, keyword_prelabel
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.segment import split_steps


def test_each_example_is_prelabeled_as_its_own_signal(tax: Taxonomy) -> None:
    for s in tax.signals:
        assert keyword_prelabel(s.example, tax)[0] == s.name, s.example


@pytest.mark.parametrize(
    ("step", "signal", "cue"),
    [
        ("Wait, that's not right.", CONTRAST, "wait"),
        ("BUT the train was late.", CONTRAST, "but"),
        ("On the other hand, 3 is odd.", CONTRAST, "on the other hand"),
        ("So the answer is 42.", CONCLUSION, "so the answer"),  # longest cue wins over "so"
        ("So we divide by 2.", REASONING, "so"),
        ("Another approach: count the corners.", HYPOTHESIS, "another approach"),  # beats "another"
        ("Another 5 apples were added.", ADDITION, "another"),
        ("**Therefore**, x = 3.", CONCLUSION, "therefore"),
        ("1. First, compute the total.", REASONING, "first"),
        ("- Also, note the discount.", ADDITION, "also"),
        ("> Let me double-check this.", VERIFY, "let me double-check"),
        ('"Hmm," I thought.', CONTRAST, "hmm"),
        ("Let’s verify with x = 2.", VERIFY, "let's verify"),  # curly apostrophe
        ("Okay, so the problem asks for the area.", RESTATE, "okay so the problem"),
        ("Step 3: Suppose x is even.", HYPOTHESIS, "suppose"),
        ("In other words, we need the sum.", RESTATE, "in other words"),
    ],
)
def test_keyword_prelabel_matches_cues(tax: Taxonomy, step: str, signal: str, cue: str) -> None:
    assert keyword_prelabel(step, tax) == (signal, cue)


@pytest.mark.parametrize(
    "step",
    [
        "Sooner or later the tank fills.",  # "so" only on a word boundary
        "Android phones cost $200.",  # not "and"
        "So-called primes are meant.",  # hyphenated word is not the cue "so"
        "The train leaves at 3 pm.",
        "48 / 2 = 24.",
        "",
        "   ",
    ],
)
def test_keyword_prelabel_no_cue(tax: Taxonomy, step: str) -> None:
    assert keyword_prelabel(step, tax) == (None, None)


def test_fallback_label(tax: Taxonomy) -> None:
    assert fallback_label("However, x is negative.", tax) == CONTRAST
    assert fallback_label("48 / 2 = 24.", tax) == tax.default_signal == REASONING


def test_trace_prelabels(tax: Taxonomy) -> None:
    steps = split_steps(R1_TRACE, SegmentationConfig())
    pre = [keyword_prelabel(s, tax) for s in steps]
    assert [p[0] for p in pre] == R1_PRELABELS
    assert [p[1] for p in pre] == R1_CUES
    qwq = [keyword_prelabel(s, tax) for s in split_steps(QWQ_TRACE, SegmentationConfig())]
    assert [p[0] for p in qwq] == QWQ_PRELABELS
    assert [p[1] for p in qwq] == ["alright so the problem", None, "moreover", "hmm", "let's verify", "so the answer"]
