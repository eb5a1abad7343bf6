"""Answer extraction on outputs that are not clean answers.

A small student may copy an instruction's placeholder ("The answer is N.") one line below the
right number. For a numeric benchmark a non-numeric anchor must not win (the last number counts,
for every model alike); the instructions must not invite copying a placeholder; the yes/no
fallback must not read a determiner ("There is no evidence ...") as a verdict.
"""

from __future__ import annotations

import re

import pytest

from rscaffold.config import EvaluationConfig
from rscaffold.evalsets.answers import check_answer, extract_answer
from rscaffold.evalsets.loaders import BENCHMARKS
from rscaffold.evaluation.metrics import score_output
from rscaffold.evaluation.suites import evaluation_suites
from rscaffold.prompts import FAMILY_TEMPLATES
from rscaffold.records import ProblemRecord

COPIED_PLACEHOLDER = "Tom has 3 boxes with 4 apples each.\n\n3 * 4 = 12\n\nThe answer is N."


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (COPIED_PLACEHOLDER, "12"),
        ("So she pays 18 dollars.\nThe answer is X.", "18"),
        ("5 + 7 = 12, so the total is 12.\n\\boxed{N}", "12"),
        ("The answer is N.\n\nThe answer is 12.", "12"),  # a real anchor still wins
        ("The answer is $1,200.", "1200"),
        ("The answer is -3/4.", "-3/4"),
        ("The answer is N.", None),  # no number anywhere: unparsed
    ],
)
def test_a_numeric_benchmark_never_takes_a_placeholder_for_an_answer(output, expected):
    assert extract_answer(output, "math", numeric=True) == expected


def test_gsm8k_is_numeric_and_math500_keeps_symbolic_answers():
    assert BENCHMARKS["gsm8k"].numeric_answer and not BENCHMARKS["math500"].numeric_answer
    assert extract_answer("The answer is \\pi.", "math") == "\\pi"  # MATH-500 answers may be symbols


def test_every_model_is_scored_the_same_way_on_a_copied_placeholder():
    problem = ProblemRecord(problem_id="p", split="eval", source="gsm8k", question="q", gold_answer="12")
    (suite,) = evaluation_suites(EvaluationConfig(), "gsm8k", [problem])
    assert suite.numeric
    for model in ("base", "short_cot", "cot_sft", "scaffolded"):
        pred = score_output(
            model,
            suite.name,
            problem,
            output=COPIED_PLACEHOLDER,
            answer_type=suite.answer_type,
            numeric=suite.numeric,
            output_tokens=10,
            signals=[],
            latency_s=0.0,
        )
        assert pred.predicted_answer == "12" and pred.correct and pred.parsed
    assert check_answer(COPIED_PLACEHOLDER, "12", "math", numeric=True).correct


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Bears sleep in winter.\nThere is no evidence that they eat honey then.", None),
        ("No evidence suggests otherwise.", None),
        ("There is no reason to doubt it.\nYes.", "yes"),
        ("No, there is no evidence for it.", "no"),
        ("Llamas gestate for 11 months, so, no.", "no"),
        ("The claim is false.", "no"),
        ("Yes. Because the war lasted 20 years.", "yes"),
        ("The answer is no.\nThere is no doubt.", "no"),
    ],
)
def test_the_yesno_fallback_reads_verdicts_not_determiners(output, expected):
    assert extract_answer(output, "yesno") == expected


def test_no_instruction_invites_copying_a_placeholder():
    for family, template in FAMILY_TEMPLATES.items():
        # no "The answer is N." / "... is X." with a letter standing for the answer
        assert not re.search(r"answer is [A-Z]\b", template), family
        assert "The answer is" in template, family
    for bench in BENCHMARKS.values():
        assert not re.search(r"answer is [A-Z]\b", bench.prompt_template), bench.name
