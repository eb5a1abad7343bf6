"""OpenAI backend against a REAL OpenAI-compatible server (``transformers serve`` on 127.0.0.1
running a tiny model), plus a fault-injecting fake server for the failure paths."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from helpers import FakeOpenAIServer, chat_request, serve_available, transformers_serve

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.openai_api import OpenAIBackend

# ---------------------------------------------------------------------------------------------
# the real server: `transformers serve`


@pytest.fixture(scope="module")
def served(tiny_teacher_dir, tmp_path_factory):
    """``transformers serve <tiny model>`` as a subprocess on a free 127.0.0.1 port."""
    why = serve_available()
    if why:
        pytest.skip(why)
    with transformers_serve(tiny_teacher_dir, tmp_path_factory.mktemp("serve") / "serve.log") as base:
        yield {"base_url": f"{base}/v1", "model": str(tiny_teacher_dir)}


QUESTIONS = ["What is 2+3?", "A farmer has 17 sheep and buys 5 more. How many?", "hi", "Compute 12*12."]


def test_real_server_matches_local_generation(served, tiny_teacher_dir):
    from rscaffold.llm.transformers_local import TransformersBackend

    cfg = BackendConfig(
        backend="openai",
        model=served["model"],
        base_url=served["base_url"],
        concurrency=2,
        max_retries=1,
        request_timeout_s=60,
    )
    backend = OpenAIBackend(cfg)
    s = SamplingConfig(max_new_tokens=8)
    reqs = [chat_request(f"p{i}", q) for i, q in enumerate(QUESTIONS)] + [chat_request("n2", "hello", n=2)]
    seen = []
    out = backend.generate(reqs, s, on_result=seen.append)
    assert len(out) == len(seen) == 6
    by = {(c.request_id, c.sample_index): c for c in out}
    assert set(by) == {("p0", 0), ("p1", 0), ("p2", 0), ("p3", 0), ("n2", 0), ("n2", 1)}  # n honoured (or emulated)
    assert all(c.ok and c.text for c in out), [c.error for c in out]
    assert all(
        c.completion_tokens == 8 and c.finish_reason == "length" and c.prompt_tokens > 5 and c.latency_s > 0
        for c in out
    )
    # the same model run in-process: same greedy text, same prompt length
    local = TransformersBackend(BackendConfig(model=str(tiny_teacher_dir), device="cpu", batch_size=4))
    for c in local.generate(reqs[:4], s):
        assert by[(c.request_id, 0)].text == c.text
        assert by[(c.request_id, 0)].prompt_tokens == c.prompt_tokens
    local.close()


def test_real_server_from_running_loop_and_thread(served):
    cfg = BackendConfig(
        backend="openai", model=served["model"], base_url=served["base_url"], concurrency=2, max_retries=1
    )
    backend = OpenAIBackend(cfg)
    s = SamplingConfig(max_new_tokens=4)

    async def inside_a_loop():
        return backend.generate([chat_request("a", "hi")], s)

    assert asyncio.run(inside_a_loop())[0].ok
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", backend.generate([chat_request("b", "hi")], s)))
    t.start()
    t.join(60)
    assert box["r"][0].ok


# ---------------------------------------------------------------------------------------------
# fault injection: a fake server with scripted answers (no model)


@pytest.fixture
def fake():
    server = FakeOpenAIServer()
    yield server
    server.close()


def _backend(fake, **kw) -> OpenAIBackend:
    opts = dict(
        backend="openai", model="fake", base_url=fake.base_url, max_retries=3, request_timeout_s=10, concurrency=2
    )
    opts.update(kw)
    return OpenAIBackend(BackendConfig(**opts))


def test_client_retries_5xx_429_and_dropped_connections(fake):
    fake.actions.extend([("status", 500), ("status", 429), ("drop",)])
    out = _backend(fake, max_retries=3).generate([chat_request("a", "hi")], SamplingConfig())
    assert out[0].ok and out[0].text == "echo: hi #0" and out[0].prompt_tokens == 3 and out[0].completion_tokens == 4
    assert len(fake.bodies) == 4


def test_retries_exhausted_is_an_error_completion(fake):
    fake.reject_if = lambda body: (503, "overloaded") if body["messages"][-1]["content"] == "hi" else None
    out = _backend(fake, max_retries=1).generate([chat_request("a", "hi"), chat_request("b", "ok")], SamplingConfig())
    by = {c.request_id: c for c in out}
    assert by["a"].error.startswith("InternalServerError") and "overloaded" in by["a"].error
    assert by["b"].ok
    assert len(fake.bodies) == 3  # "a" tried twice (max_retries=1), "b" once


def test_bad_request_is_isolated_and_not_retried(fake):
    fake.reject_if = lambda body: (400, "prompt too long") if "long" in body["messages"][-1]["content"] else None
    out = _backend(fake).generate([chat_request("a", "long question"), chat_request("b", "fine")], SamplingConfig())
    by = {c.request_id: c for c in out}
    assert by["a"].error.startswith("BadRequestError") and "prompt too long" in by["a"].error
    assert by["b"].ok
    assert len(fake.bodies) == 2


def test_json_schema_falls_back_once_when_unsupported(fake, caplog):
    schema = {"title": "Label!", "type": "object", "properties": {"signal": {"type": "string"}}}
    fake.reject_if = lambda body: (
        (400, "response_format json_schema not supported") if "response_format" in body else None
    )
    backend = _backend(fake, concurrency=1)
    with caplog.at_level(logging.WARNING):
        out = backend.generate([chat_request("a", "x", schema=schema)], SamplingConfig())
    assert out[0].ok
    assert fake.bodies[0]["response_format"]["type"] == "json_schema"
    assert fake.bodies[0]["response_format"]["json_schema"]["name"] == "Label_"
    assert "response_format" not in fake.bodies[1]
    assert "rejected response_format" in caplog.text
    backend.generate([chat_request("b", "y", schema=schema)], SamplingConfig())
    assert len(fake.bodies) == 3 and "response_format" not in fake.bodies[2]  # remembered


def test_json_schema_is_sent_when_supported(fake):
    schema = {"type": "object"}
    out = _backend(fake).generate(
        [chat_request("a", "x", schema=schema)], SamplingConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=2)
    )
    body = fake.bodies[0]
    assert out[0].ok and body["response_format"]["json_schema"]["schema"] == schema
    assert (
        body["max_tokens"] == 7
        and body["temperature"] == 0.5
        and body["top_p"] == 0.9
        and isinstance(body["seed"], int)
    )


def test_max_completion_tokens_fallback(fake):
    fake.reject_if = lambda body: (
        (400, "Unsupported parameter: 'max_tokens'. Use 'max_completion_tokens' instead.")
        if "max_tokens" in body
        else None
    )
    backend = _backend(fake, concurrency=1)
    assert backend.generate([chat_request("a", "x")], SamplingConfig(max_new_tokens=5))[0].ok
    assert fake.bodies[-1]["max_completion_tokens"] == 5
    backend.generate([chat_request("b", "x")], SamplingConfig(max_new_tokens=5))
    assert "max_tokens" not in fake.bodies[-1] and len(fake.bodies) == 3


def test_rejected_sampling_parameter_is_dropped(fake):
    fake.reject_if = lambda body: (
        (400, "Unsupported value: 'temperature' does not support 0 with this model.") if "temperature" in body else None
    )
    backend = _backend(fake, concurrency=1)
    assert backend.generate([chat_request("a", "x")], SamplingConfig())[0].ok
    backend.generate([chat_request("b", "x")], SamplingConfig())
    assert [("temperature" in b) for b in fake.bodies] == [True, False, False]


def test_reasoning_empty_and_invalid_responses(fake):
    fake.actions.extend(
        [
            ("messages", [{"content": "<think>b</think>The answer is 4.", "reasoning_content": "a"}]),
            ("messages", [{"content": ""}]),
            ("messages", [{"content": None, "reasoning": "thinking...", "finish_reason": "length"}]),
            ("raw", b"<html>not json</html>"),
            ("raw", {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}),
            ("messages", [{"content": None, "refusal": "I can't help with that."}]),
        ]
    )
    backend = _backend(fake, concurrency=1, max_retries=0)
    out = backend.generate([chat_request(r, "q") for r in "abcdef"], SamplingConfig())
    by = {c.request_id: c for c in out}
    assert by["a"].ok and by["a"].reasoning == "a\n\nb" and by["a"].text == "The answer is 4."
    assert by["b"].error == "empty output"
    assert by["c"].ok and by["c"].reasoning == "thinking..." and by["c"].text == "" and by["c"].truncated
    assert by["d"].error and "invalid response" in by["d"].error
    assert by["e"].error == "invalid response: no choices"
    assert by["f"].error == "refusal: I can't help with that."


def test_n_samples_and_servers_that_ignore_n(fake):
    out = _backend(fake).generate([chat_request("a", "q", n=3)], SamplingConfig(temperature=0.7))
    assert [c.sample_index for c in out] == [0, 1, 2] and len(fake.bodies) == 1 and fake.bodies[0]["n"] == 3
    assert out[0].completion_tokens is None and out[0].extra["usage_completion_tokens_total"] == 12
    fake.bodies.clear()
    fake.actions.extend([("messages", [{"content": "one"}]), ("messages", [{"content": "two"}])])
    out = _backend(fake).generate([chat_request("b", "q", n=3)], SamplingConfig(temperature=0.7))
    assert [(c.sample_index, c.text) for c in out] == [(0, "one"), (1, "two"), (2, "echo: q #0")]
    assert [b.get("n", 1) for b in fake.bodies] == [3, 2, 1]
    assert len({b["seed"] for b in fake.bodies}) == 3  # each follow-up draws with its own seed


def test_api_key_is_sent_but_never_shown(fake, monkeypatch, caplog):
    secret = "sk-test-very-secret-123"
    monkeypatch.setenv("RSCAFFOLD_TEST_KEY", secret)
    fake.reject_if = lambda body: (400, f"bad key {secret}")
    backend = _backend(fake, api_key_env="RSCAFFOLD_TEST_KEY")
    with caplog.at_level(logging.DEBUG):
        out = backend.generate([chat_request("a", "q")], SamplingConfig())
    assert fake.headers[0]["authorization"] == f"Bearer {secret}"
    assert secret not in out[0].error and "***" in out[0].error
    assert secret not in repr(backend) and secret not in caplog.text


def test_callback_errors_propagate(fake):
    def boom(c):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _backend(fake).generate([chat_request(r, "q") for r in "abc"], SamplingConfig(), on_result=boom)


def test_an_answer_that_is_not_a_completion_is_asked_again(fake, monkeypatch):
    import rscaffold.llm.openai_api as api

    monkeypatch.setattr(api, "INVALID_RETRY_BASE_S", 0.01)
    empty = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}
    fake.actions.extend([("raw", b"<html>not json</html>"), ("raw", empty)])
    out = _backend(fake, max_retries=2).generate([chat_request("a", "hi")], SamplingConfig())
    assert out[0].ok and out[0].text == "echo: hi #0" and len(fake.bodies) == 3
    fake.bodies.clear()
    fake.actions.extend([("raw", b"garbage")] * 3)
    out = _backend(fake, max_retries=2).generate([chat_request("b", "hi")], SamplingConfig())
    assert "invalid response" in out[0].error and out[0].error_kind == "transport" and len(fake.bodies) == 3


def test_a_server_that_keeps_answering_429_is_reported_as_rate_limiting(fake):
    from rscaffold.stages.teacher import TeacherUnavailableError, _TransportBreaker

    fake.reject_if = lambda body: (429, "slow down")
    out = _backend(fake, max_retries=0).generate([chat_request("a", "hi")], SamplingConfig())
    assert out[0].error.startswith("rate-limited (HTTP 429") and out[0].error_kind == "transport"
    breaker = _TransportBreaker(limit=1)
    with pytest.raises(TeacherUnavailableError, match="rate-limiting this run") as info:
        breaker.observe(out[0])
    assert "unreachable" not in str(info.value)


def test_an_error_from_a_call_outside_a_loop_is_not_chained_to_the_loop_probe(fake):
    def stop(_c):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        _backend(fake).generate([chat_request("a", "hi")], SamplingConfig(), on_result=stop)
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__context__ or err.__cause__
    assert not any("no running event loop" in m for m in chain)
