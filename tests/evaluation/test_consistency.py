"""Consistency of a model's reasoning with its stated answer (rscaffold.evaluation.consistency)."""

from __future__ import annotations

import pytest

from rscaffold.evaluation.consistency import check_consistency, yesno_verdicts


@pytest.mark.parametrize(
    "output, predicted, consistent, check",
    [
        ("6 * 3 = 18 apples.\n\nThe answer is 18.", "18", True, "math_equation"),
        ("6 * 3 = 18.\n\nThe answer is 20.", "20", False, "math_equation"),
        # a result said in words after the last computation counts too
        ("She had 20. 20 - 4 = 16. She buys 2 more, so she has 18.\n\nThe answer is 18.", "18", True, "math_equation"),
        ("She had 20. 20 - 4 = 16. She buys 2 more, so she has 18.\n\nThe answer is 2.", "2", False, "math_equation"),
        # chains: the last link is the result
        ("x = 3 + 4 = 7\n\nThe answer is 7", "7", True, "math_equation"),
        ("3 + 4 = 7 + 1 = 8\n\nThe answer is 7", "7", False, "math_equation"),
        # calculator annotations, LaTeX operators, thousands separators, "3 x 4"
        ("<<6*3=18>>18 eggs. The answer is 18", "18", True, "math_equation"),
        ("$2 \\times 1,500 = 3,000$ dollars.\n\nAnswer: 3000", "3000", True, "math_equation"),
        ("3 x 4 = 12\n\n#### 12", "12", True, "math_equation"),
        ("So 6 \\cdot 3 = \\boxed{18}", "18", True, "math_answer_is_result"),
        # no computation: the last number before the answer statement
        ("Tom has 5 apples.\n\nThe answer is 7.", "7", False, "math_last_number"),
        ("Tom has 7 apples left.\n\nThe answer is 7.", "7", True, "math_last_number"),
        # nothing to compare with: not checked
        ("The answer is 7.", "7", None, None),
        ("maybe 7", "7", None, None),  # no stated answer (extracted from the last number)
        ("6 * 3 = 18", None, None, None),
    ],
)
def test_math_consistency(output, predicted, consistent, check):
    c = check_consistency(output, predicted, "math")
    assert (c.consistent, c.check) == (consistent, check), c


@pytest.mark.parametrize(
    "output, predicted, consistent",
    [
        ("Yes, birds can fly.\n\nBut penguins are birds that cannot.\n\nThe answer is no.", "no", False),
        ("So, yes.\n\nWait, that is wrong.\n\nThe answer is no.", "no", False),
        ("The answer is yes.\n\nThe answer is no.", "no", False),
        (
            "No one lives there now.\n\nIt was abandoned in 1900.\n\nThe answer is yes.",
            "yes",
            True,
        ),  # "No one": no verdict
        ("Therefore, yes.\n\nThe answer is \\boxed{yes}.", "yes", True),
        ("Penguins cannot fly.\n\nThe answer is no.", "no", True),
        ("I am not sure.", None, None),
    ],
)
def test_yesno_polarity_consistency(output, predicted, consistent):
    c = check_consistency(output, predicted, "yesno")
    assert c.consistent is consistent
    if consistent is not None:
        assert c.check == "yesno_polarity"
    if consistent is False:
        assert "vs answer" in c.evidence


def test_verdicts_and_choice_not_checked():
    assert [v[1] for v in yesno_verdicts("Yes. So, no! The answer is: true")] == ["yes", "no", "yes"]
    assert check_consistency("The answer is B.", "B", "choice").consistent is None
