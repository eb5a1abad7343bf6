"""One step boundary for the dataset, the training format and the decoder.

An R1-style trace has far more than 64 paragraphs, one-word fragments and blank lines holding
spaces. Whatever the segmenter makes of it (merged fragments, a capped tail), formatting the
steps as a training example and parsing the text back with the decoder's rule must give the same
steps; and the guided decoder's stopping rule must end a step exactly at the boundary.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from method_shapes import long_r1_trace, tiny_llama

from rscaffold.config import SegmentationConfig
from rscaffold.decoding.output import split_output
from rscaffold.decoding.reference import StepBoundaryStop
from rscaffold.prompts import render_completion
from rscaffold.segment import split_at_step_boundaries, split_steps
from rscaffold.training.signal_tokens import add_signal_tokens
from rscaffold.vocabulary import STEP_BOUNDARY

SIGNALS = ["reasoning", "contrast", "conclusion"]
TOKENS = {n: f"<sig:{n}>" for n in SIGNALS}


@pytest.fixture(scope="module")
def tokenizer():
    model, tok = tiny_llama()
    add_signal_tokens(tok, model, list(TOKENS.values()))
    return tok


@pytest.mark.parametrize(
    "cfg",
    [
        SegmentationConfig(),  # the default
        SegmentationConfig(max_steps=64),  # a cap of 64 steps: the tail is joined into one step
        SegmentationConfig(split_on_discourse_turns=True, max_chars=200, min_chars=20, max_steps=30),
    ],
    ids=["default", "cap-64", "turns-short-cap"],
)
def test_format_then_parse_with_the_decoders_rule_gives_the_same_steps(tokenizer, cfg):
    trace = long_r1_trace(90)
    steps = split_steps(trace, cfg)
    assert len(steps) > 20
    if cfg.max_steps:
        assert len(steps) == cfg.max_steps  # the cap was hit: its tail holds several paragraphs
    assert not any(STEP_BOUNDARY.search(s) for s in steps)
    labeled = [(SIGNALS[i % 3], s) for i, s in enumerate(steps)]
    # the training format ...
    completion = render_completion(labeled, tokenizer, TOKENS)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    # ... parsed back with the decoder's rule
    signal_of = {tokenizer.convert_tokens_to_ids(t): n for n, t in TOKENS.items()}
    parsed, parsed_signals = split_output(ids[:-1], tokenizer, signal_of)
    assert parsed == steps
    assert parsed_signals == [s for s, _ in labeled]
    # the plain (CoT-SFT) format parses back the same way
    plain = render_completion(labeled, tokenizer, None)
    assert split_at_step_boundaries(plain.removesuffix(tokenizer.eos_token)) == steps


def test_the_decoders_stop_fires_at_the_step_boundary_and_nowhere_inside_a_step(tokenizer):
    steps = split_steps(long_r1_trace(40), SegmentationConfig(max_steps=10))
    for step in steps:
        for boundary in ("\n\n", "\n \n", "\n\t\n"):
            ids = tokenizer(step + boundary + "Next step.", add_special_tokens=False)["input_ids"]
            stop = StepBoundaryStop(tokenizer, start=0)
            fired = [bool(stop(torch.tensor([ids[: t + 1]]))[0]) for t in range(len(ids))]
            first = fired.index(True)
            # not before the step's text is complete, and as soon as the boundary is
            assert tokenizer.decode(ids[: first + 1]).rstrip(" \t\n") == step
            assert STEP_BOUNDARY.search(tokenizer.decode(ids[: first + 1]))
