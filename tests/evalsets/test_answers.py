"""Answer extraction and checking, with cases in the style of each benchmark."""

from __future__ import annotations

import pytest

from rscaffold.evalsets import answers
from rscaffold.evalsets.answers import (
    check_answer,
    choice_options,
    extract_answer,
    find_boxed,
    format_choice_question,
    is_correct,
)

# ---------------------------------------------------------------------------------------------
# math extraction (GSM8K / MATH-500 style outputs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # GSM8K
        ("She makes 9 * 2 = $18 every day.\n#### 1,234", "1234"),
        ("So she pays $18.", "18"),
        ("The answer is 18 dollars.", "18"),
        ("The answer is $18.", "18"),
        ("The answer is \\$18.", "18"),
        ("The answer is: 3.5 dollars.", "3.5"),
        ("The answer is 1,450,000.", "1450000"),
        ("**Answer:** 42", "42"),
        ("Final answer: 25%.", "25"),
        ("The answer is 18 because 9 * 2 = 18.", "18"),
        ("The answer is x = 5.", "5"),
        ("The answer is 18 + 2 = 20.", "20"),
        ("The answer is −7.", "-7"),
        ("First 12, then 5 - 3 = 2 more, so 14 in total.", "14"),
        ("We get 3, 4 and 5", "5"),
        ("#### 72\n", "72"),
        # MATH-500
        ("so the value is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("The answer is $\\boxed{\\dfrac{14}{3}}$.", "\\dfrac{14}{3}"),
        ("Thus $x \\in \\boxed{[-2, 7]}$.", "[-2, 7]"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("\\boxed{\\$18}", "18"),
        ("\\boxed{5x - 7y + 11z + 4 = 0}", "5x - 7y + 11z + 4 = 0"),
        ("\\boxed{2k}", "2k"),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
        ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("**Final Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
    ],
)
def test_extract_math(text: str, expected: str) -> None:
    assert extract_answer(text, "math") == expected


@pytest.mark.parametrize("text", ["", "   ", "I am not sure how to solve this.", "no digits here", None])
def test_extract_math_unparseable(text: str | None) -> None:
    assert extract_answer(text, "math") is None


def test_find_boxed_nested_and_truncated() -> None:
    text = "a \\boxed{\\frac{a^{2}}{\\sqrt{b}}} b \\fbox{7} c \\boxed{\\frac{1}{2"
    assert find_boxed(text) == ["\\frac{a^{2}}{\\sqrt{b}}", "7"]  # the truncated one is skipped
    assert find_boxed("\\boxed{\\{1, 2\\}}") == ["\\{1, 2\\}"]


def test_truncated_box_falls_back_to_anchor_or_last_number() -> None:
    assert extract_answer("The answer is 12.\n\\boxed{1", "math") == "12"


# ---------------------------------------------------------------------------------------------
# math checking


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("18", "18"),
        ("18.0", "18"),
        ("1,234", "1234"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "0.5"),
        ("\\frac12", "1/2"),
        ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("[-2,7]", "x \\in [-2,7]"),
        ("(-\\sqrt{3},\\sqrt{3})", "(-\\sqrt{3}, \\sqrt{3})"),
        ("-q+p", "p - q"),
        ("6-5i", "6 - 5i"),
        ("0.34", "\\dfrac{17}{50}"),
        ("0.35625", ".35625"),
        ("90", "90^\\circ"),
        ("\\text{Evelyn}", "\\text{Evelyn}"),
        ("Evelyn", "\\text{Evelyn}"),
        ("C", "\\text{(C)}"),
        ("10000", "10,\\!000"),
        ("3,5,7", "3, 5, 7"),
    ],
)
def test_is_correct_math_equivalent(predicted: str, gold: str) -> None:
    assert is_correct(predicted, gold, "math")


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("17", "18"),
        ("1450001", "1450000"),  # large integers compare exactly
        ("0.333", "\\frac{1}{3}"),
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("hello", "18"),
        ("", "18"),
        (None, "18"),
    ],
)
def test_is_correct_math_different(predicted: str | None, gold: str) -> None:
    assert not is_correct(predicted, gold, "math")


def test_math_end_to_end() -> None:
    out = "Janet sells 16 - 3 - 4 = 9 eggs.\n\nShe makes 9 * 2 = $18.\n\nThe answer is 18 dollars."
    check = check_answer(out, "18", "math")
    assert check.predicted == "18" and check.correct and check.parsed
    check = check_answer("I cannot tell.", "18", "math")
    assert check.predicted is None and not check.correct and not check.parsed


def test_plain_numbers_skip_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> bool:
        raise AssertionError("math_verify should not be needed")

    monkeypatch.setattr(answers, "_math_verify", boom)
    assert is_correct("1,234", "1234", "math")
    assert is_correct("0.5", "\\frac{1}{2}", "math")
    assert not is_correct("17", "18", "math")


# ---------------------------------------------------------------------------------------------
# yes / no (StrategyQA)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Genghis Khan had sixteen children.\n\nSo the answer is no.", "no"),
        ("The answer is: Yes", "yes"),
        ("**Answer:** No", "no"),
        ("Answer: False", "no"),
        ("True", "yes"),
        ("There is no evidence against it.\n\nTherefore, yes.", "yes"),
        ("Yes.\nBecause the Police formed in 1977.", "yes"),
        ("The answer is \\boxed{\\text{no}}.", "no"),
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_yesno(text: str, expected: str | None) -> None:
    assert extract_answer(text, "yesno") == expected


def test_is_correct_yesno() -> None:
    assert is_correct("yes", "yes", "yesno")
    assert is_correct("True", "yes", "yesno")
    assert is_correct("No.", "no", "yesno")
    assert not is_correct("yes", "no", "yesno")
    assert not is_correct(None, "no", "yesno")
    assert not is_correct("maybe", "no", "yesno")


# ---------------------------------------------------------------------------------------------
# multiple choice (CommonsenseQA / TruthfulQA)

CSQA_OPTIONS = ["bank", "library", "department store", "mall", "new york"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(C) bank", "C"),
        ("A revolving door is a security measure.\n\n(A) bank", "A"),
        ("The answer is (B).", "B"),
        ("The answer is B.", "B"),
        ("Answer: b", "B"),
        ("answer is (d)", "D"),
        ("So the answer is option E.", "E"),
        ("E. new york", "E"),
        ("C", "C"),
        ("\\boxed{C}", "C"),
        ("I think the best place is the department store.", "C"),
        ("Banks need security.\n\nIt must be a bank.", "A"),
        ("The answer is F.", None),  # not one of the five options
        ("I like it", None),
        ("A lot of places have revolving doors.", None),
    ],
)
def test_extract_choice_with_options(text: str, expected: str | None) -> None:
    assert extract_answer(text, "choice", options=CSQA_OPTIONS) == expected


def test_extract_choice_without_options() -> None:
    assert extract_answer("(C) bank", "choice") == "C"
    assert extract_answer("The answer is (K).", "choice") == "K"  # TruthfulQA has up to 13 options
    assert extract_answer("It must be a bank.", "choice") is None
    assert extract_answer("The answer is a bank.", "choice") is None  # the article is not a letter


def test_is_correct_choice() -> None:
    assert is_correct("C", "C", "choice")
    assert is_correct("(c)", "C", "choice")
    assert is_correct("C.", "C", "choice")
    assert not is_correct("B", "C", "choice")
    assert not is_correct(None, "C", "choice")
    assert not is_correct("bank", "A", "choice")


def test_choice_layout_round_trip() -> None:
    question = format_choice_question("Where is the money?", CSQA_OPTIONS)
    assert question.splitlines() == [
        "Where is the money?",
        "A. bank",
        "B. library",
        "C. department store",
        "D. mall",
        "E. new york",
    ]
    assert choice_options(question) == CSQA_OPTIONS
    assert choice_options("What is 2 + 2?") == []
    check = check_answer("The money is in the library.", "B", "choice", options=choice_options(question))
    assert check.predicted == "B" and check.correct


def test_unknown_answer_type() -> None:
    with pytest.raises(ValueError, match="unknown answer type"):
        extract_answer("18", "number")
    with pytest.raises(ValueError, match="unknown answer type"):
        is_correct("18", "18", "number")


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Paris is the capital.\n\nThe answer is Paris.", "Paris"),
        ('So... the answer is "The Eiffel Tower", because it is tall.', "The Eiffel Tower"),
        ("It is big.\n\n**Answer:** blue whale", "blue whale"),
        ("Whales are large. \\boxed{\\text{blue whale}}", "blue whale"),
        ("Thinking...\n\nMount Everest", "Mount Everest"),
        ("   ", None),
    ],
)
def test_extract_text(output: str, expected: str | None) -> None:
    assert extract_answer(output, "text") == expected


def test_is_correct_text() -> None:
    assert is_correct("The Eiffel Tower", "eiffel tower", "text")
    assert is_correct("Eiffel-Tower!", "the eiffel tower", "text")
    assert not is_correct("Eiffel", "eiffel tower", "text")
    assert not is_correct(None, "x", "text") and not is_correct("the", "a", "text")
