"""Student servers: an OpenAI-compatible server for one student, run as a child process.

A trained student is a plain causal LM directory (signal tokens in its vocabulary), so any
OpenAI-compatible server hosts it: ``vllm serve``, SGLang, llama.cpp's server, ``transformers
serve``. :class:`StudentServer` runs such a server as a child process for one student (a
configured command such as ``vllm serve {model_dir} --port {port}``), waits until it answers and
stops it (its whole process group) when done; a small supervisor (this module's ``__main__``)
stops it when the process that started it dies. Decoding through a server is
:mod:`rscaffold.decoding.served`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


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
