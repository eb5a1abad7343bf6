"""Parsing a labeler's answer (rscaffold.labeling.parsing): JSON, compact forms, precise errors."""

from __future__ import annotations

import json

import pytest
from helpers import (
    ADDITION,
    CONCLUSION,
    CONTRAST,
    HYPOTHESIS,
    R1_GOLD,
    REASONING,
    RESTATE,
    VERIFY,
    json_label_answer,
)

from rscaffold.labeling.parsing import LabelParseError, parse_labels, resolve_signal
from rscaffold.labeling.taxonomy import Taxonomy


def _signals(parsed: list) -> list[str]:
    return [p.signal for p in parsed]


def test_parse_valid_json(tax: Taxonomy) -> None:
    parsed = parse_labels(json_label_answer(R1_GOLD, rationale=True), 10, tax)
    assert _signals(parsed) == R1_GOLD
    assert [p.step_index for p in parsed] == list(range(10))
    assert parsed[3].rationale == "reason 4"


def test_parse_json_out_of_order(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 2, "signal": CONCLUSION}, {"step": 1, "signal": CONTRAST}]})
    assert _signals(parse_labels(text, 2, tax)) == [CONTRAST, CONCLUSION]


def test_parse_json_in_code_fence_with_prose(tax: Taxonomy) -> None:
    text = (
        "Sure! Here are the labels for the steps [as requested]:\n\n```json\n"
        + json.dumps(
            {"labels": [{"step": 1, "signal": "contrast and concession"}, {"step": 2, "signal": "Summary"}]}, indent=2
        )
        + "\n```\nLet me know if you need more."
    )
    assert _signals(parse_labels(text, 2, tax)) == [CONTRAST, CONCLUSION]


def test_parse_json_in_prose_without_fence(tax: Taxonomy) -> None:
    text = 'The labels are {"labels": [{"step": 1, "signal": "Reasoning"}]} as you asked.'
    assert _signals(parse_labels(text, 1, tax)) == [REASONING]


def test_parse_compact_json_list(tax: Taxonomy) -> None:
    text = '["Contrast", "<sig:verify>", "hypothesis and exploration", "RESTATEMENT AND CLARIFICATION"]'
    assert _signals(parse_labels(text, 4, tax)) == [CONTRAST, VERIFY, HYPOTHESIS, RESTATE]


def test_parse_compact_lines(tax: Taxonomy) -> None:
    text = (
        "1: Contrast and Concession\n"
        "2. Addition\n"
        "Step 3: sig:reasoning\n"
        "[4] Conclusion and Summary - it states the final answer\n"
        "**5:** Verification & Reflection\n"
    )
    parsed = parse_labels(text, 5, tax)
    assert _signals(parsed) == [CONTRAST, ADDITION, REASONING, CONCLUSION, VERIFY]
    assert parsed[3].rationale == "it states the final answer"


def test_parse_zero_based_numbering_is_accepted(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 0, "signal": CONTRAST}, {"step": 1, "signal": ADDITION}]})
    assert _signals(parse_labels(text, 2, tax)) == [CONTRAST, ADDITION]


def test_parse_ignores_a_think_block(tax: Taxonomy) -> None:
    text = '<think>step 1 is probably ["Addition"]</think>\n' + json_label_answer([CONTRAST])
    assert _signals(parse_labels(text, 1, tax)) == [CONTRAST]


def test_parse_missing_step(tax: Taxonomy) -> None:
    text = json_label_answer([CONTRAST, ADDITION, REASONING, CONCLUSION])
    with pytest.raises(LabelParseError, match=r"missing step\(s\): 5-6$"):
        parse_labels(text, 6, tax)


def test_parse_duplicate_step(tax: Taxonomy) -> None:
    text = json.dumps(
        {"labels": [{"step": 1, "signal": CONTRAST}, {"step": 1, "signal": ADDITION}, {"step": 3, "signal": ADDITION}]}
    )
    with pytest.raises(LabelParseError, match=r"step\(s\) labeled more than once: 1; missing step\(s\): 2"):
        parse_labels(text, 3, tax)


def test_parse_unknown_label(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 1, "signal": CONTRAST}, {"step": 2, "signal": "Musing"}]})
    with pytest.raises(
        LabelParseError, match=r"step 2: unknown signal 'Musing'.*valid signals: Contrast and Concession"
    ):
        parse_labels(text, 2, tax)


def test_parse_error_lists_at_most_five_problems(tax: Taxonomy) -> None:
    text = "\n".join(f"{i}. The total is {i * 12} apples." for i in range(1, 9))
    with pytest.raises(LabelParseError) as err:
        parse_labels(text, 8, tax)
    msg = str(err.value)
    assert msg.count("unknown signal") == 5 and "and 3 more" in msg and msg.endswith("Restatement and Clarification")


def test_parse_ambiguous_prefix_is_unknown(tax: Taxonomy) -> None:
    assert resolve_signal("Con", tax) is None  # Contrast... or Conclusion...
    with pytest.raises(LabelParseError, match="step 1: unknown signal 'Con'"):
        parse_labels('["Con"]', 1, tax)


def test_parse_out_of_range_step(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 1, "signal": CONTRAST}, {"step": 7, "signal": ADDITION}]})
    with pytest.raises(LabelParseError, match=r"step 7 is out of range 1..2; missing step\(s\): 2"):
        parse_labels(text, 2, tax)


def test_parse_wrong_count_in_list(tax: Taxonomy) -> None:
    with pytest.raises(LabelParseError, match="got 2 labels for 3 steps"):
        parse_labels('["Contrast", "Addition"]', 3, tax)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty answer"),
        ("I think these steps are fine.", "no labels found"),
        ('{"labels": [{"step": 1, "signal": "Contrast and Concession"}, {"step": 2, "sig', "no complete JSON answer"),
    ],
)
def test_parse_garbage(tax: Taxonomy, text: str, message: str) -> None:
    with pytest.raises(LabelParseError, match=message):
        parse_labels(text, 2, tax)


@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("contrast", CONTRAST),
        ("Conclusion", CONCLUSION),
        ("  **Verification and Reflection**. ", VERIFY),
        ("<sig:hypothesis>", HYPOTHESIS),
        ("Addition & Elaboration", ADDITION),
        ("Clarification", RESTATE),
        ("reasoning and analysis step", None),
        ("and", None),
        ("", None),
    ],
)
def test_resolve_signal(tax: Taxonomy, label: str, name: str | None) -> None:
    assert resolve_signal(label, tax) == name
