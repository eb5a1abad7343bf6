"""Plain helpers shared by the tests: builders, sample data and test fakes (fixtures live in the
conftest.py files).

Imported as ``from helpers import ...`` (pyproject puts tests/ on pytest's pythonpath). Heavy
libraries (torch, transformers, prefect) are imported inside the functions that need them, so
importing this module stays cheap.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rscaffold.llm.base import ChatRequest

# ---------------------------------------------------------------------------------------------
# LLM backends: requests, a free port, a fake OpenAI-compatible server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_request(rid: str, question: str, n: int = 1, schema=None) -> ChatRequest:
    """A chat request with a short system prompt and one user message."""
    return ChatRequest(
        rid,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
        n=n,
        json_schema=schema,
    )


class FakeOpenAIServer:
    """Test fake of an OpenAI-compatible server: answers /v1/chat/completions from a queue of
    scripted actions (HTTP errors, dropped connections, malformed bodies, custom messages), then
    with an echo of the last user message. Records every request body it receives."""

    def __init__(self):
        self.actions: deque = deque()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.reject_if = None  # body -> (status, message) | None, checked on every request
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, payload, extra_headers=()):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in extra_headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                server.bodies.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                action = server.actions.popleft() if server.actions else None
                if action is None and server.reject_if:
                    rejected = server.reject_if(body)
                    if rejected:
                        action = ("status",) + rejected
                if action is None:
                    n = body.get("n", 1)
                    last = body["messages"][-1]["content"]
                    return self._send(200, completion_body([{"content": f"echo: {last} #{i}"} for i in range(n)]))
                kind = action[0]
                if kind == "status":
                    status, message = action[1], action[2] if len(action) > 2 else "scripted failure"
                    return self._send(
                        status, {"error": {"message": message, "type": "x", "code": status}}, [("retry-after-ms", "1")]
                    )
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if kind == "raw":
                    return self._send(200, action[1])
                if kind == "messages":
                    return self._send(200, completion_body(action[1]))
                raise AssertionError(action)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion_body(messages: list[dict], finish="stop") -> dict:
    """The JSON body of an OpenAI chat completion with one choice per message."""
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", **m},
                "finish_reason": m.pop("finish_reason", finish) if "finish_reason" in m else finish,
            }
            for i, m in enumerate(messages)
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4 * len(messages), "total_tokens": 3 + 4 * len(messages)},
    }
