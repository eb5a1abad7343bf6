"""math_verify in its helper process (rscaffold.evalsets.verify_worker): safe from worker threads,
a hard timeout that restarts the helper, and the in-process fallback when it cannot start."""

from __future__ import annotations

import threading
import time

import pytest

from rscaffold.evalsets import verify_worker
from rscaffold.evalsets.answers import is_correct


def test_math_verify_in_a_worker_thread() -> None:
    """Prefect runs tasks in worker threads, where signal-based timeouts raise ValueError."""
    results: dict[int, list[object]] = {}

    def work(k: int) -> None:
        out = results.setdefault(k, [])
        try:
            out.append(is_correct("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", "math"))
            out.append(is_correct("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", "math"))
            out.append(is_correct("\\frac{1}{3}", "\\frac{1}{2}", "math"))
        except Exception as err:  # noqa: BLE001 - surfaced in the assertion
            out.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {k: [True, True, False] for k in range(3)}


def test_math_verify_hard_timeout_recovers() -> None:
    """A pathological answer (a huge power tower) is cut off and counted wrong, without hanging."""
    restarts = verify_worker._WORKER.restarts
    start = time.perf_counter()
    assert not is_correct("9^{9^{9^{9}}}", "5", "math", timeout_s=0.5)
    assert time.perf_counter() - start < 30
    assert verify_worker._WORKER.restarts == restarts + 1  # the stuck helper was killed
    # the helper process is usable again afterwards
    assert is_correct("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", "math")


def test_math_verify_falls_back_in_process_when_the_helper_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = verify_worker._MathVerifyWorker()

    def cannot_start() -> None:
        raise OSError("no subprocesses here")

    monkeypatch.setattr(worker, "_start", cannot_start)
    monkeypatch.setattr(verify_worker, "_WORKER", worker)
    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(is_correct("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", "math"))
    )
    thread.start()
    thread.join(timeout=60)
    assert results == [True]
    assert worker._broken is not None and "no subprocesses here" in worker._broken
