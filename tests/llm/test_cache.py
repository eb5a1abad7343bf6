"""The request cache (rscaffold.llm.cache): keys, hits without a model, failures not stored,
several writers, model identity by content, and what requests cost."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import Capabilities, ChatRequest, Completion
from rscaffold.llm.cache import CachedBackend, RequestCache, RequestStats, model_identity


class EchoBackend:
    """test fake: answers each request with its last message, or an error for ids in ``fail``; a
    real engine's answers are cached the same way (tests/test_never_pay_twice.py)"""

    name = "echo"
    model_id = "echo"
    capabilities = Capabilities(batch_invariant=True)

    def __init__(self, fail=(), kind="request"):
        self.fail, self.kind = set(fail), kind
        self.sent: list[str] = []

    def generate(self, requests, sampling, on_result=None):
        out = []
        for r in requests:
            self.sent.append(r.request_id)
            if r.request_id in self.fail:
                c = Completion(r.request_id, error="boom", error_kind=self.kind)
            else:
                c = Completion(r.request_id, text=r.messages[-1]["content"], prompt_tokens=3, completion_tokens=2)
            out.append(c)
            if on_result:
                on_result(c)
        return out

    def close(self):
        pass


def cached(tmp_path: Path, inner: EchoBackend, mode: str = "use") -> CachedBackend:
    cfg = BackendConfig(backend="openai", model="served-model", base_url="http://127.0.0.1:1/v1")
    return CachedBackend(
        cfg, lambda: inner, capabilities=inner.capabilities, name="openai", cache=RequestCache(tmp_path, mode)
    )


def req(rid: str, text: str, seed: int | None = None) -> ChatRequest:
    return ChatRequest(rid, [{"role": "user", "content": text}], seed=seed)


GREEDY = SamplingConfig(max_new_tokens=8)
SAMPLED = SamplingConfig(max_new_tokens=8, temperature=0.7, seed=1)


def test_hits_are_served_without_creating_the_backend(tmp_path):
    first = EchoBackend()
    a = cached(tmp_path, first)
    got = a.generate([req("x", "hello"), req("y", "world")], GREEDY)
    assert [c.text for c in got] == ["hello", "world"] and first.sent == ["x", "y"]

    def must_not_build():  # test guard: a fully cached call needs no model
        raise AssertionError("backend created")

    b = CachedBackend(a.cfg, must_not_build, capabilities=a.capabilities, name="openai", cache=RequestCache(tmp_path))
    seen = []
    again = b.generate([req("other-id", "hello")], GREEDY, on_result=seen.append)  # same content, new id
    assert [c.text for c in again] == ["hello"] and again[0].request_id == "other-id" and seen == again
    assert b.stats.from_cache == 1 and b.stats.sent == 0 and b.stats.cached_prompt_tokens == 3


def test_key_covers_what_decides_the_answer(tmp_path):
    cache = RequestCache(tmp_path)
    k = lambda r, s=GREEDY, m="m": cache.key(model=m, request=r, sampling=s)  # noqa: E731
    assert k(req("a", "q")) == k(req("b", "q"))  # the id is not content
    assert k(req("a", "q", seed=1)) == k(req("a", "q", seed=2))  # greedy ignores the seed
    assert k(req("a", "q", seed=1), SAMPLED) != k(req("a", "q", seed=2), SAMPLED)
    assert k(req("a", "q")) != k(req("a", "q"), m="other-model")
    assert k(req("a", "q")) != k(req("a", "q"), SamplingConfig(max_new_tokens=9))
    schema = req("a", "q")
    schema.json_schema = {"type": "object"}
    assert k(schema) != k(req("a", "q"))


def test_failures_are_not_stored_and_refresh_sends_again(tmp_path):
    inner = EchoBackend(fail={"bad"})
    a = cached(tmp_path, inner)
    a.generate([req("bad", "x"), req("good", "y")], GREEDY)
    inner.fail.clear()
    a.generate([req("bad", "x"), req("good", "y")], GREEDY)
    assert inner.sent == ["bad", "good", "bad"] and a.stats.failed == 1
    refresh = cached(tmp_path, inner, mode="refresh")
    refresh.generate([req("good", "y")], GREEDY)
    assert inner.sent[-1] == "good" and refresh.stats.sent == 1


def test_many_writers_share_one_cache(tmp_path):
    inners = [EchoBackend() for _ in range(4)]
    backends = [cached(tmp_path, i) for i in inners]
    requests = [req(f"r{i}", f"q{i}") for i in range(40)]
    threads = [threading.Thread(target=b.generate, args=(requests, GREEDY)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = list(tmp_path.glob("??/*.json"))
    assert len(files) == 40 and not list(tmp_path.glob("??/.*.tmp"))
    check = cached(tmp_path, EchoBackend())
    assert [c.text for c in check.generate(requests, GREEDY)] == [f"q{i}" for i in range(40)]
    assert check.stats.sent == 0


def test_a_damaged_entry_is_a_miss(tmp_path):
    inner = EchoBackend()
    a = cached(tmp_path, inner)
    a.generate([req("x", "hello")], GREEDY)
    (entry,) = tmp_path.glob("??/*.json")
    entry.write_text("{not json")
    a.generate([req("x", "hello")], GREEDY)
    assert inner.sent == ["x", "x"]


def test_local_model_identity_follows_content_not_path(tmp_path, tiny_model_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    index = tmp_path / "index.json"
    ident = lambda d: model_identity(BackendConfig(model=str(d)), index)  # noqa: E731
    assert ident(tiny_model_dir) == ident(copy)
    (copy / "README.md").write_text("a model card does not change the model")
    assert ident(copy) == ident(tiny_model_dir)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert ident(copy) != ident(tiny_model_dir)
    served = BackendConfig(backend="openai", model="m", base_url="http://x/v1")
    assert model_identity(served) != model_identity(served.model_copy(update={"revision": "v2"}))


def test_stats_estimate_the_cost():
    stats = RequestStats(sent=2, prompt_tokens=1_000_000, completion_tokens=500_000, cached_prompt_tokens=2_000_000)
    cfg = BackendConfig(
        backend="openai", model="m", price_per_million_prompt_tokens=0.5, price_per_million_completion_tokens=2.0
    )
    summary = stats.summary(cfg)
    assert summary["cost"] == pytest.approx(1.5) and summary["cost_saved_by_cache"] == pytest.approx(1.0)
    assert "cost" not in stats.summary(BackendConfig())
