"""vLLM backend: request building and output parsing with plain objects (vLLM not needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import ChatRequest
from rscaffold.llm.parsing import EMPTY_OUTPUT, derive_seed
from rscaffold.llm.vllm_engine import (
    JSON_SCHEMA_KEY,
    VLLMBackend,
    build_sampling_kwargs,
    make_sampling_params,
    parse_request_output,
    structured_output_kwargs,
)

SCHEMA = {"type": "object", "properties": {"signal": {"type": "string"}}, "required": ["signal"]}


class FakeSamplingParams:
    """Test fake of vllm.SamplingParams: records its keyword arguments; ``allowed`` limits them."""

    allowed: set[str] | None = None

    def __init__(self, **kwargs):
        if self.allowed is not None and set(kwargs) - self.allowed:
            raise TypeError(f"unexpected keyword arguments {set(kwargs) - self.allowed}")
        self.kwargs = kwargs


class FakeStructured:
    def __init__(self, json=None):
        self.json = json


def fake_vllm(new_api: bool = True, old_api: bool = False, allowed=None):
    """A stand-in for the ``vllm`` module with only what the backend touches (a test fake)."""
    sp = SimpleNamespace()
    if new_api:
        sp.StructuredOutputsParams = FakeStructured
    if old_api:
        sp.GuidedDecodingParams = FakeStructured
    params_cls = type("SP", (FakeSamplingParams,), {"allowed": allowed})
    return SimpleNamespace(SamplingParams=params_cls, sampling_params=sp)


def out(index, text, finish="stop", n_tokens=3, stop_reason=None):
    return SimpleNamespace(
        index=index, text=text, token_ids=list(range(n_tokens)), finish_reason=finish, stop_reason=stop_reason
    )


def test_build_sampling_kwargs():
    s = SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=5)
    kw = build_sampling_kwargs(s, ChatRequest("p1", [], n=4))
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": derive_seed(5, "p1")}
    kw2 = build_sampling_kwargs(s, ChatRequest("p1", [], json_schema=SCHEMA))
    assert kw2[JSON_SCHEMA_KEY] == SCHEMA and kw2["n"] == 1
    assert build_sampling_kwargs(s, ChatRequest("p2", []))["seed"] != kw["seed"]


def test_structured_outputs_api_versions():
    new = structured_output_kwargs(fake_vllm(new_api=True, old_api=True), SCHEMA)
    assert list(new) == ["structured_outputs"] and new["structured_outputs"].json == SCHEMA
    old = structured_output_kwargs(fake_vllm(new_api=False, old_api=True), SCHEMA)
    assert list(old) == ["guided_decoding"] and old["guided_decoding"].json == SCHEMA
    assert structured_output_kwargs(fake_vllm(new_api=False), SCHEMA) == {}


def test_make_sampling_params():
    kw = build_sampling_kwargs(SamplingConfig(), ChatRequest("p", [], json_schema=SCHEMA))
    p = make_sampling_params(fake_vllm(), kw)
    assert JSON_SCHEMA_KEY not in p.kwargs and p.kwargs["structured_outputs"].json == SCHEMA
    assert p.kwargs["temperature"] == 0.0 and p.kwargs["max_tokens"] == 256
    # a SamplingParams without the structured-output field: generate unconstrained
    base = {"n", "temperature", "top_p", "max_tokens", "seed"}
    p = make_sampling_params(fake_vllm(allowed=base), kw)
    assert set(p.kwargs) == base


def test_parse_request_output():
    ro = SimpleNamespace(
        prompt_token_ids=[1, 2, 3, 4],
        outputs=[
            out(1, "<think>hmm\n\nok</think>The answer is 5.", "stop", 9),
            out(0, "The answer is", "length", 16),
        ],
    )
    cs = parse_request_output(ro, "p1", latency_s=0.5, n=3)
    assert [c.sample_index for c in cs] == [0, 1, 2]
    c0, c1, c2 = cs
    assert c0.ok and c0.truncated and c0.completion_tokens == 16 and c0.prompt_tokens == 4 and c0.latency_s == 0.5
    assert c1.ok and c1.reasoning == "hmm\n\nok" and c1.text == "The answer is 5." and c1.finish_reason == "stop"
    assert c2.error and "missing" in c2.error


def test_parse_request_output_errors():
    ro = SimpleNamespace(
        prompt_token_ids=None,
        outputs=[
            out(0, "", "stop", 1),
            out(1, "partial", "abort", 2),
            out(2, "<think>never closed", "length", 5, stop_reason=None),
        ],
    )
    c0, c1, c2 = parse_request_output(ro, "p")
    assert c0.error == EMPTY_OUTPUT and c0.prompt_tokens is None
    assert c1.error == "generation aborted"
    assert c2.ok and c2.reasoning == "never closed" and c2.extra.get("unclosed_think")


class FakeLLM:
    """Test fake of vllm.LLM: echoes the last user message; fails on a marked request."""

    def __init__(self):
        self.calls = []

    def chat(self, messages, sampling_params, use_tqdm=False):
        self.calls.append((messages, sampling_params))
        if any(m[-1]["content"] == "explode" for m in messages):
            raise RuntimeError("engine died")
        return [
            SimpleNamespace(
                prompt_token_ids=[0] * 5,
                outputs=[out(i, f"echo {m[-1]['content']} #{i}") for i in range(p.kwargs["n"])],
            )
            for m, p in zip(messages, sampling_params)
        ]


def test_backend_with_fake_engine(monkeypatch):
    import rscaffold.llm.vllm_engine as ve

    monkeypatch.setattr(ve, "VLLM_MIN_CHUNK", 2)
    llm = FakeLLM()
    b = VLLMBackend(BackendConfig(backend="vllm", model="m", batch_size=2), llm=llm, vllm_module=fake_vllm())
    reqs = [
        ChatRequest(f"r{i}", [{"role": "user", "content": c}], n=2) for i, c in enumerate(["a", "b", "explode", "c"])
    ]
    reqs.append(ChatRequest("j", [{"role": "user", "content": "d"}], json_schema=SCHEMA))
    seen = []
    res = b.generate(reqs, SamplingConfig(), on_result=seen.append)
    assert len(res) == len(seen) == 9
    assert len(llm.calls) == 3  # chunks of 2
    by = {(c.request_id, c.sample_index): c for c in res}
    assert by[("r0", 1)].text == "echo a #1"
    assert by[("r2", 0)].error and "engine died" in by[("r2", 0)].error and by[("r3", 1)].error  # same chunk
    assert by[("j", 0)].ok
    assert llm.calls[2][1][0].kwargs["structured_outputs"].json == SCHEMA


def test_missing_vllm_message():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match=r"pip install 'rscaffold\[vllm\]'"):
        VLLMBackend(BackendConfig(backend="vllm", model="m"))


def test_line_choices_become_a_regex_constraint():
    import re as _re

    from rscaffold.config import SamplingConfig
    from rscaffold.llm.base import ChatRequest
    from rscaffold.llm.vllm_engine import REGEX_KEY, build_sampling_kwargs

    req = ChatRequest(
        "t:label",
        [{"role": "user", "content": "x"}],
        json_schema={"type": "object"},
        line_choices=[["1: A (x)", "1: B"], ["2: A (x)", "2: B"]],
    )
    kw = build_sampling_kwargs(SamplingConfig(), req)
    assert "json_schema" not in kw
    rx = _re.compile(kw[REGEX_KEY])
    assert rx.fullmatch("1: A (x)\n2: B") and rx.fullmatch("1: B\n2: B")
    assert not rx.fullmatch("1: A (x)") and not rx.fullmatch("1: C\n2: B") and not rx.fullmatch("1: A x\n2: B")
