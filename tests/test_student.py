"""A saved student (rscaffold.student): loading it back, its metadata and model card, and decoding
with it (plain, guided, pruned, gated)."""

from __future__ import annotations

import json

import pytest
from helpers import STUDENT_SIGNAL_TOKENS, STUDENT_SIGNALS, skip_module_without_student_tokenizer

pytest.importorskip("torch")
pytest.importorskip("trl")  # the trained_token fixture trains with TRL
skip_module_without_student_tokenizer()

from rscaffold.config import GuidedInferenceConfig
from rscaffold.decoding.in_process import generate
from rscaffold.decoding.output import Generated
from rscaffold.student import load_student


def test_saved_student_round_trip_and_generation(trained_token):
    result, _, _ = trained_token
    d = result.model_dir
    meta = json.loads((d / "rscaffold_student.json").read_text())
    assert meta["scaffolded"] and meta["signal_names"] == STUDENT_SIGNALS and meta["signal_objective"] == "token"
    card = (d / "README.md").read_text()
    assert "data123" in card and "tax456" in card and "signal_loss" in card
    student = load_student(d, device="cpu")
    assert student.scaffolded and student.signal_token_ids == student.tokenizer.convert_tokens_to_ids(
        STUDENT_SIGNAL_TOKENS
    )
    questions = ["How many fruits: 2 apples, 3 pears?", "How many fruits: 5 apples, 4 pears?"]
    plain = generate(student, questions=questions, mode="plain", max_new_tokens=24, batch_size=2)
    assert len(plain) == 2 and all(isinstance(g, Generated) and 0 < g.output_tokens <= 24 for g in plain)
    # batching and left padding do not change greedy outputs; questions may be given positionally
    single = generate(student, questions[1:], mode="plain", max_new_tokens=24)
    assert single[0].text == plain[1].text
    guided = generate(
        student,
        questions=questions,
        mode="guided",
        max_new_tokens=40,
        guided=GuidedInferenceConfig(max_steps=3, max_step_tokens=12),
    )
    for g in guided:
        assert g.text and "<sig:" not in g.text
        assert g.signals and set(g.signals) <= set(STUDENT_SIGNALS)
        assert g.signals[0] == "setup"  # learned: the first step is always a setup
        assert 0 < g.output_tokens <= 40
    # pruning: a pruned signal is never committed
    pruned = generate(
        student,
        questions=questions[:1],
        mode="guided",
        max_new_tokens=30,
        guided=GuidedInferenceConfig(max_steps=2, max_step_tokens=12, prune_signals=["setup"]),
    )
    assert "setup" not in pruned[0].signals
    # gating: with an unreachable threshold nothing is committed by the gate
    gated = generate(
        student,
        questions=questions[:1],
        mode="guided",
        max_new_tokens=24,
        guided=GuidedInferenceConfig(max_steps=2, max_step_tokens=8, confidence_threshold=1.0),
    )
    # (steps the tiny model leaves empty are dropped with their confidences; none may pass the gate)
    assert gated[0].output_tokens > 0 and all(c is not None and c < 1.0 for c in gated[0].confidences)
