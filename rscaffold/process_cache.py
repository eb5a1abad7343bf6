"""What a worker process keeps across the shards it serves: a loaded model, an engine, a running
student server.

A worker of a fanned-out stage (``run.task_runner: ray``) runs shard after shard; loading the model
(and starting a vLLM engine or a server) for each would cost more than the shard itself. The
process holds one value, in a named *slot* (``"llm"``: a teacher or labeler backend,
``"evaluation"``: the evaluation's decoder with its student or server), made on first use and
handed to every later caller asking for the same slot and key. A caller asking for anything else
(another model, another stage, another run) replaces it: the old value is closed first, so a
worker never holds two models on its device. What is held is closed when the process exits.
(Closing a vLLM engine in-process does not give back all of its GPU memory; a worker moving from
one vLLM model to another relies on what it does give back.)

The key includes ``CUDA_VISIBLE_DEVICES``: a worker given other devices (Ray sets it per task)
loads anew rather than keep using a model on devices it no longer holds.

:func:`loads` counts the values made per slot in this process (shard results report it: one load
per worker, however many shards it serves).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_HELD: dict[str, tuple[str, Any, Callable[[Any], None] | None]] = {}
_LOADS: Counter[str] = Counter()
_LOCK = threading.RLock()


def kept(slot: str, key: str, make: Callable[[], T], *, close: Callable[[T], None] | None = None) -> T:
    """The value of ``slot`` for ``key``: made by ``make()`` the first time (closing, with its own
    ``close``, what the slot held for another key), the same object afterwards."""
    full = f"{key}|devices={os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    with _LOCK:
        held = _HELD.get(slot)
        if held is not None and held[0] == full:
            return held[1]
        for other in list(_HELD):  # one model per process: whatever is held goes first
            _close(other, _HELD.pop(other))
        value = make()
        _LOADS[slot] += 1
        _HELD[slot] = (full, value, close)
        return value


def release(slot: str) -> None:
    """Close and forget what ``slot`` holds (if anything)."""
    with _LOCK:
        held = _HELD.pop(slot, None)
        if held is not None:
            _close(slot, held)


def count(what: str) -> None:
    """Count one load of ``what`` made outside :func:`kept` (e.g. a student loaded by a kept value)."""
    with _LOCK:
        _LOADS[what] += 1


def loads() -> dict[str, int]:
    """How many values each slot has made in this process."""
    with _LOCK:
        return dict(_LOADS)


def _close(slot: str, held: tuple[str, Any, Callable[[Any], None] | None]) -> None:
    _, value, close = held
    if close is None:
        return
    try:
        close(value)
    except Exception as err:  # noqa: BLE001 - closing must not hide the work that follows
        log.warning("closing the %s kept by this process failed: %s", slot, err)


@atexit.register
def _release_all() -> None:
    for slot in list(_HELD):
        release(slot)
