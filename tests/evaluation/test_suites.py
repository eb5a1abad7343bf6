"""What is evaluated (rscaffold.evaluation.suites)."""

from __future__ import annotations

from rscaffold.config import EvaluationConfig
from rscaffold.records import ProblemRecord


def test_default_evaluation_is_the_problems_eval_split():
    from rscaffold.evaluation.suites import evaluation_suites

    rows = [
        ProblemRecord(problem_id=f"p{i}", split="eval", source="gsm8k", question=f"q{i}", gold_answer="1")
        for i in range(5)
    ]
    (suite,) = evaluation_suites(EvaluationConfig(limit=3), "gsm8k", rows)
    assert suite.name == "gsm8k" and [p.problem_id for p in suite.problems] == ["p0", "p1", "p2"]
    assert suite.prompts("question") == ["q0", "q1", "q2"]
    assert (
        suite.prompts()[0].startswith("q0\n\nSolve the problem step by step")
        and "'The answer is' followed by the final number" in suite.prompts()[0]
    )
