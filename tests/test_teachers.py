"""Backends registry, reasoning parsing, and the transformers backend on a tiny random-init model."""

from __future__ import annotations

from pathlib import Path

import pytest

from rscaffold.config import BackendConfig, SamplingConfig, TinyModelConfig
from rscaffold.llm import BACKENDS, backend_class, create_backend
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend
from rscaffold.llm.parsing import (
    EMPTY_OUTPUT,
    clean_text,
    completion_from_output,
    derive_seed,
    parse_reasoning,
    split_reasoning,
)


def build_tiny_teacher(smollm2_dir: Path, out_dir: Path) -> Path:
    """A tiny random-init Llama with SmolLM2's tokenizer and chat template.

    The matrices are re-drawn with std 0.3: at the default 0.02 the logits are almost flat and
    greedy decoding degenerates to whitespace, which would make output comparisons vacuous.
    """
    import torch

    from rscaffold.models import build_tiny_model

    model, tok = build_tiny_model(str(smollm2_dir), TinyModelConfig())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=gen)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_teacher(smollm2_dir, tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="module")
def backend(tiny_dir):
    from rscaffold.llm.transformers_local import TransformersBackend

    b = TransformersBackend(BackendConfig(model=str(tiny_dir), device="cpu", batch_size=4))
    yield b
    b.close()


def _req(rid: str, question: str, n: int = 1) -> ChatRequest:
    return ChatRequest(rid, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}], n=n)


QUESTIONS = [
    "What is 2+3?",
    "A farmer has 17 sheep and buys 5 more. How many sheep does the farmer have now?",
    "hi",
    "Compute 12*12, showing all of your work carefully.",
    "Tom has 3 apples.",
]


# ---------------------------------------------------------------------------------------------
# parsing


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


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_lazy_and_errors(monkeypatch):
    assert set(BACKENDS) >= {"transformers", "openai", "vllm"}
    with pytest.raises(ValueError, match="unknown backend"):
        backend_class("nope")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from rscaffold.llm.vllm_engine import MISSING_VLLM

        with pytest.raises(ImportError) as info:
            create_backend(BackendConfig(backend="vllm", model="x"))
        assert str(info.value) == MISSING_VLLM
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    b = create_backend(BackendConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1"))
    assert isinstance(b, LLMBackend) and b.name == "openai" and "EMPTY" not in repr(b)


# ---------------------------------------------------------------------------------------------
# transformers backend


def test_create_backend_transformers(tiny_dir):
    b = create_backend(BackendConfig(model=str(tiny_dir), device="cpu"))
    assert isinstance(b, LLMBackend) and b.name == "transformers" and b.tokenizer.padding_side == "left"
    b.close()


def test_left_padded_batches_match_batch_size_one(backend):
    reqs = [_req(f"p{i}", q) for i, q in enumerate(QUESTIONS)]
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
    out = backend.generate([_req("a", "hello", n=3), _req("b", "bye", n=2)], s, on_result=seen.append)
    assert sorted((c.request_id, c.sample_index) for c in out) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert len(seen) == 5
    texts_a = [c.text for c in sorted(out, key=lambda c: c.sample_index) if c.request_id == "a"]
    assert len(set(texts_a)) == 3  # independent samples
    again = backend.generate([_req("a", "hello", n=3), _req("b", "bye", n=2)], s)
    assert sorted((c.request_id, c.sample_index, c.text) for c in again) == sorted(
        (c.request_id, c.sample_index, c.text) for c in out
    )  # seeded
    greedy = backend.generate([_req("g", "hello", n=2)], SamplingConfig(max_new_tokens=8))
    assert [c.sample_index for c in greedy] == [0, 1] and greedy[0].text == greedy[1].text


def test_finish_reason_stop_and_length(backend, monkeypatch):
    s = SamplingConfig(max_new_tokens=10)
    full = backend.generate([_req("x", "What is 2+3?")], s)[0]
    assert full.finish_reason == "length" and full.completion_tokens == 10
    # Declare the third generated token an end-of-sequence token: generation must stop there.
    prompt = backend.render_prompt(_req("x", "What is 2+3?").messages)
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
        [_req("x", "What is 2+3?"), _req("y", "A much longer question that pads the other row")], s
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
    reqs = [_req(f"p{i}", q) for i, q in enumerate(QUESTIONS[:4])]
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
        backend.generate([_req("a", "hi")], SamplingConfig(max_new_tokens=2), on_result=boom)
