"""math_verify, isolated in a helper process.

math_verify's own timeouts use ``signal.alarm``, which raises ``ValueError`` outside the main
thread (Prefect runs tasks in worker threads), and which would also cancel any other SIGALRM timer
of the process (pytest-timeout, for one). Without a timeout, however, sympy can hang for good on an
answer such as ``9^{9^{9}}``. So math_verify runs in a small helper process (this file, started as
a script with ``sys.executable``), where its signal timeouts are safe because they run in that
process's main thread; the calling side enforces a hard deadline and kills and restarts the helper
when it is exceeded. Calls are serialised by a lock, so :func:`is_correct` is safe from any thread.
Plain numbers and identical strings never reach math_verify. If the helper cannot be started,
math_verify runs in-process with its timeouts disabled (and a warning is logged once).

This module must stay importable without the rest of rscaffold (it is the helper's entry point).
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


def _as_latex(s: str) -> str:
    s = s.strip()
    if "\\boxed" in s or (s.startswith("$") and s.endswith("$") and len(s) > 1):
        return s
    return f"${s}$"


def _verify_direct(gold: str, predicted: str, timeout: int | None) -> bool | None:
    """math_verify on two answers; ``None`` when it can parse neither of them to a comparable value.

    ``timeout`` (seconds) uses math_verify's signal alarm and is only valid in a main thread.
    """
    from math_verify import parse, verify

    g = parse(_as_latex(gold), parsing_timeout=timeout)
    p = parse(_as_latex(predicted), parsing_timeout=timeout)
    if not g or not p:
        return None
    return bool(verify(g, p, timeout_seconds=timeout))


class _NoTimeoutWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


class _MathVerifyWorker:
    """One helper process running math_verify; requests are serialised by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._broken: str | None = None  # why the helper cannot be used (fall back in-process)
        self.restarts = 0

    # -- process management ---------------------------------------------------------------
    def _start(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--math-verify-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            encoding="utf-8",
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: IO[str]) -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, args=(proc.stdout,), daemon=True, name="math-verify-reader").start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            first = None
        msg = json.loads(first) if first else {"error": "no answer from the helper process"}
        if not msg.get("ready"):
            self._kill(proc)
            raise RuntimeError(str(msg.get("error")))
        self._proc, self._lines = proc, lines

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        try:
            proc.kill()
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - best effort
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None

    # -- requests --------------------------------------------------------------------------
    def compare(self, gold: str, predicted: str, timeout_s: float) -> bool | None:
        with self._lock:
            if self._broken is None and self._proc is None:
                try:
                    self._start()
                except Exception as err:  # noqa: BLE001
                    self._broken = f"{type(err).__name__}: {err}"
                    for name in ("math_verify.parser", "math_verify.grader"):
                        logging.getLogger(name).addFilter(_NoTimeoutWarningFilter())
                    logger.warning(
                        "cannot start the math_verify helper process (%s); running math_verify "
                        "in-process without timeouts",
                        self._broken,
                    )
            if self._broken is not None:
                return _verify_direct(gold, predicted, None)
            return self._request(gold, predicted, timeout_s)

    def _request(self, gold: str, predicted: str, timeout_s: float) -> bool | None:
        assert self._proc is not None and self._proc.stdin is not None
        inner = max(1, int(timeout_s / 2))  # math_verify's own per-operation limit, in the helper
        try:
            self._proc.stdin.write(json.dumps({"gold": gold, "pred": predicted, "timeout": inner}) + "\n")
            self._proc.stdin.flush()
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            logger.warning(
                "math_verify took longer than %.1fs on %r vs gold %r; counted as incorrect",
                timeout_s,
                predicted[:80],
                gold[:80],
            )
            self._restart()
            return False
        except (BrokenPipeError, OSError):
            line = None
        if line is None:  # the helper died: restart it and count this one as unparseable
            logger.warning("the math_verify helper process exited; restarting it")
            self._restart()
            return None
        result = json.loads(line).get("result")
        return None if result is None else bool(result)

    def _restart(self) -> None:
        if self._proc is not None:
            self._kill(self._proc)
        self._proc = None
        self.restarts += 1


_WORKER = _MathVerifyWorker()
atexit.register(_WORKER.close)


def compare(gold: str, predicted: str, timeout_s: float) -> bool | None:
    """math_verify's verdict on two answers (None: neither parses), within about ``timeout_s``."""
    return _WORKER.compare(gold, predicted, timeout_s)


def _worker_main() -> None:
    """The helper process: JSON requests on stdin, one JSON answer line each on stdout."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    logging.basicConfig(level=logging.ERROR)
    out = sys.stdout
    try:
        import math_verify  # noqa: F401
    except Exception as err:  # noqa: BLE001
        out.write(json.dumps({"error": f"cannot import math_verify: {err}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        result: Any
        try:
            req = json.loads(line)
            result = _verify_direct(req["gold"], req["pred"], req.get("timeout"))
        except Exception:  # noqa: BLE001 - an unparseable pair is not a crash
            result = None
        out.write(json.dumps({"result": result}) + "\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--math-verify-worker"]:
    _worker_main()
