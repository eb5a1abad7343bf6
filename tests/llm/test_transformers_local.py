"""The transformers backend on a tiny random-init model: batching, sampling, stopping, errors."""

from __future__ import annotations

import pytest
from helpers import chat_request

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm import create_backend
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend


@pytest.fixture(scope="module")
def backend(tiny_teacher_dir):
    from rscaffold.llm.transformers_local import TransformersBackend

    b = TransformersBackend(BackendConfig(model=str(tiny_teacher_dir), device="cpu", batch_size=4))
    yield b
    b.close()


QUESTIONS = [
    "What is 2+3?",
    "A farmer has 17 sheep and buys 5 more. How many sheep does the farmer have now?",
    "hi",
    "Compute 12*12, showing all of your work carefully.",
    "Tom has 3 apples.",
]


def test_create_backend_transformers(tiny_teacher_dir):
    b = create_backend(BackendConfig(model=str(tiny_teacher_dir), device="cpu"))
    assert isinstance(b, LLMBackend) and b.name == "transformers" and b.tokenizer.padding_side == "left"
    b.close()


def test_left_padded_batches_match_batch_size_one(backend):
    reqs = [chat_request(f"p{i}", q) for i, q in enumerate(QUESTIONS)]
    s = SamplingConfig(max_new_tokens=12, temperature=0.0)
    backend.cfg.batch_size = 1
    single = {c.request_id: c for c in backend.generate(reqs, s)}
    backend.cfg.batch_size = 4
    batched = {c.request_id: c for c in backend.generate(reqs, s)}
    assert set(single) == set(batched) == {f"p{i}" for i in range(len(QUESTIONS))}
    for rid in single:
        a, b = single[rid], batched[rid]
        assert a.ok and b.ok, (a.error, b.error)
        assert a.text and a.text == b.text
        assert a.prompt_tokens == b.prompt_tokens  # the unpadded prompt length, whatever the batch
        assert a.completion_tokens == b.completion_tokens == 12
        assert a.finish_reason == b.finish_reason == "length"
        assert a.latency_s > 0
    assert len({c.prompt_tokens for c in single.values()}) > 1  # the batch really needed padding


def test_n_samples(backend):
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    seen: list[Completion] = []
    out = backend.generate([chat_request("a", "hello", n=3), chat_request("b", "bye", n=2)], s, on_result=seen.append)
    assert sorted((c.request_id, c.sample_index) for c in out) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert len(seen) == 5
    texts_a = [c.text for c in sorted(out, key=lambda c: c.sample_index) if c.request_id == "a"]
    assert len(set(texts_a)) == 3  # independent samples
    again = backend.generate([chat_request("a", "hello", n=3), chat_request("b", "bye", n=2)], s)
    assert sorted((c.request_id, c.sample_index, c.text) for c in again) == sorted(
        (c.request_id, c.sample_index, c.text) for c in out
    )  # seeded
    greedy = backend.generate([chat_request("g", "hello", n=2)], SamplingConfig(max_new_tokens=8))
    assert [c.sample_index for c in greedy] == [0, 1] and greedy[0].text == greedy[1].text


def test_finish_reason_stop_and_length(backend, monkeypatch):
    s = SamplingConfig(max_new_tokens=10)
    full = backend.generate([chat_request("x", "What is 2+3?")], s)[0]
    assert full.finish_reason == "length" and full.completion_tokens == 10
    # Declare the third generated token an end-of-sequence token: generation must stop there.
    prompt = backend.render_prompt(chat_request("x", "What is 2+3?").messages)
    import torch

    enc = backend.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        ids = backend.model.generate(
            **enc, max_new_tokens=3, do_sample=False, pad_token_id=backend.tokenizer.pad_token_id
        )
    third = int(ids[0, -1])
    first_two = ids[0, enc["input_ids"].shape[1] : -1].tolist()
    if third in first_two:
        pytest.skip("degenerate sample: the third token also appears earlier")
    monkeypatch.setattr(backend, "eos_token_ids", backend.eos_token_ids + [third])
    stopped = backend.generate(
        [chat_request("x", "What is 2+3?"), chat_request("y", "A much longer question that pads the other row")], s
    )
    x = next(c for c in stopped if c.request_id == "x")
    assert x.finish_reason == "stop" and x.completion_tokens == 3 and not x.truncated
    assert x.text == backend.tokenizer.decode(first_two, skip_special_tokens=True).strip()


def test_batch_error_is_isolated(backend, monkeypatch):
    real = backend.model.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.model, "generate", flaky)
    monkeypatch.setattr(backend.cfg, "batch_size", 2)
    reqs = [chat_request(f"p{i}", q) for i, q in enumerate(QUESTIONS[:4])]
    bad = ChatRequest("bad", [{"role": "user", "content": None}])  # the chat template rejects it
    seen: list[Completion] = []
    out = backend.generate(reqs + [bad], SamplingConfig(max_new_tokens=4), on_result=seen.append)
    assert len(out) == len(seen) == 5
    simulated = [c for c in out if c.error and "simulated" in c.error]
    assert len(simulated) == 2  # exactly the first batch
    assert next(c for c in out if c.request_id == "bad").error.startswith("prompt:")
    assert len([c for c in out if c.ok]) == 2


def test_callback_errors_propagate(backend):
    def boom(c):
        raise KeyError("disk full")

    with pytest.raises(KeyError):
        backend.generate([chat_request("a", "hi")], SamplingConfig(max_new_tokens=2), on_result=boom)
