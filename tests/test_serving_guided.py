"""Decoding a student through a server (rscaffold.decoding.served.generate_served) gives what
in-process decoding (rscaffold.decoding.in_process.generate) gives, on the random student that takes every stopping
path, through a TEST-ONLY fake of vLLM's completions dialect (tests/serving_fake.py: the same
tiny model behind an HTTP server, greedy, vLLM's stopping and log-probability semantics)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from serving_fake import FakeVLLMServer, fake_vllm_server

from rscaffold.config import BackendConfig

torch = pytest.importorskip("torch")

# Chosen so that no step request stops at a blank line before the step's text. There the served
# decoder continues from the re-sent text, re-tokenized ("\n\n" is one token), where in-process
# decoding continues from the generated ids ("\n", "\n"): the difference documented in
# rscaffold.decoding.served's docstring, which makes the random student (which writes many newlines)
# diverge on most other questions. _no_blank_line_restarts checks that it did not happen here.
GUIDED_QUESTIONS = [
    "Elena has 20 marbles and buys 13 more. How many marbles does Elena have now?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?\nA. feathers\nB. iron\nC. neither",
    "Sara reads 12 pages a day. How many pages does she read in a week?",
]
# Plain decoding: questions whose in-process answer holds no signal token (one that does:
# test_plain_of_a_scaffolded_student_keeps_its_signal_tokens).
PLAIN_QUESTIONS = [
    "Chloe baked 47 cookies and gave 33 of them to friends. How many cookies are left?",
    "A teacher shares 72 stickers equally among 8 students. How many stickers does each student get?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?\nA. feathers\nB. iron\nC. neither",
]
BUDGET = 64


def _backend(base_url: str):
    from rscaffold.llm import create_backend

    return create_backend(
        BackendConfig(backend="openai", model="student", base_url=base_url, concurrency=4, max_retries=0)
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny model's forward passes are too small to share, and two threads
    on two busy cores make the in-process reference decoder 10 to 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(random_student):
    with fake_vllm_server(random_student.model, random_student.tokenizer) as server:
        yield server, _backend(server.base_url)


def _same_confidences(a, b) -> bool:
    return len(a) == len(b) and all(
        (x is None) == (y is None) and (x is None or math.isclose(x, y, abs_tol=1e-4)) for x, y in zip(a, b)
    )


def _step_answers(server: FakeVLLMServer, since: int) -> list[dict]:
    """The choices the fake gave to step requests (those with stop_token_ids) since request ``since``."""
    return [a["choices"][0] for b, a in zip(server.bodies[since:], server.answers[since:]) if "stop_token_ids" in b]


def _no_blank_line_restarts(choices: list[dict]) -> None:
    restarts = [c for c in choices if isinstance(c["stop_reason"], str) and not c["text"].strip()]
    assert not restarts, (
        "a step request stopped at a blank line before any text, where served decoding continues from "
        "re-tokenized text (documented difference): pick other questions for this comparison"
    )


@pytest.mark.parametrize(
    "settings",
    [
        dict(confidence_threshold=0.0),
        dict(confidence_threshold=0.99, prune_signals=("elaborate",), max_step_tokens=8),
    ],
    ids=["nogate", "gated-pruned-capped"],
)
def test_guided_through_the_server_equals_in_process(random_student, served, settings):
    from rscaffold.decoding.in_process import generate
    from rscaffold.decoding.policy import GuidedSettings
    from rscaffold.decoding.served import generate_served

    server, backend = served
    s = GuidedSettings(**settings)
    since = server.requests
    got = generate_served(backend, random_student, GUIDED_QUESTIONS, mode="guided", max_new_tokens=BUDGET, guided=s)
    want = generate(
        random_student, GUIDED_QUESTIONS, mode="guided", max_new_tokens=BUDGET, batch_size=1, guided=s, kv_cache=False
    )
    steps = _step_answers(server, since)
    _no_blank_line_restarts(steps)
    for g, w in zip(got, want):
        assert (g.text, g.signals, g.steps, g.step_signals) == (w.text, w.signals, w.steps, w.step_signals)
        assert _same_confidences(g.confidences, w.confidences), (g.confidences, w.confidences)
        assert g.output_tokens == w.output_tokens  # the server's counts: eos counted, a stopping signal not
    # not vacuous: several steps, and every way a step request ends
    assert sum(len(w.steps) for w in want) > 2 * len(want)
    assert {c["finish_reason"] for c in steps} == {"stop", "length"}
    assert any(isinstance(c["stop_reason"], int) for c in steps), "a step stopped at a signal token"
    assert any(isinstance(c["stop_reason"], str) for c in steps), "a step stopped at a blank line"
    if s.confidence_threshold == 0:
        assert any(c["finish_reason"] == "stop" and c["stop_reason"] is None for c in steps), "a step ended at eos"
        assert min(w.output_tokens for w in want) < BUDGET
    else:
        kinds = {sig is None for w in want for sig in w.step_signals}
        assert kinds == {True, False}, "the gate both committed signals and refused"
        assert not any("elaborate" in w.signals for w in want)
        pruned = random_student.signal_token_ids[random_student.signal_names.index("elaborate")]
        bodies = [b for b in server.bodies[since:] if "stop_token_ids" in b]
        assert all(b["logit_bias"].get(str(pruned)) == -100 for b in bodies)


def test_plain_through_the_server_equals_in_process(random_student, served):
    from rscaffold.decoding.in_process import generate
    from rscaffold.decoding.served import generate_served

    server, backend = served
    got = generate_served(backend, random_student, PLAIN_QUESTIONS, mode="plain", max_new_tokens=BUDGET)
    want = generate(random_student, PLAIN_QUESTIONS, mode="plain", max_new_tokens=BUDGET, batch_size=1)
    assert not any(w.signals for w in want)
    for g, w in zip(got, want):
        assert (g.text, g.steps, g.step_signals, g.confidences) == (w.text, w.steps, w.step_signals, w.confidences)
        assert g.output_tokens == w.output_tokens
    assert all(w.text for w in want) and len({w.text for w in want}) == len(want)
    # a baseline student (no signals) decodes its plain answers the same way, signal tokens dropped
    baseline = dataclasses.replace(
        random_student, signal_names=[], signal_tokens=[], signal_token_ids=[], scaffolded=False
    )
    assert [g.text for g in generate_served(backend, baseline, GUIDED_QUESTIONS[:1], max_new_tokens=BUDGET)] == [
        w.text for w in generate(baseline, GUIDED_QUESTIONS[:1], mode="plain", max_new_tokens=BUDGET, batch_size=1)
    ]


def test_plain_of_a_scaffolded_student_keeps_its_signal_tokens(random_student, served):
    from rscaffold.decoding.in_process import generate
    from rscaffold.decoding.served import generate_served

    _, backend = served
    q = GUIDED_QUESTIONS[:1]  # its plain answer holds a signal token, inside a line
    want = generate(random_student, q, mode="plain", max_new_tokens=48, batch_size=1)
    assert want[0].signals
    got = generate_served(backend, random_student, q, mode="plain", max_new_tokens=48)
    assert (got[0].text, got[0].steps, got[0].step_signals) == (want[0].text, want[0].steps, want[0].step_signals)
    assert got[0].output_tokens == want[0].output_tokens


def test_a_gate_at_threshold_one_commits_what_in_process_commits(random_student, served):
    from rscaffold.decoding.in_process import generate
    from rscaffold.decoding.policy import GuidedSettings
    from rscaffold.decoding.served import generate_served

    _, backend = served
    s = GuidedSettings(confidence_threshold=1.0, max_step_tokens=8)
    q = GUIDED_QUESTIONS[:1]
    want = generate(random_student, q, mode="guided", max_new_tokens=10, batch_size=1, guided=s, kv_cache=False)
    assert want[0].step_signals[0] is not None and want[0].confidences[0] == 1.0
    got = generate_served(backend, random_student, q, mode="guided", max_new_tokens=10, guided=s)
    assert got[0].step_signals[:1] == want[0].step_signals[:1]


def test_a_server_without_logprobs_is_refused(random_student):
    from rscaffold.decoding.policy import GuidedSettings
    from rscaffold.decoding.served import ServedDecodingError, generate_served

    with fake_vllm_server(random_student.model, random_student.tokenizer, omit_logprobs=True) as server:
        with pytest.raises(ServedDecodingError, match="logprobs"):
            generate_served(
                _backend(server.base_url),
                random_student,
                GUIDED_QUESTIONS[:2],
                mode="guided",
                max_new_tokens=8,
                guided=GuidedSettings(),
            )
        assert server.requests == 2  # the two signal requests; no step was decoded
