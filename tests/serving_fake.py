"""TEST-ONLY fake of vLLM's OpenAI-compatible ``/v1/completions`` dialect, over an in-process
transformers causal LM (vLLM itself cannot run in the test environment).

:class:`FakeVLLMServer` serves ``POST /v1/completions`` (plus ``GET /health`` and
``GET /v1/models``) on 127.0.0.1 with the semantics :mod:`rscaffold.decoding.served` relies on, greedy
decoding only (the request's temperature and seed are ignored):

* the prompt is tokenized with ``add_special_tokens`` as requested (default True);
* per output token: the last position's logits, plus ``logit_bias`` (token id as a string ->
  bias, clamped to [-100, 100] as vLLM does), then everything outside ``allowed_token_ids`` (when given) set to -inf; ``logprobs``
  are the log-softmax of these *processed* logits (vLLM with ``--logprobs-mode
  processed_logprobs``), the top ``logprobs`` of them (and the chosen token, as vLLM adds it) as
  ``{tokenizer.decode([id], skip_special_tokens=False): logprob}``; the token is the argmax;
* stopping, checked in vLLM's order after each token: eos (``finish_reason`` "stop",
  ``stop_reason`` None), a ``stop_token_ids`` token (``stop_reason`` = its id), a ``stop``
  string in the decoded output (``tokenizer.decode(output, skip_special_tokens=...)``, default
  True; ``stop_reason`` = the string, the text cut before it), then ``max_tokens``
  (``finish_reason`` "length"). The eos / stop token counts in ``completion_tokens`` but is not
  part of the text.

Unknown request fields are accepted and ignored. Requests are decoded one at a time (a lock
around the model), one token per forward pass on the model's KV cache.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeVLLMServer:
    """A fake of vLLM's completions dialect hosting ``model`` / ``tokenizer`` (see the module doc).

    ``base_url``: the OpenAI-compatible endpoint (``http://127.0.0.1:PORT/v1``). ``requests``:
    completion requests answered so far; ``bodies`` / ``answers``: their JSON bodies and the
    answers given. ``omit_logprobs``: answer
    every request with ``"logprobs": null`` (a server without log-probabilities, like
    ``transformers serve`` or llama.cpp). :meth:`shutdown` stops it.
    """

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str = "student", omit_logprobs: bool = False):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.omit_logprobs = omit_logprobs
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/health":
                    return self._send(200, {})
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                return self._send(404, {"error": {"message": f"no route {self.path}", "code": 404}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                if self.path.rstrip("/") != "/v1/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "code": 404}})
                try:
                    payload = server.complete(body)
                except (KeyError, TypeError, ValueError) as err:
                    return self._send(400, {"error": {"message": f"bad request: {err!r}", "code": 400}})
                return self._send(200, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- one completion --------------------------------------------------------------------------
    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.requests += 1
            self.bodies.append(body)
            answer = self._complete(body)
            self.answers.append(answer)
            return answer

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        import torch
        from transformers import DynamicCache

        from rscaffold.kv_cache import cache_argument

        tok = self.tokenizer
        prompt = body["prompt"]
        if isinstance(prompt, list):
            (prompt,) = prompt
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        max_tokens = int(body["max_tokens"]) if body.get("max_tokens") is not None else 16
        n_logprobs = body.get("logprobs")
        allowed = body.get("allowed_token_ids")
        stop_ids = {int(i) for i in body.get("stop_token_ids") or []}
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else list(stop)
        skip_special = body.get("skip_special_tokens", True)
        # vLLM clamps each bias to [-100, 100]
        bias = {int(k): max(-100.0, min(100.0, float(v))) for k, v in (body.get("logit_bias") or {}).items()}
        prompt_ids = tok(prompt, add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        eos = tok.eos_token_id

        generated: list[int] = []  # every output token (eos / stop token included)
        tokens, token_logprobs, top_logprobs = [], [], []
        text, finish, stop_reason = "", "length", None
        dev = next(self.model.parameters()).device
        cache = {cache_argument(self.model): DynamicCache()}  # filled in place by each forward pass
        feed = prompt_ids
        with torch.no_grad():
            for _ in range(max_tokens):
                out = self.model(input_ids=torch.tensor([feed], device=dev), use_cache=True, **cache)
                logits = out.logits[0, -1].float().clone()
                for i, b in bias.items():
                    logits[i] += b
                if allowed:
                    mask = torch.full_like(logits, float("-inf"))
                    mask[list(allowed)] = 0.0
                    logits = logits + mask
                t = int(torch.argmax(logits))
                generated.append(t)
                feed = [t]
                if n_logprobs is not None:
                    lp = torch.log_softmax(logits, dim=-1)
                    k = min(int(n_logprobs), lp.shape[0])
                    top = {}
                    for v, i in zip(*torch.topk(lp, k)):
                        top.setdefault(tok.decode([int(i)], skip_special_tokens=False), float(v))
                    top.setdefault(tok.decode([t], skip_special_tokens=False), float(lp[t]))
                    tokens.append(tok.decode([t], skip_special_tokens=False))
                    token_logprobs.append(float(lp[t]))
                    top_logprobs.append(top)
                if t == eos:
                    finish = "stop"
                    text = tok.decode(generated[:-1], skip_special_tokens=skip_special)
                    break
                if t in stop_ids:
                    finish, stop_reason = "stop", t
                    text = tok.decode(generated[:-1], skip_special_tokens=skip_special)
                    break
                text = tok.decode(generated, skip_special_tokens=skip_special)
                hit = next((s for s in stops if s and s in text), None)
                if hit is not None:
                    finish, stop_reason = "stop", hit
                    text = text[: text.index(hit)]
                    break
        logprobs = None
        if n_logprobs is not None and not self.omit_logprobs:
            offsets, pos = [], len(prompt)
            for t_text in tokens:
                offsets.append(pos)
                pos += len(t_text)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": offsets,
            }
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model", self.model_name),
            "choices": [
                {"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop_reason, "logprobs": logprobs}
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(generated),
                "total_tokens": len(prompt_ids) + len(generated),
            },
        }


@contextlib.contextmanager
def fake_vllm_server(model: Any, tokenizer: Any, **kw: Any) -> Iterator[FakeVLLMServer]:
    """A running :class:`FakeVLLMServer` (its ``base_url``, ``requests``, ``bodies``), shut down
    on exit."""
    server = FakeVLLMServer(model, tokenizer, **kw)
    try:
        yield server
    finally:
        server.shutdown()
