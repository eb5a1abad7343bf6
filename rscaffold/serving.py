"""Students behind an OpenAI-compatible server: start one, and decode through it.

A trained student is a plain causal LM directory (signal tokens in its vocabulary), so any
OpenAI-compatible server hosts it: ``vllm serve``, SGLang, llama.cpp's server, ``transformers
serve``. :class:`StudentServer` runs such a server as a child process for one student (a
configured command such as ``vllm serve {model_dir} --port {port}``), waits until it answers and
stops it (its whole process group) when done. :func:`generate_served` decodes through one, with
the same outputs as :func:`rscaffold.inference.generate` under greedy decoding:

* ``plain``: one text completion (``/v1/completions``) per question, of the prompt rendered with
  the student's chat template here (so the server sees exactly the tokens the in-process decoder
  does), ``max_tokens`` = the budget, greedy.
* ``guided``: the rounds of :mod:`rscaffold.inference`, each one or two requests per question: a
  *signal request* (one token, restricted to the signal tokens, with their log-probabilities for
  the confidence gate) and a *step request* that stops at a signal token (``stop_token_ids``), at
  eos, or at a step boundary (stop strings for a blank line). This needs what vLLM's completions
  API offers (and SGLang's mostly): ``allowed_token_ids``, ``stop_token_ids``, ``logprobs``,
  ``skip_special_tokens``, ``add_special_tokens`` and the ``stop_reason`` of each choice; start
  vLLM with ``--logprobs-mode processed_logprobs`` so that the log-probabilities are those of the
  restricted distribution (with vLLM's default raw log-probabilities, the signals outside the
  top ``logprobs`` tokens of the full vocabulary count as probability 0). A server that answers
  without log-probabilities (``transformers serve``, llama.cpp) is refused with a clear error.
  Each request re-sends the question and the answer so far; the server's prefix cache makes
  that cheap (vLLM caches prefixes by default).

Differences from in-process decoding, under greedy decoding: a step request that stops at a
blank line before any text is continued from the re-sent text (re-tokenized, where in-process
decoding continues from the generated ids); token counts are the server's. Students with a
signal head (``signal_objective: head``) cannot be served: the head is not part of a causal LM.

Requests go through the given backend (:class:`rscaffold.llm.openai_api.OpenAIBackend`, usually
wrapped in the request cache), so they get its client, concurrency, retries and cache. Any
request that still fails raises :class:`ServedDecodingError`: a prediction is never made from a
failed request (the caller's finished shards are kept; a re-run resumes).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, render_prompt
from rscaffold.segment import split_at_step_boundaries
from rscaffold.vocabulary import STEP_SEPARATOR

# Stop strings of a step request: a blank line (the step boundary, STEP_BOUNDARY: two newlines with
# only white space between them), as servers take them: literal strings, up to three spaces/tabs
# or a carriage return between the newlines (rarer forms end the step at the next signal instead).
STEP_STOPS = ["\n" + "".join(mid) + "\n" for n in range(4) for mid in itertools.product(" \t", repeat=n)] + ["\n\r\n"]
# Most top log-probabilities a server returns per token (vLLM's default --max-logprobs is 20).
MAX_LOGPROBS = 20


class ServedDecodingError(RuntimeError):
    """A request to the student's server failed (after the client's retries) or its answer
    cannot be used; nothing was predicted from it."""


class StudentServerError(RuntimeError):
    """The student's server did not start, or died."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class StudentServer:
    """An OpenAI-compatible server for one student, as a child process (a context manager).

    ``command`` is formatted with ``{model_dir}``, ``{port}``, ``{host}`` and ``{model}`` (the
    name requests use), split like a shell command (no shell runs it) and started in a process
    group of its own with ``env`` added to this process's environment; its output goes to
    ``log_path``. The server is ready when ``GET <root>/health`` or ``GET <root>/v1/models``
    answers 200. :meth:`stop` terminates the group (SIGTERM, then SIGKILL after
    ``stop_timeout_s``).
    """

    def __init__(
        self,
        command: str,
        *,
        model_dir: str | Path,
        model: str,
        log_path: str | Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 600.0,
        stop_timeout_s: float = 30.0,
        env: dict[str, str] | None = None,
    ):
        self.host, self.port = host, port or free_port(host)
        self.model = model
        fields = {"model_dir": str(model_dir), "port": self.port, "host": host, "model": model}
        try:
            self.argv = [part.format(**fields) for part in shlex.split(command)]
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"evaluation.server.command {command!r}: {err!r}; it may use {{model_dir}}, {{port}}, "
                "{host} and {model}"
            ) from None
        self.log_path = Path(log_path)
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible endpoint (``.../v1``)."""
        return f"{self.root}/v1"

    def _ready(self) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                with urllib.request.urlopen(self.root + path, timeout=5) as r:
                    if r.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                continue
        return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _port_free(self) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind((self.host, self.port))
            except OSError:
                return False
        return True

    def start(self) -> StudentServer:
        if not self._port_free():
            # whatever answers there is not the server this starts (a stale one, another run's):
            # its answers must not be taken, nor cached, as this student's
            raise StudentServerError(
                f"port {self.port} on {self.host} is in use: another server (a stale one, another run's?) "
                "answers there; stop it, or leave evaluation.server.port unset (a free port is picked)"
            )
        if not self.argv or shutil.which(self.argv[0], path=self.env.get("PATH")) is None:
            raise StudentServerError(
                f"cannot start the student server: {self.argv[0] if self.argv else '(empty command)'!r} is not an "
                "executable on PATH (evaluation.server.command)"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The server runs under a small supervisor (this module's __main__) that stops it when
        # this process dies without stopping it (killed): a server never outlives its evaluation,
        # holding a GPU.
        supervised = [sys.executable, "-m", "rscaffold.serving", "--supervise", str(os.getpid()), "--", *self.argv]
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    supervised, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
                )
            except OSError as err:
                raise StudentServerError(f"cannot start the student server {self.argv[0]!r}: {err}") from None
        deadline = time.monotonic() + self.startup_timeout_s
        while self.proc.poll() is not None or not self._ready():  # ready: ours is up and answers
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # whatever it left in its group
                raise StudentServerError(
                    f"the student server exited with {code} before it was ready "
                    f"(command: {shlex.join(self.argv)}; log {self.log_path}):\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StudentServerError(
                    f"the student server did not answer within {self.startup_timeout_s:.0f}s "
                    f"(command: {shlex.join(self.argv)}; log {self.log_path}):\n{self._log_tail()}"
                )
            time.sleep(0.5)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server's whole process group (the supervisor, the server and whatever it
        started), also when the supervisor or the server alone has already died."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # the group's id is the supervisor's pid (a session leader)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                proc.poll()  # reap the supervisor, so that it does not hold the group
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                continue
            break
        proc.poll()

    def __enter__(self) -> StudentServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def served_llm(
    llm: BackendConfig, *, student: str, model_dir: str | Path, base_url: str | None = None
) -> BackendConfig:
    """``llm`` (an ``openai`` backend) for one student: ``{student}`` and ``{model_dir}`` in its
    ``model`` filled in, ``base_url`` set when given (a server started for the student)."""
    fields = {"student": student, "model_dir": str(model_dir)}
    update: dict[str, Any] = {"model": llm.model.format(**fields)}
    if base_url is not None:
        update["base_url"] = base_url
    return llm.model_copy(update=update)


# ---------------------------------------------------------------------------------------------
# decoding


def _check(completions: Sequence[Completion], what: str, backend: LLMBackend) -> dict[str, Completion]:
    failed = [c for c in completions if not c.ok]
    if failed:
        where = getattr(getattr(backend, "cfg", None), "base_url", None) or backend.model_id
        raise ServedDecodingError(
            f"{len(failed)} of {len(completions)} {what} requests to the student's server ({where}) failed; "
            f"first: {failed[0].error}. No prediction was made from them: re-run to resume."
        )
    return {c.request_id: c for c in completions}


def generate_served(
    backend: LLMBackend,
    student: Any,
    questions: Sequence[str],
    *,
    mode: Literal["plain", "guided"] = "plain",
    max_new_tokens: int = 256,
    guided: Any = None,
    request_prefix: str = "q",
) -> list[Any]:
    """Answers of ``student`` (a :class:`~rscaffold.student.Student`, its weights not needed:
    ``load_student(..., weights=False)``) through ``backend``, one
    :class:`~rscaffold.inference.Generated` each, as :func:`rscaffold.inference.generate` makes
    them. ``guided``: resolved :class:`~rscaffold.inference.GuidedSettings`. ``request_prefix``
    names the requests (``<prefix>-<i>``), for logs and the cache's bookkeeping."""
    if not backend.capabilities.raw_prompt:
        raise ValueError(f"backend {backend.name!r} cannot serve text completions; use backend 'openai'")
    tok = student.tokenizer
    system_prompt = student.system_prompt or STUDENT_SYSTEM_PROMPT
    prompts = [render_prompt(q, tok, system_prompt) for q in questions]
    if mode == "plain":
        prompts = [without_added_bos(p, tok) for p in prompts]
        tokens = dict(zip(student.signal_tokens or [], student.signal_names or []))
        return _plain(backend, prompts, max_new_tokens=max_new_tokens, prefix=request_prefix, signal_of_token=tokens)
    if mode != "guided":
        raise ValueError(f"mode must be 'plain' or 'guided', got {mode!r}")
    if not student.signal_token_ids:
        raise ValueError("guided decoding needs a scaffolded student (signal names and token ids)")
    if student.signal_objective == "head":
        raise ValueError(
            "a student with a signal head (signal_objective: head) cannot be decoded through a server: "
            "the head is not part of the causal LM a server hosts; decode it in-process (no evaluation.llm)"
        )
    return _Guided(backend, student, guided, max_new_tokens=max_new_tokens, prefix=request_prefix).run(prompts)


def without_added_bos(prompt: str, tokenizer: Any) -> str:
    """``prompt`` as a server that tokenizes with special tokens added (the completions default)
    must get it to see the tokens in-process decoding sees (``add_special_tokens=False``): a
    tokenizer that adds a BOS of its own (Llama 3, Gemma) would otherwise give two, as the
    rendered chat template has one; the template's is dropped, the server adds it back."""
    bos = tokenizer.bos_token
    if not bos or not prompt.startswith(bos):
        return prompt
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    return prompt[len(bos) :] if added[:1] == [tokenizer.bos_token_id] else prompt


def split_signals(text: str, signal_of_token: dict[str, str]) -> tuple[list[str], list[str | None]]:
    """:func:`rscaffold.inference.split_output` for text: steps and the signal that opens each, a
    step starting at a signal token (its text) and ending at the next one or a step boundary."""
    if not signal_of_token:
        steps = split_at_step_boundaries(text)
        return steps, [None] * len(steps)
    parts = re.split("(" + "|".join(re.escape(t) for t in signal_of_token) + ")", text)
    steps: list[str] = []
    step_signals: list[str | None] = []
    current: str | None = None
    for k, part in enumerate(parts):
        if k % 2:
            current = signal_of_token[part]
            continue
        for j, p in enumerate(split_at_step_boundaries(part)):
            steps.append(p)
            step_signals.append(current if j == 0 else None)
    return steps, step_signals


def _plain(
    backend: LLMBackend, prompts: list[str], *, max_new_tokens: int, prefix: str, signal_of_token: dict[str, str]
) -> list[Any]:
    from rscaffold.inference import Generated

    # A student with signal tokens keeps them in the text (vLLM's skip_special_tokens), so that its
    # steps split as in-process; a server that rejects the field cannot decode such a student plain.
    # No server-specific field otherwise (transformers serve refuses unknown ones): the prompt is
    # sent so that the server's own tokenization (special tokens added) gives the in-process tokens.
    options = {"skip_special_tokens": False} if signal_of_token else None
    reqs = [ChatRequest(f"{prefix}-{i}", [], prompt=p, options=options) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    got = _check(backend.generate(reqs, SamplingConfig(max_new_tokens=max_new_tokens)), "answer", backend)
    share = (time.perf_counter() - t0) / max(1, len(reqs))
    out = []
    for r in reqs:
        c = got[r.request_id]
        steps, step_signals = split_signals(c.text, signal_of_token)
        out.append(
            Generated(
                text=STEP_SEPARATOR.join(steps),
                signals=[s for s in step_signals if s is not None],
                output_tokens=c.completion_tokens or 0,
                latency_s=share,
                steps=steps,
                step_signals=step_signals,
                confidences=[None] * len(steps),
            )
        )
    return out


class _Guided:
    """Guided decoding through a server (vLLM's completions dialect; see the module doc)."""

    def __init__(self, backend: LLMBackend, student: Any, settings: Any, *, max_new_tokens: int, prefix: str):
        from rscaffold.inference import GuidedSettings

        self.backend, self.prefix, self.max_new_tokens = backend, prefix, max_new_tokens
        self.settings = settings if isinstance(settings, GuidedSettings) else GuidedSettings()
        tok = student.tokenizer
        self.names = list(student.signal_names)
        self.ids = list(student.signal_token_ids)
        self.tokens = list(tok.convert_ids_to_tokens(self.ids))
        unknown = sorted(set(self.settings.prune_signals) - set(self.names))
        if unknown:
            raise ValueError(f"prune_signals {unknown} are not signals of this student ({self.names})")
        pruned = set(self.settings.prune_signals)
        self.allowed = [k for k, n in enumerate(self.names) if n not in pruned]
        self.token_of = dict(zip(self.names, self.tokens))
        self.name_of_id = dict(zip(self.ids, self.names))
        self.name_of_token = dict(zip(self.tokens, self.names))
        # every request: the rendered text is tokenized as is (no second BOS), signal tokens kept
        # in returned text where asked for
        self.base_options = {"add_special_tokens": False}
        self.pruned_ids = [self.ids[k] for k in range(len(self.ids)) if self.names[k] in pruned]

    def _send(self, reqs: list[ChatRequest], max_tokens: int, what: str) -> dict[str, Completion]:
        if not reqs:
            return {}
        return _check(self.backend.generate(reqs, SamplingConfig(max_new_tokens=max_tokens)), what, self.backend)

    def _signal_probs(self, c: Completion) -> dict[str, float]:
        top = (c.extra.get("top_logprobs") or [None])[0]
        if not top:
            raise ServedDecodingError(
                "the student's server answered a signal request without log-probabilities; guided decoding "
                "through a server needs /v1/completions with logprobs, allowed_token_ids and stop_token_ids "
                "(vLLM serve; transformers serve and llama.cpp lack them). Decode the scaffolded student "
                "in-process (evaluation.served_students without it) instead."
            )
        logp = {self.name_of_token[t]: float(v) for t, v in top.items() if t in self.name_of_token}
        logp = {n: v for n, v in logp.items() if self.names.index(n) in self.allowed}
        if not logp:
            raise ServedDecodingError(
                f"the signal request's log-probabilities hold none of the signal tokens ({list(top)[:5]}...); "
                "does the server restrict the token to allowed_token_ids?"
            )
        # renormalised as the in-process decoder does (a float32 softmax), so that a gate at
        # threshold 1.0 commits the same saturated signals
        import torch

        names = list(logp)
        probs = torch.softmax(torch.tensor([logp[n] for n in names], dtype=torch.float32), dim=-1).tolist()
        return dict(zip(names, probs))

    def run(self, prompts: list[str]) -> list[Any]:
        from rscaffold.inference import _GuidedRow

        rows = [_GuidedRow(index=i, prompt_ids=[]) for i in range(len(prompts))]
        while True:
            for r in rows:
                if self.max_new_tokens - r.produced <= 0:
                    r.done = True
            live = [r for r in rows if not r.done]
            if not live:
                break
            t0 = time.perf_counter()
            self._round(live, prompts)
            share = (time.perf_counter() - t0) / len(live)
            for r in live:
                r.latency_s += share
        return [r.result() for r in rows]

    def _budget(self, r: Any) -> int:
        left = self.max_new_tokens - r.produced
        cap = self.settings.max_step_tokens
        return left if cap is None else min(cap, left)

    def _round(self, live: list[Any], prompts: list[str]) -> None:
        from rscaffold.inference import step_text

        s = self.settings
        signals: dict[int, str | None] = {r.index: None for r in live}
        confs: dict[int, float | None] = {r.index: None for r in live}
        if self.allowed:
            n_top = min(len(self.allowed), MAX_LOGPROBS)
            opts = {**self.base_options, "allowed_token_ids": [self.ids[k] for k in self.allowed]}
            opts["skip_special_tokens"] = False
            reqs = [
                ChatRequest(
                    f"{self.prefix}-{r.index}-r{r.rounds}-signal",
                    [],
                    prompt=prompts[r.index] + r.completion,
                    logprobs=n_top,
                    options=opts,
                )
                for r in live
            ]
            got = self._send(reqs, 1, "signal")
            for r, q in zip(live, reqs):
                probs = self._signal_probs(got[q.request_id])
                best = max(probs, key=lambda n: (probs[n], -self.names.index(n)))
                confs[r.index] = probs[best]
                if probs[best] >= s.confidence_threshold:
                    signals[r.index] = best
                    r.completion += self.token_of[best]
                    r.produced += 1
        results = self._steps(live, prompts)
        # free decoding that opened the step with a signal of the model's own choosing
        again = [
            r for r in live if signals[r.index] is None and results[r.index][1] == "signal" and not results[r.index][0]
        ]
        for r in again:
            signals[r.index] = results[r.index][2]
            r.completion += self.token_of[signals[r.index]]
            r.produced += 1
        if again:
            results.update(self._steps(again, prompts))
        for r in live:
            body, stop, _, used = results[r.index]
            r.end_step(
                step_text(body),
                signal=signals[r.index],
                confidence=confs[r.index],
                stop=stop,
                tokens=used,
                max_new_tokens=self.max_new_tokens,
                max_steps=s.max_steps,
            )

    def _steps(self, rows: list[Any], prompts: list[str]) -> dict[int, tuple[str, str, str | None, int]]:
        """One step body per row: (text, why it stopped, the signal that stopped it, tokens used).

        Why: ``eos``, ``signal`` (a signal token began the next step; not counted), ``separator``,
        ``length`` (the row's step budget), ``budget`` (no tokens left). A stop at a blank line
        before any text is not a step's end (no training step is empty): the step goes on from
        the text so far.
        """
        out: dict[int, tuple[str, str, str | None, int]] = {}
        body = {r.index: "" for r in rows}
        used = {r.index: 0 for r in rows}
        todo = [r for r in rows if self._budget(r) > 0]
        for r in rows:
            if self._budget(r) <= 0:
                out[r.index] = ("", "budget", None, 0)
        part = 0
        while todo:
            opts = {**self.base_options, "stop_token_ids": list(self.ids), "skip_special_tokens": True}
            if self.pruned_ids:
                # a pruned kind of step is never started: its tokens are never generated
                opts["logit_bias"] = {str(i): -100 for i in self.pruned_ids}
            reqs = {
                r.index: ChatRequest(
                    f"{self.prefix}-{r.index}-r{r.rounds}-step{part}",
                    [],
                    prompt=prompts[r.index] + r.completion + body[r.index],
                    stop=STEP_STOPS,
                    options=opts,
                )
                for r in todo
            }
            budgets = {r.index: self._budget(r) - used[r.index] for r in todo}
            got: dict[str, Completion] = {}
            for n in sorted(set(budgets.values())):  # one call per distinct budget
                got.update(self._send([reqs[i] for i, b in budgets.items() if b == n], n, "step"))
            nxt = []
            for r in todo:
                c = got[reqs[r.index].request_id]
                text, reason = c.text, c.extra.get("stop_reason")
                tokens = c.completion_tokens or 0
                body[r.index] += text
                used[r.index] += tokens
                if c.finish_reason == "length":
                    out[r.index] = (body[r.index], "length", None, used[r.index])
                elif isinstance(reason, int) and reason in self.name_of_id:
                    used[r.index] -= 1  # the signal token is not part of this step
                    out[r.index] = (body[r.index], "signal", self.name_of_id[reason], used[r.index])
                elif isinstance(reason, str):
                    if body[r.index].strip():
                        out[r.index] = (body[r.index], "separator", None, used[r.index])
                    elif tokens < budgets[r.index]:
                        body[r.index] += reason  # a blank line before the step's text: go on
                        nxt.append(r)
                    else:
                        out[r.index] = (body[r.index], "length", None, used[r.index])
                else:  # eos
                    out[r.index] = (body[r.index], "eos", None, used[r.index])
            todo, part = nxt, part + 1
        return out


# ---------------------------------------------------------------------------------------------
# the supervisor a StudentServer runs its command under


def _supervise(parent: int, argv: list[str], *, poll_s: float = 1.0, grace_s: float = 30.0) -> int:
    """Run ``argv`` in this process group (the StudentServer's) until it exits, and stop the
    group if ``parent`` (the process that started it) is gone: a killed evaluation leaves no
    server behind. A SIGTERM to the group (:meth:`StudentServer.stop`) reaches the server itself;
    the supervisor waits for it to finish and exits with its code, so the caller's wait covers
    the server's shutdown."""
    stopping = False

    def on_term(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    child = subprocess.Popen(argv)
    while True:
        try:
            code = child.wait(timeout=poll_s)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            pass
        if not stopping and os.getppid() != parent:
            stopping = True
            print(f"rscaffold: the evaluation (pid {parent}) is gone; stopping the student server", flush=True)
            os.killpg(0, signal.SIGTERM)  # the server and whatever it started; this process ignores it
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(0, signal.SIGKILL)
            return 1


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--supervise" and sys.argv[3] == "--":
        sys.exit(_supervise(int(sys.argv[2]), sys.argv[4:]))
    sys.exit("usage: python -m rscaffold.serving --supervise <parent pid> -- <server command ...>")
