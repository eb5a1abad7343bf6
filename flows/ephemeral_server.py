"""The temporary Prefect server of a command-line run, which dies with the run.

Without ``PREFECT_API_URL``, Prefect starts a temporary server in a subprocess and stops it at
exit; a run killed with ``kill -9`` never gets there, and the server is left running. ``rscaffold
run`` / ``rscaffold stage`` therefore start that same server (Prefect's app under uvicorn, as
Prefect does) themselves, as ``python -m rscaffold_flows.ephemeral_server``, whose first act is to
ask the kernel to end it when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere it checks
its parent every second and exits when it is gone).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from rscaffold.lifeline import die_with_parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rscaffold_flows.ephemeral_server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    die_with_parent(args.parent, signal.SIGTERM, exit_code=0)
    os.environ.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
    # A server that lives for one run sends no usage analytics (on a machine without internet each
    # attempt logs "Failed to send telemetry"); a user who wants them sets the variable to 1.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "0")
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued to the server before it stops (as Prefect does at
    exit for its own temporary server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=5)


TIMEOUT_ENV = "RSCAFFOLD_SERVER_START_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0


def start_timeout_s(configured: float | None = None) -> float:
    """The server's start deadline: ``run.server_start_timeout_s``, else ``$RSCAFFOLD_SERVER_START_TIMEOUT_S``,
    else 120 s."""
    if configured is not None:
        return float(configured)
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


@contextlib.contextmanager
def prefect_api(timeout_s: float | None = None, meanwhile: Callable[[], object] | None = None) -> Iterator[str | None]:
    """The Prefect API the run talks to: ``PREFECT_API_URL`` when set, else a temporary server
    started here that dies with this process. Yields the API URL (None: the configured one).

    ``timeout_s``: how long to wait for the server to answer (:func:`start_timeout_s`);
    ``meanwhile``: work to do while the server starts (e.g. checking the config and planning the
    stages), called before waiting for it; what it raises stops the server and propagates.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        if meanwhile is not None:
            meanwhile()
        yield None
        return
    timeout_s = start_timeout_s(timeout_s)
    port = _free_port()
    cmd = [sys.executable, "-m", "rscaffold_flows.ephemeral_server", "--port", str(port), "--parent", str(os.getpid())]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout_s
        if meanwhile is not None:
            meanwhile()
        with httpx.Client(timeout=2.0) as client:  # one connection pool for every poll
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode}")
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the temporary Prefect server did not answer within {timeout_s:.0f} s "
                        f"(raise run.server_start_timeout_s or ${TIMEOUT_ENV} on a busy machine)"
                    )
                time.sleep(0.2)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_prefect_api(timeout_s: float = 10.0):
    """The doctor's check of the Prefect API a run will use: ``PREFECT_API_URL``'s ``/health``
    when it is set (a :class:`rscaffold.doctor.Check`); None without it (runs start a temporary
    server of their own)."""
    import urllib.error
    import urllib.request

    from rscaffold.doctor import Check

    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        return None
    fix = "start it (`prefect server start`), or unset PREFECT_API_URL to let each run start a temporary server"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as r:
            if r.status == 200:
                return Check("Prefect API", "pass", f"{url} answers")
            return Check("Prefect API", "fail", f"{url}/health answered HTTP {r.status}", fix)
    except (OSError, urllib.error.URLError) as err:
        return Check("Prefect API", "fail", f"{url}: {err}", fix)


if __name__ == "__main__":
    main()
