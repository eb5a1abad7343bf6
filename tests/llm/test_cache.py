"""The request cache (rscaffold.llm.cache): keys, hits without a model, failures not stored,
several writers (threads and processes), entries that are not stored responses, the files store
and its migration, model identity by content, and what requests cost."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import Capabilities, ChatRequest, Completion
from rscaffold.llm.cache import DB_NAME, CachedBackend, RequestCache, RequestStats, StoredCompletion, model_identity


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


def cached(tmp_path: Path, inner: EchoBackend, mode: str = "use", store: str = "sqlite") -> CachedBackend:
    cfg = BackendConfig(backend="openai", model="served-model", base_url="http://127.0.0.1:1/v1")
    return CachedBackend(
        cfg, lambda: inner, capabilities=inner.capabilities, name="openai", cache=RequestCache(tmp_path, mode, store)
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


@pytest.mark.parametrize("store", ["sqlite", "files"])
def test_many_writers_share_one_cache(tmp_path, store):
    inners = [EchoBackend() for _ in range(4)]
    backends = [cached(tmp_path, i, store=store) for i in inners]
    requests = [req(f"r{i}", f"q{i}") for i in range(40)]
    threads = [threading.Thread(target=b.generate, args=(requests, GREEDY)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert RequestCache(tmp_path, store=store).count() == 40 and not list(tmp_path.glob("??/.*.tmp"))
    assert (store == "files") == bool(list(tmp_path.glob("??/*.json")))
    check = cached(tmp_path, EchoBackend(), store=store)
    assert [c.text for c in check.generate(requests, GREEDY)] == [f"q{i}" for i in range(40)]
    assert check.stats.sent == 0


def _write_entries(root: str, first: int, n: int) -> None:
    """One writer process: ``n`` requests through its own cached backend."""
    backend = cached(Path(root), EchoBackend())
    for i in range(first, first + n):  # one request per call: one write (transaction) each
        backend.generate([req(f"r{i}", f"q{i}")], GREEDY)


def test_a_cache_travels_to_another_process_without_its_connections(tmp_path):
    import pickle

    cache = RequestCache(tmp_path)
    cache.put("k" * 64, [Completion("r", text="hi")], {})
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.get("k" * 64)[0]["text"] == "hi"


def test_concurrent_processes_share_one_database(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_entries, args=(str(tmp_path), k * 50, 50)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    check = cached(tmp_path, EchoBackend())
    got = check.generate([req(f"x{i}", f"q{i}") for i in range(150)], GREEDY)
    assert [c.text for c in got] == [f"q{i}" for i in range(150)] and check.stats.sent == 0


def _entries(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)


@pytest.mark.parametrize("store", ["sqlite", "files"])
@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        "[]",
        "null",
        '{"completions": {}}',
        '{"key": {}, "completions": [{"text": "hello", "colour": "blue"}]}',  # a field a completion has not
        '{"key": {}, "completions": [{"text": 7}]}',  # a wrong type
        '{"key": {}, "completions": ["hello"]}',
    ],
    ids=["not-json", "list", "null", "completions-not-a-list", "unknown-field", "wrong-type", "not-a-completion"],
)
def test_an_entry_that_is_not_a_stored_response_is_a_miss_and_is_overwritten(tmp_path, store, damage, caplog):
    inner = EchoBackend()
    a = cached(tmp_path, inner, store=store)
    a.generate([req("x", "hello")], GREEDY)
    if store == "files":
        (where,) = tmp_path.glob("??/*.json")
        where.write_text(damage)
    else:
        with _entries(tmp_path) as db:
            db.execute("UPDATE entries SET entry = ?", (damage,))
        where = tmp_path / DB_NAME
    with caplog.at_level(logging.WARNING, logger="rscaffold.llm.cache"):
        got = a.generate([req("x", "hello")], GREEDY)
    assert [c.text for c in got] == ["hello"] and inner.sent == ["x", "x"]  # asked again
    assert str(where) in caplog.text  # logged with where it is
    b = cached(tmp_path, inner, store=store)
    assert [c.text for c in b.generate([req("x", "hello")], GREEDY)] == ["hello"]
    assert inner.sent == ["x", "x"] and b.stats.from_cache == 1  # overwritten with the new answer


def test_a_stored_completion_is_a_completion_without_its_id_and_error():
    fields = {f.name for f in dataclasses.fields(Completion)} - {"request_id", "error", "error_kind"}
    assert set(StoredCompletion.model_fields) == fields


def test_files_store_entries_are_read_and_migrated(tmp_path):
    inner = EchoBackend()
    old = cached(tmp_path, inner, store="files")  # a cache an earlier version wrote
    old.generate([req(f"r{i}", f"q{i}") for i in range(5)], GREEDY)
    assert len(list(tmp_path.glob("??/*.json"))) == 5 and not (tmp_path / DB_NAME).exists()

    def must_not_build():  # test guard: every answer is in the old files
        raise AssertionError("backend created")

    def new():
        return CachedBackend(
            old.cfg, must_not_build, capabilities=old.capabilities, name="openai", cache=RequestCache(tmp_path)
        )

    assert [c.text for c in new().generate([req("a", "q0"), req("b", "q1")], GREEDY)] == ["q0", "q1"]
    assert RequestCache(tmp_path).count() == 2  # the two read were copied into the database
    assert RequestCache(tmp_path).migrate(remove=True) == 3  # the rest at once
    assert not list(tmp_path.glob("??/*.json")) and RequestCache(tmp_path).count() == 5
    got = new().generate([req(f"r{i}", f"q{i}") for i in range(5)], GREEDY)
    assert [c.text for c in got] == [f"q{i}" for i in range(5)]


def test_keys_are_unchanged(tmp_path):
    """Keys are what earlier versions computed (pinned here), so existing caches keep hitting."""
    cache = RequestCache(tmp_path)
    chat = ChatRequest("x", [{"role": "user", "content": "hello"}])
    text = ChatRequest("x", [], prompt="p", stop=["\n\n"], logprobs=2, options={"allowed_token_ids": [1]})
    sampled = SamplingConfig(max_new_tokens=8, temperature=0.5, seed=3)
    assert cache.key(model="m", request=chat, sampling=GREEDY) == (
        "7472a76f78ee5629d0460274d69d0c52592a4a2ff927fd5bf6a67cde43a95e35"
    )
    assert cache.key(model="m", request=text, sampling=sampled) == (
        "3ff4d8b873c3de18ae78ad009417a19e130e345f36430f506ebb3b302582dd70"
    )


def test_a_database_that_is_not_one_is_set_aside(tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    inner = EchoBackend()
    with caplog.at_level(logging.WARNING, logger="rscaffold.llm.cache"):
        a = cached(tmp_path, inner)
        assert [c.text for c in a.generate([req("x", "hello")], GREEDY)] == ["hello"]
    assert "set aside" in caplog.text and list(tmp_path.glob(f"{DB_NAME}.damaged-*"))
    assert [c.text for c in cached(tmp_path, inner).generate([req("x", "hello")], GREEDY)] == ["hello"]
    assert inner.sent == ["x"]


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
