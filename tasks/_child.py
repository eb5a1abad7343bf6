"""Running a stage in a child process, so that its exit returns all the memory its model took.

vLLM does not reliably give GPU memory back in-process, and a transformers model dropped at the
end of a stage can leave the CUDA cache and fragmented host memory behind; a stage that loads a
model (``run.isolate_model_stages``) therefore runs in a *spawned* child process (never forked:
a forked CUDA context is unusable). What the task needs comes back over a queue:

* log records of the ``rscaffold.*`` loggers, re-emitted in this process (so they reach the
  Prefect UI of the task run and the console as if the stage ran here);
* progress calls, handed to the task's progress reporter;
* the result (a :class:`~rscaffold.store.StageRef`), or the child's exception: re-raised here
  as itself when it can be pickled, else as :class:`StageProcessError` with its traceback. A
  child that dies without a word (killed, out of memory) is a :class:`StageProcessError` too.

A Prefect retry of the task starts a fresh child.

The child never outlives this process: its first act is to ask the kernel to kill it when this
process dies (:func:`rscaffold.lifeline.die_with_parent`; a parent watch where the OS has no such
signal), so a ``kill -9`` of the run leaves no stage holding the stage's lock and its GPUs. When
this process is interrupted instead (SIGINT, or SIGTERM turned into an exception by Prefect's
flow engine), the child is terminated at once, and killed after :data:`STOP_GRACE_S` seconds.
Either way the child's finished shards and checkpoints stay (each is written atomically), and a
re-run resumes from them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import multiprocessing
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

from rscaffold.config import PipelineConfig
from rscaffold.lifeline import die_with_parent
from rscaffold.stages import registry

log = logging.getLogger("rscaffold.tasks.child")

STOP_GRACE_S = 3.0
"""How long an interrupted run gives its stage's process after SIGTERM before killing it."""
EXIT_GRACE_S = 30.0
"""How long the stage's process may take to exit after it sent its result (flushing, freeing)."""


class StageProcessError(RuntimeError):
    """The stage's child process failed (its error, when it could not travel as itself, or its
    exit code)."""


def needs_isolation(stage: str, config: PipelineConfig) -> bool:
    """Whether ``stage`` runs in a child process, by ``run.isolate_model_stages`` ('auto': when it
    loads a model here, by its declaration's ``loads_model``)."""
    mode = config.run.isolate_model_stages
    if mode != "auto":
        return mode == "always"
    return registry.stage(stage).loads_model(config)


class _QueueLogHandler(logging.Handler):
    def __init__(self, q: Any):
        super().__init__()
        self.q = q

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record) if record.exc_info else record.getMessage()
            self.q.put(("log", record.name, record.levelno, msg))
        except Exception:  # noqa: BLE001 - logging must never break the stage
            pass


def _child_main(target: str, kwargs: dict[str, Any], q: Any, *, parent: int) -> None:
    """The child: run ``module:function(**kwargs)`` with a progress callback, report back."""
    die_with_parent(parent)
    lib = logging.getLogger("rscaffold")
    lib.setLevel(logging.INFO)
    lib.addHandler(_QueueLogHandler(q))
    lib.propagate = False
    module, _, name = target.partition(":")
    logging.getLogger("rscaffold.stages").info("%s: in child process %d", target, os.getpid())
    fn = getattr(importlib.import_module(module), name)
    if "progress" in inspect.signature(fn).parameters:
        kwargs = {**kwargs, "progress": lambda done, total: q.put(("progress", done, total))}
    try:
        result = fn(**kwargs)
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(err)
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled travels as text
            payload = None
        q.put(("error", payload, f"{type(err).__name__}: {err}", tb))
        return
    q.put(("result", result))


def run_in_child(target: str, kwargs: dict[str, Any], *, progress: Callable[[int, int], None] | None = None) -> Any:
    """``module:function(**kwargs)`` in a spawned child process (with a ``progress`` callback when
    the function takes one); see the module doc."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(
        target=_child_main, args=(target, kwargs, q), kwargs={"parent": os.getpid()}, name=f"rscaffold-{target}"
    )
    proc.start()
    outcome: tuple | None = None
    try:
        while outcome is None:
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    # a last look: the child may have put its answer just before exiting
                    try:
                        msg = q.get(timeout=1.0)
                    except queue.Empty:
                        raise StageProcessError(
                            f"the stage's process exited with code {proc.exitcode} without a result "
                            "(killed? out of memory?)"
                        ) from None
                else:
                    continue
            kind = msg[0]
            if kind == "log":
                logging.getLogger(msg[1]).log(msg[2], "%s", msg[3])
            elif kind == "progress":
                if progress:
                    progress(msg[1], msg[2])
            else:
                outcome = msg
    finally:
        if outcome is None:  # interrupted (or the child died): stop it now
            proc.terminate()
        proc.join(timeout=EXIT_GRACE_S if outcome is not None else STOP_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
        q.close()
        q.join_thread()
    if outcome[0] == "result":
        return outcome[1]
    _, payload, summary, tb = outcome
    if payload is not None:
        try:
            err = pickle.loads(payload)
        except Exception:  # noqa: BLE001
            err = None
        if isinstance(err, BaseException):
            raise err from StageProcessError(f"in the stage's process:\n{tb}")
    raise StageProcessError(f"{summary}\n--- in the stage's process:\n{tb}")
