"""Guided decoding has the same token budget as plain decoding.

A scaffolded student trained on R1-style traces writes steps of hundreds of tokens and answers of
thousands. Guided decoding must be able to spend the whole ``max_new_tokens`` that base and
CoT-SFT get, must not cut a step that fits the budget (no step cap below the training data's
longest step, no small constant bound on the number of steps), and its per-step safety cap is the
longest training step (the evaluation manifest records it: ``tests/method/test_stages.py``).

The student here is the untied, padded tiny Qwen2 with signal tokens whose LM head can produce
neither eos nor a line break (those rows are zero, every other logit is a random draw, so greedy
decoding always finds a larger one): it stays inside one step for as long as it is allowed to.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from method_shapes import NAMES, TOKENS, tiny_qwen2

from rscaffold.config import GuidedInferenceConfig
from rscaffold.decoding.in_process import generate
from rscaffold.student import Student
from rscaffold.training.signal_tokens import add_signal_tokens

QUESTION = "A farmer has 12 baskets with 7 apples each and sells 30 apples. How many are left?"
BUDGET = 540  # more than a bound of 8 steps x (64 tokens + a signal token) = 520


def never_ending_student(longest_step_tokens: int) -> Student:
    """A scaffolded student that never ends a step on its own (no eos, no line break), trained
    (as its meta says) on steps of up to ``longest_step_tokens`` tokens."""
    model, tok = tiny_qwen2(seed=3)
    ids = add_signal_tokens(tok, model, TOKENS)
    ending = [i for t, i in tok.get_vocab().items() if "Ċ" in t] + list(tok.all_special_ids)
    with torch.no_grad():
        model.lm_head.weight[ending] = 0.0
    model.eval()
    return Student(
        model=model,
        tokenizer=tok,
        signal_names=NAMES,
        signal_tokens=TOKENS,
        signal_token_ids=ids,
        scaffolded=True,
        signal_objective="token",
        meta={"longest_step_tokens": longest_step_tokens, "signal_essential": [True, True, True]},
    )


def test_guided_decoding_can_use_the_whole_plain_budget_in_one_long_step():
    student = never_ending_student(longest_step_tokens=2000)
    plain = generate(student, [QUESTION], mode="plain", max_new_tokens=BUDGET)[0]
    guided = generate(student, [QUESTION], mode="guided", max_new_tokens=BUDGET, guided=GuidedInferenceConfig())[0]
    assert plain.output_tokens == BUDGET
    # the same budget, all of it used; the step was never cut (it fits the budget and the
    # training data's longest step), so no new signal was forced mid-sentence
    assert guided.output_tokens == BUDGET
    assert len(guided.steps) == 1 and len(guided.steps[0]) > 900


def test_the_step_cap_is_the_longest_training_step_and_the_budget_bounds_the_steps():
    student = never_ending_student(longest_step_tokens=90)
    guided = generate(student, [QUESTION], mode="guided", max_new_tokens=BUDGET, guided=GuidedInferenceConfig())[0]
    assert guided.output_tokens == BUDGET
    # cut only at the cap from the training data (the gate commits no signal: the student's
    # signal rows are still identical), so 90-token steps until the budget is spent: 6 steps,
    # not at most 8 of at most 64 tokens
    assert len(guided.steps) == -(-BUDGET // 90) == 6
    # an explicit cap in the config wins over the training data's
    capped = generate(
        student, [QUESTION], mode="guided", max_new_tokens=BUDGET, guided=GuidedInferenceConfig(max_step_tokens=300)
    )[0]
    assert capped.output_tokens == BUDGET and len(capped.steps) == 2
