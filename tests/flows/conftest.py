"""Fixtures of the orchestration tests: a real Prefect server."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from helpers import BIN_DIR, Server, free_port, log_tail, stop_process, unavailable


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `prefect server start` subprocess (SQLite under a temporary PREFECT_HOME), one per test
    module that uses it, always stopped. If it cannot start here, the tests are skipped with the
    server's log as the reason; under CI (`CI` set) they fail instead."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN_DIR / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                unavailable(f"`prefect server start` exited with {proc.returncode}:\n{log_tail(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                unavailable(f"`prefect server start` not healthy after 120 s:\n{log_tail(log)}")
            time.sleep(0.5)
        yield Server(url, home, env)
    finally:
        stop_process(proc)
