"""Adaptive gating and pruning, on by default, switchable for ablations.

The student here has a signal head whose weights are zero and whose bias sets its next-signal
distribution, the same at every step, so what the gate and the pruning must do is known exactly.
The taxonomy's ``essential: false`` signal (``restate``) is pruned by default; the gate's threshold
is calibrated on validation rows (or, without them, ``calibration_precision``); the ablations
``scaffolded-nogate`` / ``scaffolded-noprune`` switch one feature off.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from method_shapes import tiny_qwen2

from rscaffold.config import EvaluationConfig, GuidedInferenceConfig
from rscaffold.decoding.calibration import calibrate_gate, choose_threshold, plan_guided_decoding
from rscaffold.decoding.in_process import generate
from rscaffold.decoding.policy import resolve_guided
from rscaffold.records import ExampleRecord, Step
from rscaffold.student import SignalHead, Student
from rscaffold.training.signal_tokens import add_signal_tokens

NAMES = ["restate", "reasoning", "conclusion", "verify"]
TOKENS = [f"<sig:{n}>" for n in NAMES]
ESSENTIAL = [False, True, True, True]
QUESTION = "Tom has 3 boxes with 4 apples each. How many apples?"


def student_with(probs: list[float]) -> Student:
    """A scaffolded student (head objective) whose next signal is ``probs`` at every step."""
    model, tok = tiny_qwen2(seed=1)
    ids = add_signal_tokens(tok, model, TOKENS)
    head = SignalHead(model.config.hidden_size, len(NAMES))
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.log(torch.tensor(probs)))
    model.eval()
    return Student(
        model=model,
        tokenizer=tok,
        signal_names=NAMES,
        signal_tokens=TOKENS,
        signal_token_ids=ids,
        head=head,
        scaffolded=True,
        signal_objective="head",
        meta={"signal_essential": ESSENTIAL, "longest_step_tokens": 8},
    )


def guided(student, cfg=None, **switches):
    settings = resolve_guided(cfg or GuidedInferenceConfig(), student, **switches)
    return generate(student, [QUESTION], mode="guided", max_new_tokens=40, guided=settings)[0]


def test_the_defaults_gate_and_prune():
    cfg = GuidedInferenceConfig()
    assert cfg.confidence_threshold is None and cfg.prune_signals is None  # calibrated / from the taxonomy
    assert 0 < cfg.calibration_precision < 1


def test_a_non_essential_signal_is_pruned_by_default():
    student = student_with([0.6, 0.3, 0.05, 0.05])  # the non-essential signal is the likeliest
    out = generate(student, [QUESTION], mode="guided", max_new_tokens=40, guided=GuidedInferenceConfig())[0]
    assert out.signals and set(out.signals) == {"reasoning"}  # renormalised: 0.3 / 0.4 = 0.75, committed
    assert "restate" in guided(student, prune=False).signals  # the noprune ablation commits it


def test_the_gate_falls_back_to_free_decoding_below_its_threshold():
    student = student_with([0.1, 0.3, 0.3, 0.3])  # after pruning: 1/3 each, below 0.5
    gated = generate(student, [QUESTION], mode="guided", max_new_tokens=40, guided=GuidedInferenceConfig())[0]
    assert gated.confidences and all(c == pytest.approx(1 / 3, abs=1e-4) for c in gated.confidences)
    assert not gated.signals  # nothing committed: every step decoded freely
    nogate = guided(student, gate=False)  # the nogate ablation commits every step
    assert nogate.step_signals and all(s is not None for s in nogate.step_signals)


def test_choose_threshold_maximises_correct_minus_precision_times_committed():
    conf = [0.9, 0.8, 0.7, 0.6, 0.5]
    right = [True, True, False, True, False]
    assert choose_threshold(conf, right, 0.5) == 0.8  # +0.5 +0.5 -0.5 +0.5 -0.5: best prefix ends at 0.8
    assert choose_threshold(conf, right, 0.3) == 0.6
    assert choose_threshold(conf, [False] * 5, 0.5) == 1.0  # never right: commit nothing
    assert choose_threshold([0.7, 0.7], [True, False], 0.4) == 0.7  # ties go together


def _validation(golds: list[list[str]]) -> list[ExampleRecord]:
    return [
        ExampleRecord(
            trace_id=f"v{i}",
            problem_id=f"v{i}",
            split="validation",
            question=QUESTION,
            gold_answer="12",
            steps=[Step(index=j, signal=g, text=f"Step {j}: 3 * 4 = 12.", source="llm") for j, g in enumerate(gs)],
            signals=gs,
            n_steps=len(gs),
        )
        for i, gs in enumerate(golds)
    ]


def test_the_threshold_is_calibrated_on_the_validation_rows():
    student = student_with([0.1, 0.5, 0.2, 0.2])
    c = 0.5 / 0.9  # the decoder's confidence in 'reasoning' once 'restate' is pruned
    mostly_reasoning = _validation([["reasoning", "reasoning", "restate"], ["reasoning", "verify"]])
    cal = calibrate_gate(student, mostly_reasoning, prune_signals=["restate"], precision=0.5)
    assert cal.boundaries == 4  # the boundary whose gold signal is pruned is left out
    assert cal.threshold == pytest.approx(c, abs=1e-4) and cal.committed == 4
    assert cal.committed_accuracy == 0.75
    rarely_reasoning = _validation([["verify", "conclusion", "reasoning"], ["conclusion", "verify"]])
    assert calibrate_gate(student, rarely_reasoning, prune_signals=["restate"]).threshold == 1.0
    # how each evaluation variant decodes, and where each setting came from
    settings, record = plan_guided_decoding(GuidedInferenceConfig(), student, rarely_reasoning)
    assert settings.confidence_threshold == 1.0 and record["threshold_source"] == "calibrated"
    assert settings.prune_signals == ("restate",) and record["prune_source"].startswith("taxonomy")
    assert settings.max_step_tokens == 8 and record["max_step_tokens_source"] == "longest training step"
    settings, record = plan_guided_decoding(GuidedInferenceConfig(), student, [], gate=False, prune=False)
    assert settings.confidence_threshold == 0 and settings.prune_signals == ()
    assert record["threshold_source"] == "no gate" and record["prune_source"] == "no pruning"
    settings, record = plan_guided_decoding(GuidedInferenceConfig(), student, [])
    assert settings.confidence_threshold == 0.5 and record["threshold_source"] == "no validation data"
    assert not math.isnan(settings.confidence_threshold)


def test_the_evaluation_runs_the_ablations_side_by_side_by_default():
    assert {"scaffolded", "scaffolded-nogate", "scaffolded-noprune"} <= set(EvaluationConfig().models)
