"""The labeling request (rscaffold.labeling.prompts): prompt, JSON schema, compact form, truncation."""

from __future__ import annotations

import json

import pytest
from helpers import (
    ADDITION,
    CONCLUSION,
    CONTRAST,
    R1_PRELABELS,
    R1_QUESTION,
    R1_TRACE,
    REASONING,
    SIGNAL_NAMES,
    json_label_answer,
)

from rscaffold.config import SegmentationConfig
from rscaffold.labeling.prompts import PROMPT_STEP_CHARS, build_label_request
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.segment import split_steps


def test_build_label_request(tax: Taxonomy) -> None:
    steps = split_steps(R1_TRACE, SegmentationConfig())
    req = build_label_request("tr-1", R1_QUESTION, steps, prelabels=R1_PRELABELS, tax=tax, with_rationale=False)
    assert req.request_id == "tr-1:label"
    prompt = req.messages[-1]["content"]
    for s in tax.signals:
        assert f"- {s.name}: {s.definition}" in prompt
    assert "Question: Natalia sold clips" in prompt
    assert "[1] (pre-label: Restatement and Clarification) Okay, so the problem says" in prompt
    assert "[9] (pre-label: none) Natalia sold 48 clips" in prompt
    assert "[10] (pre-label: Conclusion and Summary) The answer is 72." in prompt
    assert "exactly 10 entries" in prompt and "rationale" not in prompt
    schema = req.json_schema
    assert schema is not None
    labels = schema["properties"]["labels"]
    assert labels["items"]["properties"]["signal"]["enum"] == SIGNAL_NAMES
    assert labels["minItems"] == labels["maxItems"] == 10
    assert labels["items"]["required"] == ["step", "signal"]


def test_label_json_schema_accepts_gold_and_rejects_bad_answers(tax: Taxonomy) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    req = build_label_request("t", R1_QUESTION, ["a", "b"], prelabels=[None, None], tax=tax)
    assert req.json_schema is not None
    jsonschema.validate(json.loads(json_label_answer([CONTRAST, ADDITION])), req.json_schema)
    for bad in (
        json_label_answer([CONTRAST]),
        json_label_answer([CONTRAST, "Musing"]),
        json_label_answer([CONTRAST, ADDITION, ADDITION]),
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(bad), req.json_schema)


def test_build_label_request_with_rationale_and_compact_format(tax: Taxonomy) -> None:
    req = build_label_request(
        "t", "Q?", ["So x = 1.", "Thus 1."], prelabels=[REASONING, CONCLUSION], tax=tax, with_rationale=True
    )
    assert '"rationale"' in req.messages[-1]["content"]
    assert req.json_schema is not None and "rationale" in req.json_schema["properties"]["labels"]["items"]["required"]
    compact = build_label_request(
        "t",
        "Q?",
        ["So x = 1.", "Thus 1."],
        prelabels=[None, None],
        tax=tax,
        with_rationale=False,
        answer_format="lines",
    )
    assert compact.json_schema is None
    assert "exactly 2 lines" in compact.messages[-1]["content"]


def test_build_label_request_truncates_huge_steps_in_the_prompt(tax: Taxonomy) -> None:
    huge = "So " + "12 + 12 = 24. " * 2000
    req = build_label_request("t", R1_QUESTION, ["First, add.", huge], prelabels=[REASONING, REASONING], tax=tax)
    prompt = req.messages[-1]["content"]
    assert len(prompt) < 5000
    line = next(ln for ln in prompt.splitlines() if ln.startswith("[2]"))
    assert line.endswith("[...]") and len(line) <= PROMPT_STEP_CHARS + 60


def test_build_label_request_rejects_mismatched_prelabels(tax: Taxonomy) -> None:
    with pytest.raises(ValueError, match="2 steps but 1 pre-labels"):
        build_label_request("t", "Q", ["a", "b"], prelabels=[None], tax=tax)
