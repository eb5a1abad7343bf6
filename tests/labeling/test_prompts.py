"""The labeling request (rscaffold.labeling.prompts): prompt, JSON schema, compact form, truncation."""

from __future__ import annotations

import hashlib
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
from rscaffold.labeling.prompts import build_label_request
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


def test_build_label_request_shows_every_step_whole(tax: Taxonomy) -> None:
    long = "So " + "12 + 12 = 24. " * 100
    req = build_label_request("t", R1_QUESTION, ["First, add.", long], prelabels=[REASONING, REASONING], tax=tax)
    line = next(ln for ln in req.messages[-1]["content"].splitlines() if ln.startswith("[2]"))
    assert line == f"[2] (pre-label: {REASONING}) " + " ".join(long.split())


def test_short_trace_requests_are_unchanged(tax: Taxonomy) -> None:
    """The request of a trace that fits one request is byte for byte what earlier versions sent,
    so the request cache answers a re-run without asking the labeler again."""
    steps = split_steps(R1_TRACE, SegmentationConfig())
    for fmt, digest in (("json", "017b5f8f63331812"), ("lines", "3116171453959671")):
        r = build_label_request("tr-1", R1_QUESTION, steps, prelabels=R1_PRELABELS, tax=tax, answer_format=fmt)
        blob = json.dumps([r.request_id, r.messages, r.json_schema, r.line_choices], sort_keys=True)
        assert hashlib.sha256(blob.encode()).hexdigest()[:16] == digest


def test_build_label_request_rejects_mismatched_prelabels(tax: Taxonomy) -> None:
    with pytest.raises(ValueError, match="2 steps but 1 pre-labels"):
        build_label_request("t", "Q", ["a", "b"], prelabels=[None], tax=tax)
