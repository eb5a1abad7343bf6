"""Reasoning parsing and the completion policy shared by the backends (rscaffold.llm.parsing)."""

from __future__ import annotations

import pytest

from rscaffold.llm.parsing import (
    EMPTY_OUTPUT,
    clean_text,
    completion_from_output,
    derive_seed,
    parse_reasoning,
    split_reasoning,
)


@pytest.mark.parametrize(
    "text, reasoning, visible, unclosed",
    [
        ("plain answer", None, "plain answer", False),
        ("<think>step 1\n\nstep 2</think>\nThe answer is 4.", "step 1\n\nstep 2", "The answer is 4.", False),
        (
            "opening tag was in the prompt</think>The answer is 4.",
            "opening tag was in the prompt",
            "The answer is 4.",
            False,
        ),
        ("<think>cut off mid thou", "cut off mid thou", "", True),
        ("<think>a</think>x<think>b</think>y", "a\n\nb", "xy", False),
        ("<think>\n\n</think>\n\nvisible", None, "visible", False),
        ("pre <think>r", "r", "pre", True),
    ],
)
def test_parse_reasoning(text, reasoning, visible, unclosed):
    s = parse_reasoning(text)
    assert (s.reasoning, s.visible, s.unclosed) == (reasoning, visible, unclosed)
    assert split_reasoning(text) == (reasoning, visible)


def test_completion_from_output_policy():
    c = completion_from_output("r", 0, "<think>work", finish_reason="length", reasoning_field=None)
    assert c.ok and c.reasoning == "work" and c.text == "" and c.extra["unclosed_think"] and c.truncated
    c = completion_from_output("r", 1, "  \n", finish_reason="stop")
    assert c.error == EMPTY_OUTPUT and c.sample_index == 1
    c = completion_from_output("r", 0, "<think>b</think>ans", finish_reason="stop", reasoning_field="a")
    assert c.reasoning == "a\n\nb" and c.text == "ans"
    assert clean_text(b"ok \xff") == "ok \ufffd"
    assert clean_text("lone \ud800 surrogate") == "lone ? surrogate"
    assert derive_seed(0, "p1") == derive_seed(0, "p1") != derive_seed(0, "p2")
