"""Tests of rscaffold.segment: trace -> steps."""

from __future__ import annotations

import re

import pytest

# A DeepSeek-R1 style trace: a <think> block, then the visible answer (shared with the labeling tests).
from helpers import R1_TRACE

from rscaffold.config import SegmentationConfig
from rscaffold.segment import DISCOURSE_TURNS, paragraphs, split_steps, trace_body

# A QwQ style trace: long paragraphs full of self-corrections, blank lines with stray spaces (not
# the labeling tests' QWQ_TRACE in helpers, which has one step per blank line).
QWQ_TRACE = (
    "Let me compute the area first. The garden is 8 by 5, so its area is 40 square meters. "
    "Wait, the problem says the garden is surrounded by a path 2 meters wide. So the outer rectangle "
    "is 12 by 9, which gives 108. But the question asks for the area of the path only. Hmm, so I "
    "subtract: 108 - 40 = 68. Some solvers forget the corners here. Let me check: 2*(12*2) + 2*(5*2) "
    "= 48 + 20 = 68. However, I should make sure the corners are counted once.\n"
    "Alternatively, one could add the four strips and the four corner squares: 2*(8*2) + 2*(5*2) + 4*4 "
    "= 32 + 20 + 16 = 68.\n"
    "   \n"
    "\t\n"
    "So the path covers 68 square meters. but the butter analogy does not apply here."
)


def _words(text: str) -> list[str]:
    return re.sub(r"</?think>", " ", text).split()


def test_r1_trace_splits_at_blank_lines_and_keeps_think_content_in_order() -> None:
    steps = split_steps(R1_TRACE, SegmentationConfig())
    assert len(steps) == 10
    assert steps[0].startswith("Okay, so the problem says Natalia")
    assert steps[2].startswith('Wait, does "half as many clips"')
    assert steps[7] == "Therefore, Natalia sold 72 clips altogether."
    # the part after </think> comes after the think block, as its own steps
    assert steps[8] == "Natalia sold 48 clips in April and 48 / 2 = 24 clips in May."
    assert steps[9] == "The answer is 72."
    assert not any("think>" in s for s in steps)
    assert all(s == s.strip() for s in steps)


def test_text_directly_after_closing_think_tag_is_a_separate_step() -> None:
    steps = split_steps("<think>Let me think about 2 + 2.</think>The answer is 4.", SegmentationConfig(min_chars=0))
    assert steps == ["Let me think about 2 + 2.", "The answer is 4."]


def test_blank_lines_with_whitespace_split_but_single_newlines_do_not() -> None:
    text = "Step one line one\nstep one line two\n \t \nStep two\r\n\r\nStep three"
    assert split_steps(text, SegmentationConfig(min_chars=0)) == [
        "Step one line one\nstep one line two",
        "Step two",
        "Step three",
    ]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\n", "<think>\n\n</think>", "<think></think>\n  \n"])
def test_empty_text_gives_no_steps(text: str) -> None:
    assert split_steps(text, SegmentationConfig()) == []


def test_discourse_turns_off_keeps_paragraphs_whole() -> None:
    steps = split_steps(QWQ_TRACE, SegmentationConfig(max_chars=2000))
    assert len(steps) == 2
    assert steps[1].startswith("So the path covers 68")


def test_discourse_turns_split_before_each_turn() -> None:
    steps = split_steps(QWQ_TRACE, SegmentationConfig(split_on_discourse_turns=True, max_chars=2000))
    assert steps == [
        "Let me compute the area first. The garden is 8 by 5, so its area is 40 square meters.",
        "Wait, the problem says the garden is surrounded by a path 2 meters wide.",
        "So the outer rectangle is 12 by 9, which gives 108.",
        "But the question asks for the area of the path only.",
        # "Some" is not the turn "So"
        "Hmm, so I subtract: 108 - 40 = 68. Some solvers forget the corners here.",
        "Let me check: 2*(12*2) + 2*(5*2) = 48 + 20 = 68.",
        "However, I should make sure the corners are counted once.",
        # a turn at the start of a new line (no punctuation before it) also splits
        "Alternatively, one could add the four strips and the four corner squares: "
        "2*(8*2) + 2*(5*2) + 4*4 = 32 + 20 + 16 = 68.",
        # lowercase "but" mid-sentence and "butter" do not split
        "So the path covers 68 square meters. but the butter analogy does not apply here.",
    ]


def test_discourse_turn_list_is_the_documented_one() -> None:
    assert set(DISCOURSE_TURNS) >= {"Wait", "But", "Alternatively", "So", "Let me check", "Hmm", "However"}


def test_short_fragment_merges_into_previous_step() -> None:
    text = "Let me compute 12 * 3 = 36.\n\nOk.\n\nThen add 4 to get 40."
    assert split_steps(text, SegmentationConfig(min_chars=8)) == [
        "Let me compute 12 * 3 = 36.\nOk.",
        "Then add 4 to get 40.",
    ]


def test_short_first_fragment_merges_into_next_step() -> None:
    text = "Hmm.\n\nThe train covers 60 km in one hour.\n\nSo in 3 hours it covers 180 km."
    assert split_steps(text, SegmentationConfig(min_chars=8)) == [
        "Hmm.\nThe train covers 60 km in one hour.",
        "So in 3 hours it covers 180 km.",
    ]


def test_all_short_fragments_become_one_step() -> None:
    assert split_steps("a\n\nb\n\nc", SegmentationConfig(min_chars=8)) == ["a\nb\nc"]


def test_long_step_is_split_at_sentence_boundaries() -> None:
    sentences = [f"Sentence number {i} adds {i} apples to the basket." for i in range(30)]
    text = " ".join(sentences)
    cfg = SegmentationConfig(max_chars=200, min_chars=8)
    steps = split_steps(text, cfg)
    assert len(steps) > 1
    assert all(len(s) <= 200 for s in steps)
    # every cut is at a sentence end
    assert all(s.endswith(".") for s in steps)
    assert " ".join(steps) == text


def test_long_step_without_sentence_end_is_cut_at_whitespace() -> None:
    text = " ".join(f"word{i}" for i in range(100))  # ~590 chars, no punctuation
    steps = split_steps(text, SegmentationConfig(max_chars=100, min_chars=0))
    assert all(len(s) <= 100 for s in steps)
    assert " ".join(steps).split() == text.split()
    assert all(re.fullmatch(r"(word\d+ ?)+", s) for s in steps)  # no word cut in half


def test_long_token_without_whitespace_is_hard_cut() -> None:
    text = "x" * 260
    steps = split_steps(text, SegmentationConfig(max_chars=100, min_chars=0))
    assert [len(s) for s in steps] == [100, 100, 60]
    assert "".join(steps) == text


def test_max_steps_keeps_first_steps_and_joins_the_rest_into_the_last() -> None:
    paras = [f"Paragraph {i}: 2 * {i} = {2 * i}." for i in range(10)]
    steps = split_steps("\n\n".join(paras), SegmentationConfig(max_steps=4))
    assert len(steps) == 4
    assert steps[:3] == paras[:3]
    assert steps[3] == "\n".join(paras[3:])  # one step: no blank line inside


@pytest.mark.parametrize(
    "cfg",
    [
        SegmentationConfig(),
        SegmentationConfig(split_on_discourse_turns=True),
        SegmentationConfig(split_on_discourse_turns=True, max_chars=80, min_chars=20, max_steps=5),
        SegmentationConfig(max_chars=50, min_chars=0, max_steps=1),
    ],
)
@pytest.mark.parametrize("trace", [R1_TRACE, QWQ_TRACE])
def test_no_text_is_lost(trace: str, cfg: SegmentationConfig) -> None:
    steps = split_steps(trace, cfg)
    assert 1 <= len(steps) <= (cfg.max_steps or len(steps))
    assert _words("\n\n".join(steps)) == _words(trace)


def test_paragraphs_and_trace_body() -> None:
    assert paragraphs("<think>a\n\nb</think>\n\nc") == ["a", "b", "c"]
    assert trace_body("reasoning here", "final answer") == "reasoning here\n\nfinal answer"
    assert trace_body(None, "final answer") == "final answer"
    assert trace_body("  ", "final answer") == "final answer"
