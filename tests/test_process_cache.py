"""What a worker process keeps across shards (rscaffold.process_cache): one value, made once per
key, replaced (the old one closed first) when anything else is asked for, made anew on other
devices."""

from __future__ import annotations

import pytest

from rscaffold import process_cache


@pytest.fixture(autouse=True)
def empty_cache():
    for slot in ("llm", "evaluation"):
        process_cache.release(slot)
    yield
    for slot in ("llm", "evaluation"):
        process_cache.release(slot)


def test_a_value_is_made_once_per_key_and_the_old_one_closed_before_another_is_made(monkeypatch):
    events: list[str] = []

    def make(name):
        def _make():
            events.append(f"make {name}")
            return name

        return _make

    def close(value):
        events.append(f"close {value}")

    before = process_cache.loads().get("llm", 0)
    assert process_cache.kept("llm", "a", make("A"), close=close) == "A"
    assert process_cache.kept("llm", "a", make("A2"), close=close) == "A"  # kept: not made again
    assert process_cache.loads()["llm"] == before + 1
    assert process_cache.kept("llm", "b", make("B"), close=close) == "B"
    assert process_cache.kept("evaluation", "b", make("E"), close=close) == "E"  # one model per process
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert process_cache.kept("evaluation", "b", make("E1"), close=close) == "E1"  # other devices: made anew
    assert events == ["make A", "close A", "make B", "close B", "make E", "close E", "make E1"]
