"""Plain helpers shared by the tests: builders, sample data and test fakes (fixtures live in the
conftest.py files).

Imported as ``from helpers import ...`` (pyproject puts tests/ on pytest's pythonpath). Heavy
libraries (torch, transformers, prefect) are imported inside the functions that need them, so
importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rscaffold.config import (
    LabelingConfig,
    PipelineConfig,
    SamplingConfig,
    SegmentationConfig,
    TinyModelConfig,
    TrainingConfig,
    config_from_dict,
)
from rscaffold.llm.base import Capabilities, ChatRequest, Completion
from rscaffold.models import build_tiny_model
from rscaffold.paths import default_model_dir
from rscaffold.records import ExampleRecord, PredictionRecord, Step
from rscaffold.segment import split_steps
from rscaffold.serving import free_port
from rscaffold.vocabulary import STAGES

REPO = Path(__file__).resolve().parents[1]  # the checkout: tests/ is directly below it
BIN_DIR = Path(sys.executable).parent  # the environment's console scripts (prefect, rscaffold)

# ---------------------------------------------------------------------------------------------
# files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, after checking its signature and header chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------
# LLM backends: requests, a free port, a fake OpenAI-compatible server


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


# ---------------------------------------------------------------------------------------------
# labeling: the built-in signals, two teacher traces with their pre-labels and gold labels, a
# scripted labeler

# The built-in taxonomy (data/signals.yaml), in its order.
SIGNAL_NAMES = [
    "Contrast and Concession",
    "Addition and Elaboration",
    "Reasoning and Analysis",
    "Conclusion and Summary",
    "Verification and Reflection",
    "Hypothesis and Exploration",
    "Restatement and Clarification",
]
CONTRAST, ADDITION, REASONING, CONCLUSION, VERIFY, HYPOTHESIS, RESTATE = SIGNAL_NAMES


R1_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


# DeepSeek-R1 style trace (think block + visible answer), 10 steps at blank lines.
R1_TRACE = """<think>
Okay, so the problem says Natalia sold clips to 48 of her friends in April, and then in May she sold half as many. I need to find the total for April and May together.

First, let me figure out how many she sold in May. Half as many as 48 is 48 divided by 2, which is 24.

Wait, does "half as many clips" mean half as many clips or half as many friends? The question says she sold clips to 48 friends, so I'll assume one clip per friend, which means 48 clips in April.

Hmm, that assumption matters. If each friend bought more than one clip the numbers would change, but nothing in the problem suggests that.

So in May she sold 24 clips. Adding April and May: 48 + 24 = 72.

Let me check that again. 48 / 2 = 24, and 48 + 24 = 72. Yes, that's right.

Alternatively, I could think of it as 1.5 times 48, which is also 72. Same answer.

Therefore, Natalia sold 72 clips altogether.
</think>

Natalia sold 48 clips in April and 48 / 2 = 24 clips in May.

The answer is 72."""


R1_PRELABELS = [RESTATE, REASONING, CONTRAST, CONTRAST, REASONING, VERIFY, HYPOTHESIS, CONCLUSION, None, CONCLUSION]


R1_CUES = [
    "okay so the problem",
    "first",
    "wait",
    "hmm",
    "so",
    "let me check",
    "alternatively",
    "therefore",
    None,
    "the answer is",
]


# What a good labeler says: step 9 (no cue) is a summary, step 4 ("Hmm") is really verification.
R1_GOLD = [RESTATE, REASONING, CONTRAST, VERIFY, REASONING, VERIFY, HYPOTHESIS, CONCLUSION, CONCLUSION, CONCLUSION]


# QwQ style trace with markdown and list markers.
QWQ_TRACE = """Alright, so the problem asks for the area of a 2 m wide path around an 8 m by 5 m garden.

**Step 1:** The outer rectangle is (8 + 4) by (5 + 4), that is 12 by 9, so 108 square meters.

- Moreover, the garden itself is 8 * 5 = 40 square meters.

Hmm... so the path is 108 - 40 = 68 square meters.

Let’s verify: the four strips are 2*(8*2) + 2*(5*2) = 52, plus four 2x2 corners = 16, total 68.

So the answer is 68."""


# "**Step 1:** The outer rectangle ..." has no cue once the markdown and list marker are stripped.
QWQ_PRELABELS = [RESTATE, None, ADDITION, CONTRAST, VERIFY, CONCLUSION]


QWQ_GOLD = [RESTATE, REASONING, ADDITION, REASONING, VERIFY, CONCLUSION]


class ScriptedLabelerBackend:
    """test fake: returns scripted outputs; real backends are exercised in the backend tests

    ``script`` maps a trace id to the queue of its answers (text or Completion), or is a function
    of the request; ``calls`` records each batch of requests received.
    """

    name = "scripted"
    model_id = "scripted-labeler"
    capabilities = Capabilities()

    def __init__(self, script: dict[str, list[str | Completion]] | Callable[[ChatRequest], str]) -> None:
        self.script = script
        self.calls: list[list[ChatRequest]] = []
        self.samplings: list[SamplingConfig] = []  # the sampling of each call

    def generate(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: Callable[[Completion], None] | None = None,
    ) -> list[Completion]:
        self.calls.append(list(requests))
        self.samplings.append(sampling)
        out = []
        for r in requests:
            if callable(self.script):
                c = Completion(r.request_id, text=self.script(r), finish_reason="stop")
            else:
                queue = self.script.get(r.request_id.split(":")[0], [])
                item = queue.pop(0) if queue else Completion(r.request_id, error="unscripted request")
                c = item if isinstance(item, Completion) else Completion(r.request_id, text=item, finish_reason="stop")
                c.request_id = r.request_id
            if on_result:
                on_result(c)
            out.append(c)
        return out

    def close(self) -> None:
        pass


def json_label_answer(signals: Sequence[str], rationale: bool = False) -> str:
    """A labeler's JSON answer: ``{"labels": [{"step": 1, "signal": ...}, ...]}``."""
    entries = []
    for i, s in enumerate(signals, 1):
        e: dict[str, object] = {"step": i, "signal": s}
        if rationale:
            e["rationale"] = f"reason {i}"
        entries.append(e)
    return json.dumps({"labels": entries})


def llm_labeling_config(**kw: object) -> LabelingConfig:
    return LabelingConfig(method="llm", **kw)  # type: ignore[arg-type]


LABEL_SAMPLING = SamplingConfig(max_new_tokens=1024)


def labeling_traces() -> list[tuple[str, str, str, list[str]]]:
    """The two sample traces as the labeler takes them: (trace id, problem id, question, steps)."""
    return [
        ("r1", "p1", R1_QUESTION, split_steps(R1_TRACE, SegmentationConfig())),
        ("qwq", "p2", "What is the area of the path?", split_steps(QWQ_TRACE, SegmentationConfig())),
    ]


# ---------------------------------------------------------------------------------------------
# the teacher stage: a scripted teacher


class ScriptedTeacherBackend:
    """Test fake: answers each request (one per problem and sample, id ``<problem_id>#<sample>``)
    with ``script(problem_id, sample_index)``, which returns a Completion's fields or raises;
    records every request it receives."""

    name = "scripted"
    model_id = "scripted-model"
    capabilities = Capabilities()

    def __init__(self, script):
        self.script = script
        self.requests: list[ChatRequest] = []

    def generate(self, requests: Sequence[ChatRequest], sampling: SamplingConfig, on_result=None) -> list[Completion]:
        out = []
        for r in requests:
            self.requests.append(r)
            pid, _, sample = r.request_id.rpartition("#")
            for i in range(r.n):
                c = Completion(request_id=r.request_id, sample_index=i, **self.script(pid, int(sample) + i))
                out.append(c)
                if on_result:
                    on_result(c)
        return out

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# evaluation: predictions of two models on two benchmarks, a toy teacher over the signals A, B, C;
# the signals of the random student (the conftest fixture ``random_student``)

TOY_SIGNALS = ["A", "B", "C"]


def prediction(model, bench, i, correct, signals=(), consistent=None, tokens=10):
    """A PredictionRecord of ``model`` on problem ``i`` of ``bench`` (guided where it has signals)."""
    return PredictionRecord(
        model=model,
        benchmark=bench,
        problem_id=f"{bench}-{i}",
        question="q",
        gold_answer="1",
        output="o",
        predicted_answer="1" if correct else "2",
        correct=correct,
        parsed=True,
        output_tokens=tokens,
        signals=list(signals),
        latency_s=0.01,
        decoding="guided" if signals else "plain",
        n_steps=max(1, len(signals)),
        consistent=consistent,
        consistency_check=None if consistent is None else "math_equation",
        consistency_evidence=None if consistent is not False else "1 + 1 = 2",
    )


def sample_predictions() -> list[PredictionRecord]:
    """base and scaffolded, 6 problems each of gsm8k and strategyqa."""
    out = []
    for bench in ("gsm8k", "strategyqa"):
        for i in range(6):
            out.append(prediction("base", bench, i, i % 3 == 0, consistent=i % 2 == 0))
            out.append(
                prediction(
                    "scaffolded",
                    bench,
                    i,
                    i % 2 == 0,
                    signals=["A", "B", "C"] if i % 2 else ["A", "C"],
                    consistent=True,
                )
            )
    return out


# The labeling stage's quality summary of a teacher over the toy signals (what evaluation compares with).
TOY_TEACHER = {
    "names": TOY_SIGNALS,
    "transitions": [[0, 4, 1], [0, 0, 4], [0, 0, 0]],
    "signal_counts": {"A": 5, "B": 4, "C": 5},
}

RANDOM_STUDENT_SIGNALS = ["setup", "elaborate", "check", "conclude"]
RANDOM_STUDENT_TOKENS = [f"<sig:{n}>" for n in RANDOM_STUDENT_SIGNALS]


# ---------------------------------------------------------------------------------------------
# student training: tiny students on the SmolLM2 tokenizer, three signals, synthetic examples

STUDENT_TOKENIZER_DIR = Path(os.environ.get("RSCAFFOLD_SMOLLM2_DIR", default_model_dir()))
STUDENT_TOKENIZER = str(STUDENT_TOKENIZER_DIR)
STUDENT_SIGNALS = ["setup", "elaborate", "conclude"]
STUDENT_SIGNAL_TOKENS = [f"<sig:{n}>" for n in STUDENT_SIGNALS]
STUDENT_TOKEN_MAP = dict(zip(STUDENT_SIGNALS, STUDENT_SIGNAL_TOKENS))


def skip_module_without_student_tokenizer() -> None:
    """Called at the top of a test module: skip the whole module when the tokenizer is missing."""
    if not (STUDENT_TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(
            f"SmolLM2 tokenizer not found at {STUDENT_TOKENIZER_DIR} (run `rscaffold models fetch`)",
            allow_module_level=True,
        )


def tiny_student(**kw):
    """(model, tokenizer): a tiny random-init model on the SmolLM2 tokenizer."""
    return build_tiny_model(STUDENT_TOKENIZER, TinyModelConfig(**kw))


def training_config(**kw) -> TrainingConfig:
    """A TrainingConfig for a tiny student on CPU: a few steps, a high learning rate."""
    base = dict(
        student=STUDENT_TOKENIZER,
        tiny=TinyModelConfig(),
        max_steps=4,
        per_device_batch_size=4,
        learning_rate=5e-3,
        logging_steps=2,
        save_steps=1000,
        max_length=256,
        bf16=False,
    )
    base.update(kw)
    return TrainingConfig(**base)


def synthetic_examples(n: int, split: str = "train") -> list[ExampleRecord]:
    """The next signal is determined by the step index (setup, elaborate, conclude)."""
    out = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        texts = [f"We have {a} apples and {b} pears.", f"Together that is {a} plus {b}.", f"The answer is {a + b}."]
        steps = [Step(index=j, signal=STUDENT_SIGNALS[j], text=t, source="llm") for j, t in enumerate(texts)]
        out.append(
            ExampleRecord(
                trace_id=f"t{i}",
                problem_id=f"p{i}",
                split=split,
                question=f"How many fruits: {a} apples, {b} pears?",
                gold_answer=str(a + b),
                steps=steps,
                signals=list(STUDENT_SIGNALS),
                n_steps=3,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# the tiny pipeline: one config for the end-to-end, artifact, launch and Prefect server tests


def tiny_config_dict(tiny_model_dir: Path, smollm2_dir: Path, artifacts: Path, **training) -> dict:
    """The raw config of a tiny pipeline run (8 train and 4 eval problems of the built-in data, a
    tiny random-init teacher and student, a few tokens and steps); ``training`` overrides keys of
    the training section."""
    data = REPO / "data"
    return {
        # Stages run in this process (the tests patch stage functions and count their calls);
        # tests/tasks/test_child.py covers the child processes of `isolate_model_stages`.
        "run": {"artifacts_dir": str(artifacts), "retries": 0, "isolate_model_stages": "never"},
        "problems": {
            "train": str(data / "problems" / "train.jsonl"),
            "eval": str(data / "problems" / "eval.jsonl"),
            "limit_train": 8,
            "limit_eval": 4,
        },
        "teacher": {
            "llm": {"backend": "transformers", "model": str(tiny_model_dir), "batch_size": 4},
            # a random-init model decodes only newlines greedily; sampling gives it text to label
            "sampling": {"max_new_tokens": 24, "temperature": 1.0, "seed": 1},
            "shard_size": 4,
            "keep": "all",  # a random-init teacher's traces all hit the token limit
        },
        "labeling": {"method": "llm", "sampling": {"max_new_tokens": 24}, "shard_size": 4},
        "dataset": {"validation_fraction": 0.25},
        "training": {
            "student": str(smollm2_dir),
            "tiny": {},
            "tokenizer": str(smollm2_dir),
            "max_steps": 2,
            "per_device_batch_size": 2,
            "max_length": 128,
            "save_steps": 1,
            **training,
        },
        "evaluation": {
            "max_new_tokens": 12,
            "batch_size": 4,
            "bootstrap_samples": 50,
            "guided": {"max_steps": 3, "max_step_tokens": 6},
        },
    }


def make_config(tiny_model_dir: Path, smollm2_dir: Path, artifacts: Path, **training) -> PipelineConfig:
    """The tiny pipeline's config (``tiny_config_dict``), validated."""
    return config_from_dict(tiny_config_dict(tiny_model_dir, smollm2_dir, artifacts, **training))


def run_upstream_stages(cfg: PipelineConfig, fps: dict[str, str]) -> dict:
    """problems, teacher, labeling and dataset, in-process with the library stage functions (what the
    Prefect tasks call); their StageRefs by stage."""
    from rscaffold.stages.dataset import run_dataset
    from rscaffold.stages.labeling import run_labeling
    from rscaffold.stages.problems import run_problems
    from rscaffold.stages.teacher import run_teacher

    problems = run_problems(cfg, fps)
    teacher = run_teacher(cfg, fps, problems)
    labeling = run_labeling(cfg, fps, teacher)
    dataset = run_dataset(cfg, fps, teacher=teacher, labeling=labeling)
    return {"problems": problems, "teacher": teacher, "labeling": labeling, "dataset": dataset}


# ---------------------------------------------------------------------------------------------
# a real Prefect server (the `server` fixture in tests/flows/conftest.py) and its processes


@dataclass
class Server:
    url: str
    home: Path
    env: dict[str, str]

    @contextlib.contextmanager
    def api(self):
        """Point this process's Prefect client (and in-process flows) at the server."""
        from prefect.settings import temporary_settings

        with temporary_settings(
            updates={"api.url": self.url, "results.local_storage_path": str(self.home / "storage")}
        ):
            try:
                yield
            finally:
                drain_prefect_workers()

    def client(self):
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)


def drain_prefect_workers() -> None:
    """Send this process's queued logs and events while the server is still there (as
    prefect_test_harness does), instead of failing to at interpreter exit."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        with contextlib.suppress(RuntimeError):  # a worker that never started
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 20) -> None:
    """Stop a process a test started, and whatever it started (by pid, never by name)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def log_tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "<no log>"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5, show=None):
    """Poll ``predicate`` until it returns something truthy; ``show()`` describes a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}" + (f": {show()}" if show else "")
            )
        time.sleep(interval)


def stage_manifests(cfg: PipelineConfig) -> dict[str, Path | None]:
    """The manifest of each stage under the run's (fresh) artifacts root, None where there is none.

    Found on disk rather than recomputed from the config here: a fingerprint includes the code
    version, and the run's process is the authority on which code it ran.
    """
    out: dict[str, Path | None] = {}
    for stage in STAGES:
        dirs = sorted(d for d in (Path(cfg.run.artifacts_dir) / stage).glob("*") if d.is_dir())
        assert len(dirs) <= 1, f"{stage}: several fingerprints {dirs}"
        manifest = dirs[0] / "manifest.json" if dirs else None
        out[stage] = manifest if manifest is not None and manifest.exists() else None
    return out


def fast_config(tiny_model_dir: Path, smollm2_dir: Path, artifacts: Path) -> PipelineConfig:
    """The tests' tiny pipeline, trimmed where it does not change what the Prefect server tests
    exercise."""
    raw = tiny_config_dict(tiny_model_dir, smollm2_dir, artifacts, max_steps=1, students=["scaffolded"])
    raw["evaluation"]["models"] = ["base", "scaffolded"]  # no baseline is trained
    cfg = config_from_dict(raw)
    cfg.problems.limit_train = 4
    cfg.teacher.sampling.max_new_tokens = 16
    cfg.labeling.method = "keyword"
    cfg.evaluation.limit = 2
    return cfg


# ---------------------------------------------------------------------------------------------
# a real OpenAI-compatible server (`transformers serve`) and a counting, switchable proxy
#
# ``transformers serve`` (the real server, from ``transformers[serving]``) hosts a model directory
# on 127.0.0.1. CountingProxy forwards every HTTP request to it unchanged and counts the chat
# completions that reach the model (how tests check that a re-run sends no request answered
# before); ``down()`` closes its port (clients get "connection refused", as from a dead endpoint)
# and ``up()`` opens it again on the same port.

SERVER_START_TIMEOUT_S = 180


def serve_available() -> str | None:
    """None when `transformers serve` can run here, else why not."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return "this transformers has no `transformers serve`"
    if not is_serve_available():
        return "`transformers serve` needs the serving extra: pip install 'transformers[serving]'"
    return None


# `transformers serve` as a command of rscaffold.serving.StudentServer ({model_dir}, {host}, {port})
TRANSFORMERS_SERVE = (
    f"{sys.executable} -c 'from transformers.cli.transformers import app; app()' "
    "serve {model_dir} --host {host} --port {port} --device cpu"
)
SERVE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}


@contextmanager
def transformers_serve(model_dir: Path, log_path: Path) -> Iterator[str]:
    """``transformers serve <model_dir>`` on a free port, started, waited for and stopped by the
    product's own :class:`rscaffold.serving.StudentServer`; yields its root URL
    (``http://127.0.0.1:<port>``) once it answers."""
    from rscaffold.serving import StudentServer

    server = StudentServer(
        TRANSFORMERS_SERVE,
        model_dir=model_dir,
        model=str(model_dir),
        log_path=log_path,
        startup_timeout_s=SERVER_START_TIMEOUT_S,
        env=SERVE_ENV,
    )
    with server:
        yield server.root


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
