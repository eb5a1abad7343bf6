"""``rscaffold doctor``: each check against what it checks. Endpoints against a REAL local
server (``transformers serve`` on a tiny model), which ignores response_format and has no
allowed_token_ids; the passing side of those features against a test fake of a server that
honours them (no such server runs here: vLLM needs a GPU)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import free_port

from rscaffold import doctor
from rscaffold.config import BackendConfig, config_from_dict


def _cfg(tmp_path, **sections):
    return config_from_dict({"run": {"artifacts_dir": str(tmp_path / "artifacts")}, **sections})


def _openai(base_url: str, model: str) -> dict:
    return {"backend": "openai", "base_url": base_url, "model": model, "max_retries": 0}


def _by_name(checks):
    return {c.name: c for c in checks}


def test_a_real_server_passes_reach_and_model_and_fails_structured_output(counted_server, tiny_teacher_dir, tmp_path):
    cfg = _cfg(tmp_path, teacher={"llm": _openai(counted_server.base_url, str(tiny_teacher_dir))})
    checks = _by_name(doctor.check_endpoint(doctor.endpoints(cfg)[0]))
    assert checks["teacher.llm: reachable"].status == "pass"
    assert checks["teacher.llm: model served"].status == "pass"
    structured = checks["teacher.llm: structured output (response_format json_schema)"]
    assert structured.status == "fail" and counted_server.base_url in structured.detail
    assert "response_format" in structured.fix
    assert "teacher.llm: seed" in checks


def test_a_model_the_server_does_not_serve_fails_naming_what_it_serves(counted_server, tiny_teacher_dir, tmp_path):
    cfg = _cfg(tmp_path, teacher={"llm": _openai(counted_server.base_url, "no-such-model")})
    checks = _by_name(doctor.check_endpoint(doctor.endpoints(cfg)[0]))
    served = checks["teacher.llm: model served"]
    assert served.status == "fail" and str(tiny_teacher_dir) in served.detail


def test_a_real_server_without_guided_decoding_features_fails_them(counted_server, tiny_teacher_dir, tmp_path):
    llm = BackendConfig(**_openai(counted_server.base_url, str(tiny_teacher_dir)))
    ep = doctor.Endpoint("evaluation.llm", llm, frozenset({"allowed_token_ids"}))
    (_, _, allowed) = doctor.check_endpoint(ep)
    assert allowed.status == "fail" and "vLLM" in allowed.fix


def test_an_unreachable_endpoint_fails_naming_its_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = _cfg(tmp_path, teacher={"llm": _openai(url, "m")})
    (check,) = doctor.check_endpoint(doctor.endpoints(cfg)[0])
    assert check.status == "fail" and url in check.detail and "base_url" in check.fix


def test_a_server_that_accepts_connections_but_never_answers_fails_quickly(tmp_path, monkeypatch):
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel accepts connections; nothing ever answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        monkeypatch.setattr(doctor, "REACHABLE_TIMEOUT_S", 1.0)
        cfg = _cfg(tmp_path, teacher={"llm": _openai(url, "m")})
        started = time.monotonic()
        (check,) = doctor.check_endpoint(doctor.endpoints(cfg)[0])
        assert check.status == "fail" and "Timeout" in check.detail
        assert time.monotonic() - started < 10
    finally:
        listener.close()


class HonouringFakeServer:
    """Test fake of an OpenAI-compatible server that honours response_format, seed, logprobs and
    allowed_token_ids (answers the probes as vLLM would)."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
                if self.path.endswith("/chat/completions"):
                    text = '{"answer": 5}' if body.get("response_format") else f"seeded {body.get('seed')}"
                    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                    return self._send(
                        {
                            "id": "c",
                            "object": "chat.completion",
                            "created": 0,
                            "model": "m",
                            "choices": [choice],
                            "usage": usage,
                        }
                    )
                allowed = (body.get("allowed_token_ids") or [None])[0]
                tokens = ["x"] * 4 if allowed is not None else ["a", "b", "c", "d"]
                logprobs = {
                    "tokens": tokens,
                    "token_logprobs": [-0.1] * 4,
                    "top_logprobs": [{t: -0.1} for t in tokens],
                    "text_offset": [0, 1, 2, 3],
                }
                choice = {"index": 0, "finish_reason": "length", "text": "".join(tokens), "logprobs": logprobs}
                self._send(
                    {
                        "id": "c",
                        "object": "text_completion",
                        "created": 0,
                        "model": "m",
                        "choices": [choice],
                        "usage": usage,
                    }
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def honouring():
    server = HonouringFakeServer()
    yield server
    server.close()


def test_every_feature_check_passes_on_a_server_that_honours_it(honouring):
    llm = BackendConfig(**_openai(honouring.base_url, "m"))
    ep = doctor.Endpoint("x", llm, frozenset({"structured_output", "seed", "logprobs", "allowed_token_ids"}))
    checks = doctor.check_endpoint(ep)
    assert [c.status for c in checks] == ["pass"] * 6, doctor.format_checks(checks)


def test_the_stages_decide_which_features_an_endpoint_is_checked_for(honouring, tmp_path):
    cfg = _cfg(
        tmp_path,
        teacher={"llm": _openai(honouring.base_url, "m")},
        evaluation={"llm": _openai(honouring.base_url, "m")},
    )
    eps = {ep.role: ep.needs for ep in doctor.endpoints(cfg)}
    assert eps == {
        "teacher.llm": {"seed", "structured_output"},  # the teacher's endpoint labels too
        "evaluation.llm": {"logprobs", "allowed_token_ids"},  # the scaffolded student decodes guided there
    }


def test_vllm_is_checked_only_where_configured(tmp_path, monkeypatch):
    import importlib.util

    assert doctor.check_vllm(_cfg(tmp_path)) == []
    cfg = _cfg(tmp_path, teacher={"llm": {"backend": "vllm"}})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    (check,) = doctor.check_vllm(cfg)
    assert check.status == "fail" and "teacher.llm" in check.detail and "rscaffold[vllm]" in check.fix


class _Cuda:
    """Test stand-in for ``torch.cuda`` (this machine has no GPU)."""

    def __init__(self, gpus):
        self.gpus = gpus

    def is_available(self):
        return bool(self.gpus)

    def device_count(self):
        return len(self.gpus)

    def mem_get_info(self, i):
        return self.gpus[i][1], self.gpus[i][2]

    def get_device_name(self, i):
        return self.gpus[i][0]


def test_gpu_check_reports_memory_or_warns_without_one(tmp_path):
    cfg = _cfg(tmp_path)
    (none,) = doctor.check_gpu(cfg, device=_Cuda([]))
    assert none.status == "warn" and "training" in none.detail
    (one,) = doctor.check_gpu(cfg, device=_Cuda([("H200", 100 * 2**30, 140 * 2**30)]))
    assert one.status == "pass" and "H200" in one.detail and "100.0 of 140.0 GiB" in one.detail


def test_disk_check_fails_when_the_estimate_does_not_fit(tmp_path):
    cfg = _cfg(tmp_path)
    assert doctor.check_disk(cfg, need=1)[0].status == "pass"
    (check,) = doctor.check_disk(cfg, need=1 << 60)
    assert check.status == "fail" and "artifacts_dir" in check.fix
    assert doctor.estimate_output_bytes(cfg) > 0


def test_prefect_api_check(monkeypatch):
    from rscaffold_flows.ephemeral_server import check_prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert check_prefect_api() is None
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    check = check_prefect_api(timeout_s=2)
    assert check.status == "fail" and url in check.detail and "prefect server start" in check.fix


def test_doctor_command_exits_1_when_a_check_fails(tmp_path):
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    url = f"http://127.0.0.1:{free_port()}/v1"
    sets = [
        "--set",
        "teacher.llm.backend=openai",
        "--set",
        f"teacher.llm.base_url={url}",
        "--set",
        "teacher.llm.model=m",
    ]
    result = CliRunner().invoke(app, ["doctor", "--artifacts-dir", str(tmp_path), *sets])
    assert result.exit_code == 1, result.output
    assert f"FAIL  teacher.llm: reachable: {url}" in result.output and "fix: start the server" in result.output


def test_run_warns_of_local_problems_before_it_starts(tmp_path, monkeypatch):
    import rscaffold_flows.ephemeral_server
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    def stop(*a, **k):  # test guard: the warning comes before the flow starts, which is not needed here
        raise SystemExit(0)

    monkeypatch.setattr(rscaffold_flows.ephemeral_server, "prefect_api", stop)
    monkeypatch.setattr(doctor, "estimate_output_bytes", lambda cfg: 1 << 60)
    result = CliRunner().invoke(app, ["run", "--artifacts-dir", str(tmp_path)])
    assert "warning: FAIL disk space" in " ".join(result.output.split())
