"""A real OpenAI-compatible server for tests, and a counting, switchable HTTP proxy in front of it.

``transformers serve`` (the real server, from ``transformers[serving]``) hosts a model directory
on 127.0.0.1. :class:`CountingProxy` forwards every HTTP request to it unchanged and counts the
chat-completion requests that reach the model, which is how the tests check that a re-run sends
no request that was answered before. ``proxy.down()`` closes its port (clients get "connection
refused", as from a dead endpoint) and ``proxy.up()`` opens it again on the same port.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

SERVER_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_available() -> str | None:
    """None when `transformers serve` can run here, else why not."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return "this transformers has no `transformers serve`"
    if not is_serve_available():
        return "`transformers serve` needs the serving extra: pip install 'transformers[serving]'"
    return None


@contextmanager
def transformers_serve(model_dir: Path, log_path: Path) -> Iterator[str]:
    """``transformers serve <model_dir>`` as a subprocess on a free port; yields its base URL
    (``http://127.0.0.1:<port>``) once ``/health`` answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-c", "from transformers.cli.transformers import app; app()",
        "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
    ]  # fmt: skip
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve not ready after {SERVER_START_TIMEOUT_S}s")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and counts chat completions."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self.port = free_port()
        self.chat_requests = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self.up()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self) -> int:
        """The count so far, and start counting again from 0."""
        with self._lock:
            n, self.chat_requests = self.chat_requests, 0
        return n

    def up(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.endswith("/chat/completions"):
                    with proxy._lock:
                        proxy.chat_requests += 1
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _forward

        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="counting-proxy").start()

    def down(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def close(self) -> None:
        self.down()
