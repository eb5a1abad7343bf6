"""rscaffold.serving: the student server's life (start, failure, timeout, stop), the config that
selects it, and splitting served text into steps as in-process decoding does."""

from __future__ import annotations

import sys

import pytest

from rscaffold.config import config_from_dict
from rscaffold.decoding.output import split_signals
from rscaffold.serving import StudentServer, StudentServerError


def _server(tmp_path, command: str, **kw) -> StudentServer:
    return StudentServer(command, model_dir=tmp_path, model="m", log_path=tmp_path / "server.log", **kw)


def test_a_server_that_exits_fails_with_its_log(tmp_path):
    s = _server(tmp_path, f"{sys.executable} -c \"import sys; print('no GPU here'); sys.exit(3)\"")
    with pytest.raises(StudentServerError, match=r"exited with 3(.|\n)*no GPU here"):
        s.start()


def test_a_server_that_never_answers_is_stopped(tmp_path):
    # a real HTTP server, but not an OpenAI-compatible one: /health and /v1/models are 404
    s = _server(tmp_path, f"{sys.executable} -m http.server {{port}} --bind {{host}}", startup_timeout_s=2)
    with pytest.raises(StudentServerError, match="did not answer within 2s"):
        s.start()
    assert s.proc is None  # stopped and reaped


def test_command_placeholders(tmp_path):
    s = _server(tmp_path, "serve {model_dir} --port {port} --host {host} --name {model}", port=8123)
    assert s.argv == ["serve", str(tmp_path), "--port", "8123", "--host", "127.0.0.1", "--name", "m"]
    assert s.base_url == "http://127.0.0.1:8123/v1"
    with pytest.raises(ValueError, match=r"\{model_dir\}, \{port\}"):
        _server(tmp_path, "serve {weights}")


def test_config_selects_the_served_students():
    cfg = config_from_dict({"evaluation": {"server": {"command": "vllm serve {model_dir} --port {port}"}}})
    assert cfg.evaluation.served_llm().backend == "openai" and cfg.evaluation.is_served("scaffolded")
    cfg = config_from_dict(
        {
            "evaluation": {
                "llm": {"backend": "openai", "model": "rs-{student}", "base_url": "http://127.0.0.1:8000/v1"},
                "served_students": ["cot_sft"],
            }
        }
    )
    assert cfg.evaluation.is_served("cot_sft") and not cfg.evaluation.is_served("scaffolded")
    assert not config_from_dict({}).evaluation.is_served("base")
    with pytest.raises(ValueError, match="vllm serve"):
        config_from_dict({"evaluation": {"llm": {"backend": "vllm"}}})
    with pytest.raises(ValueError, match="needs evaluation.llm.backend 'openai'"):
        config_from_dict({"evaluation": {"llm": {"backend": "transformers"}, "server": {"command": "x"}}})


def test_split_signals_equals_split_output_on_the_ids(random_student):
    from rscaffold.decoding.output import split_output

    s = random_student
    tok = s.tokenizer
    text_ids = tok("First we add.\n\nThen  we check\n \nit. Done", add_special_tokens=False)["input_ids"]
    a, b = s.signal_token_ids[0], s.signal_token_ids[2]
    ids = [*text_ids[:3], a, *text_ids[3:9], b, *text_ids[9:], a]
    expected = split_output(ids, tok, dict(zip(s.signal_token_ids, s.signal_names)))
    got = split_signals(tok.decode(ids, skip_special_tokens=False), dict(zip(s.signal_tokens, s.signal_names)))
    assert got == expected
    # the signals are found, not just the text (the last one opens an empty step: none)
    assert [x for x in got[1] if x] == [s.signal_names[0], s.signal_names[2]]


def test_a_server_that_adds_a_bos_sees_the_in_process_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    from rscaffold.decoding.served import without_added_bos
    from rscaffold.prompts import render_prompt

    for add_bos in (False, True):  # SmolLM2 as it is; as a tokenizer that adds its BOS (Llama 3, Gemma)
        tok = AutoTokenizer.from_pretrained(str(smollm2_dir), add_bos_token=add_bos)
        prompt = render_prompt("What is 2 + 2?", tok)
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        leading_bos = next(i for i, t in enumerate(ids) if t != tok.bos_token_id)
        assert leading_bos == 1 + add_bos  # the template's BOS, and the tokenizer's own
        served = tok(without_added_bos(prompt, tok), add_special_tokens=True)["input_ids"]  # as the server does
        assert served == tok(prompt, add_special_tokens=False)["input_ids"]  # as in-process decoding does


HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

STARTER = """
import sys, time
from rscaffold.serving import StudentServer
s = StudentServer(sys.argv[1], model_dir=".", model="m", log_path=sys.argv[2]).start()
print(s.proc.pid, s.port, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()  # a zombie: dead, not yet reaped by init
    except FileNotFoundError:
        return True


def test_a_killed_evaluation_leaves_no_server_behind(tmp_path):
    import subprocess
    import time
    import urllib.request

    (tmp_path / "health.py").write_text(HEALTH_SERVER)
    command = f"{sys.executable} {tmp_path / 'health.py'} {{port}}"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, command, str(tmp_path / "server.log")], stdout=subprocess.PIPE, text=True
    )
    try:
        supervisor, port = map(int, starter.stdout.readline().split())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        starter.kill()  # SIGKILL: no finally, no atexit in the evaluation
        starter.wait()
    deadline = time.monotonic() + 20
    while not _gone(supervisor) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(supervisor)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    assert "is gone; stopping the student server" in (tmp_path / "server.log").read_text()


def test_a_missing_server_binary_is_named(tmp_path):
    with pytest.raises(StudentServerError, match="'no-such-server' is not an executable on PATH"):
        _server(tmp_path, "no-such-server {model_dir}").start()


def test_a_port_in_use_is_refused(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        s = _server(tmp_path, f"{sys.executable} -c pass", port=busy.getsockname()[1])
        with pytest.raises(StudentServerError, match="is in use"):
            s.start()  # whatever answers there must not be taken for this student's server
        assert s.proc is None


def test_stop_ends_the_group_even_when_the_supervisor_died(tmp_path):
    import os
    import urllib.request

    (tmp_path / "health.py").write_text(HEALTH_SERVER)
    s = _server(tmp_path, f"{sys.executable} {tmp_path / 'health.py'} {{port}}").start()
    group = s.proc.pid
    s.proc.kill()  # the supervisor alone: the server runs on
    s.proc.wait()
    with urllib.request.urlopen(f"{s.root}/health", timeout=5) as r:
        assert r.status == 200
    s.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_placeholders_and_endpoint_are_checked_when_the_config_loads():
    with pytest.raises(ValueError, match=r"KeyError\('foo'\).*literal brace as \{\{"):
        config_from_dict({"evaluation": {"server": {"command": "vllm serve {model_dir} --x {foo}"}}})
    literal = 'vllm serve {model_dir} --compilation-config {{"level": 3}}'
    assert config_from_dict({"evaluation": {"server": {"command": literal}}})
    with pytest.raises(ValueError, match=r"evaluation.llm.model '\{nope\}'"):
        config_from_dict({"evaluation": {"llm": {"backend": "openai", "model": "{nope}", "base_url": "http://h/v1"}}})
    with pytest.raises(ValueError, match="needs base_url"):
        config_from_dict({"evaluation": {"llm": {"backend": "openai", "model": "{student}"}}})
