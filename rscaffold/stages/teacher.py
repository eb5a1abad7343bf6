"""Stage 2, teacher: problems -> teacher reasoning traces, resumable.

:func:`generate_traces` sends one chat request per problem (``samples_per_problem`` samples
each) to an :class:`~rscaffold.llm.base.LLMBackend` and turns every completion into a
:class:`~rscaffold.records.TraceRecord` with ``trace_id = "<problem_id>#<sample_index>"``.

Persistence and resume: finished traces are written as Parquet shards of ``cfg.shard_size`` rows
as completions arrive (and the remainder in a ``finally``), so a crash loses at most the requests
in flight. A re-run first reads the shards and only asks for (problem, sample) pairs without an
``ok`` trace; failed pairs are retried. When a pair appears in several shards the latest wins.

Outcome policy for one completion:

- backend error (HTTP failure, exception in its batch, ...) -> ``status="failed"``, ``error`` set;
- neither visible text nor reasoning -> ``failed``, ``"empty output"``;
- an exception in ``answer_fn`` / ``check_fn`` -> ``failed`` (so a systematic bug trips the
  failure threshold instead of silently marking everything wrong);
- no extractable answer -> ``ok`` with ``predicted_answer=None``, ``correct=False``;
- the answer is taken from the visible text, falling back to the reasoning (a teacher cut off
  inside its thinking may still have stated the answer there);
- ``truncated`` when generation hit the token limit (``finish_reason == "length"``) or the
  output ended inside an unclosed ``<think>`` block;
- text is stored as valid UTF-8 (invalid sequences replaced, never fatal).

Progress: a console ``tqdm`` bar (total = the (problem, sample) pairs wanted, starting at the
resumed count; shown only on a TTY) and, alongside it, the optional ``progress(done, total)``
callback (the flow feeds it to its progress artifact).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from rscaffold.config import PipelineConfig, TeacherConfig
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend
from rscaffold.llm.parsing import EMPTY_OUTPUT, clean_text, describe_error
from rscaffold.prompts import QUESTION_FIELD, fill_prompt
from rscaffold.records import ProblemRecord, TraceRecord
from rscaffold.stages.common import (
    Progress,
    open_stage,
    stage_code_version,
    stage_inputs,
)
from rscaffold.stages.problems import read_problems
from rscaffold.store import StageDir, StageRef, write_records

log = logging.getLogger(__name__)

TRACES_SHARD = "traces"

AnswerFn = Callable[[str], "str | None"]
CheckFn = Callable[["str | None", str], bool]
ProgressFn = Callable[[int, int], None]


class TeacherFailureError(RuntimeError):
    """Too many teacher generations failed (``failed / total > max_failure_rate``).

    Raised after every finished trace has been persisted; ``result`` holds the run's outcome.
    """

    def __init__(self, message: str, result: TraceRunResult):
        super().__init__(message)
        self.result = result


@dataclass
class TraceRunResult:
    """All traces of the problem set (resumed + new), with counts and failure reasons.

    ``counts``: ``total`` (traces returned), ``requested`` (pairs sent in this run), ``resumed``
    (ok traces read back from shards), ``ok``, ``failed``, ``truncated``, ``correct`` (over all
    traces returned). ``failure_reasons`` counts the error messages of the failed ones.
    """

    traces: list[TraceRecord]
    counts: dict[str, int]
    failure_reasons: Counter = field(default_factory=Counter)

    @property
    def failure_rate(self) -> float:
        total = self.counts.get("total", 0)
        return self.counts.get("failed", 0) / total if total else 0.0


def trace_id_for(problem_id: str, sample_index: int) -> str:
    return f"{problem_id}#{sample_index}"


def build_messages(problem: ProblemRecord, cfg: TeacherConfig) -> list[dict[str, str]]:
    messages = []
    if cfg.system_prompt.strip():
        messages.append({"role": "system", "content": cfg.system_prompt})
    # The pipeline fills in the benchmark family's template (teacher_prompt_config); filled by
    # plain replacement of '{question}', so other braces (\boxed{}) are literal.
    template = cfg.prompt_template or QUESTION_FIELD
    messages.append({"role": "user", "content": fill_prompt(template, problem.question)})
    return messages


def build_request(problem: ProblemRecord, cfg: TeacherConfig, n: int | None = None) -> ChatRequest:
    """The chat request for one problem (``request_id`` = ``problem_id``)."""
    return ChatRequest(
        request_id=problem.problem_id, messages=build_messages(problem, cfg), n=n or cfg.samples_per_problem
    )


def trace_from_completion(
    problem: ProblemRecord,
    completion: Completion,
    sample_index: int,
    *,
    answer_fn: AnswerFn,
    check_fn: CheckFn,
    backend: str = "",
    model: str = "",
) -> TraceRecord:
    """One completion -> one TraceRecord, following the module's outcome policy."""
    text = clean_text(completion.text)
    reasoning = clean_text(completion.reasoning) if completion.reasoning else None
    truncated = completion.finish_reason == "length" or bool(completion.extra.get("unclosed_think"))
    status, error = "ok", None
    predicted: str | None = None
    correct: bool | None = None
    if completion.error:
        status, error = "failed", completion.error
    elif not text.strip() and not (reasoning or "").strip():
        status, error = "failed", EMPTY_OUTPUT
    else:
        try:
            predicted = answer_fn(text) if text.strip() else None
            if predicted is None and reasoning:
                predicted = answer_fn(reasoning)
            correct = bool(check_fn(predicted, problem.gold_answer)) if predicted is not None else False
        except Exception as err:
            status, error, predicted, correct = "failed", f"answer check: {describe_error(err)}", None, None
    return TraceRecord(
        trace_id=trace_id_for(problem.problem_id, sample_index),
        problem_id=problem.problem_id,
        sample_index=sample_index,
        question=problem.question,
        gold_answer=problem.gold_answer,
        text=text,
        reasoning=reasoning,
        predicted_answer=predicted,
        correct=correct,
        finish_reason=completion.finish_reason,
        truncated=truncated,
        status=status,
        error=error,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        latency_s=completion.latency_s,
        backend=backend,
        model=model,
    )


def _unique_problems(problems: Sequence[ProblemRecord]) -> list[ProblemRecord]:
    seen: dict[str, ProblemRecord] = {}
    for p in problems:
        if p.problem_id in seen:
            log.warning("duplicate problem_id %r: keeping the first", p.problem_id)
            continue
        seen[p.problem_id] = p
    return list(seen.values())


def generate_traces(
    problems: list[ProblemRecord],
    backend: LLMBackend,
    cfg: TeacherConfig,
    *,
    stage: StageDir,
    answer_fn: AnswerFn,
    check_fn: CheckFn,
    progress: ProgressFn | None = None,
) -> TraceRunResult:
    """Generate (or resume) the teacher traces of ``problems``; see the module doc.

    Raises :class:`TeacherFailureError` (after persisting) when the failed fraction of all traces
    exceeds ``cfg.max_failure_rate``. Exceptions from the backend itself (not per-request
    failures, which backends turn into error completions) propagate after the finished traces
    have been flushed.
    """
    problems = _unique_problems(problems)
    by_id = {p.problem_id: p for p in problems}
    n = cfg.samples_per_problem
    wanted = [(p.problem_id, i) for p in problems for i in range(n)]

    # -- resume ---------------------------------------------------------------------------
    latest: dict[str, TraceRecord] = {}
    for t in stage.read_shards(TRACES_SHARD, TraceRecord):
        latest[t.trace_id] = t  # shards are read oldest first: the latest wins
    finished = {tid for tid, t in latest.items() if t.status == "ok"}
    resumed = sum(1 for pid, i in wanted if trace_id_for(pid, i) in finished)

    # request_id -> the sample indices still missing; the k-th sample returned for a request
    # becomes missing[k] (a partly finished problem is asked only for what it lacks).
    missing: dict[str, list[int]] = {}
    for pid, i in wanted:
        if trace_id_for(pid, i) not in finished:
            missing.setdefault(pid, []).append(i)
    requests = [build_request(by_id[pid], cfg, n=len(idx)) for pid, idx in missing.items()]
    total_pairs = len(wanted)
    n_requested = sum(len(v) for v in missing.values())
    if resumed:
        log.info("teacher: resuming, %d of %d traces already done; %d to generate", resumed, total_pairs, n_requested)

    # -- generate, persisting as we go ----------------------------------------------------------
    new: dict[str, TraceRecord] = {}
    handled: set[tuple[str, int]] = set()
    buffer: list[TraceRecord] = []

    def flush() -> None:
        if buffer:
            stage.write_shard(TRACES_SHARD, list(buffer), TraceRecord)
            buffer.clear()

    def on_result(c: Completion) -> None:
        key = (c.request_id, c.sample_index)
        idx = missing.get(c.request_id)
        if idx is None or not 0 <= c.sample_index < len(idx):
            log.warning("ignoring an unexpected completion %r #%d", c.request_id, c.sample_index)
            return
        if key in handled:  # already seen through on_result
            return
        handled.add(key)
        record = trace_from_completion(
            by_id[c.request_id],
            c,
            idx[c.sample_index],
            answer_fn=answer_fn,
            check_fn=check_fn,
            backend=backend.name,
            model=backend.model_id,
        )
        new[record.trace_id] = record
        buffer.append(record)
        if len(buffer) >= cfg.shard_size:
            flush()
        bar.update(1)
        if progress:
            progress(resumed + len(new), total_pairs)

    if progress:
        progress(resumed, total_pairs)
    # console bar; disable=None: off when stderr is not a TTY (logs, CI, Prefect workers)
    bar = tqdm(total=total_pairs, initial=resumed, desc="teacher", unit="trace", disable=None, dynamic_ncols=True)
    try:
        if requests:
            returned = backend.generate(requests, cfg.sampling, on_result=on_result)
            for c in returned:  # backends that do not call on_result (or skipped some)
                on_result(c)
            for pid, idx in missing.items():  # a backend that lost a sample is a failure too
                for k in range(len(idx)):
                    if (pid, k) not in handled:
                        on_result(
                            Completion(request_id=pid, sample_index=k, error="no completion returned by the backend")
                        )
    finally:
        try:
            flush()
        finally:
            bar.close()

    # -- outcome -----------------------------------------------------------------------------
    merged = {**latest, **new}
    traces = [merged[trace_id_for(pid, i)] for pid, i in wanted if trace_id_for(pid, i) in merged]
    failed = [t for t in traces if t.status != "ok"]
    counts = {
        "total": len(traces),
        "requested": n_requested,
        "resumed": resumed,
        "ok": len(traces) - len(failed),
        "failed": len(failed),
        "truncated": sum(1 for t in traces if t.truncated),
        "correct": sum(1 for t in traces if t.correct),
    }
    result = TraceRunResult(traces, counts, Counter(t.error or "unknown error" for t in failed))
    if traces and len(failed) / len(traces) > cfg.max_failure_rate:
        reason, times = result.failure_reasons.most_common(1)[0]
        raise TeacherFailureError(
            f"{len(failed)} of {len(traces)} teacher generations failed "
            f"(more than max_failure_rate={cfg.max_failure_rate}); most common error ({times}x): {reason}",
            result,
        )
    return result


def select_traces(traces: Sequence[TraceRecord], keep: str) -> tuple[list[TraceRecord], dict[str, int]]:
    """Filter traces for the dataset: ``keep="correct"`` keeps correct ones, ``"all"`` keeps every
    successful one (incorrect included). Failed traces are always dropped.

    Returns ``(kept, dropped_reasons)`` with reasons ``failed``, ``no_answer``, ``incorrect``.
    """
    if keep not in ("correct", "all"):
        raise ValueError(f"keep must be 'correct' or 'all', got {keep!r}")
    kept: list[TraceRecord] = []
    dropped: Counter = Counter()
    for t in traces:
        if t.status != "ok":
            dropped["failed"] += 1
        elif keep == "correct" and not t.correct:
            dropped["no_answer" if t.predicted_answer is None else "incorrect"] += 1
        else:
            kept.append(t)
    return kept, dict(dropped)


# ---------------------------------------------------------------------------------------------
# the stage


def teacher_prompt_config(cfg: PipelineConfig) -> TeacherConfig:
    """The teacher config with its prompt template filled in from the benchmark family if unset."""
    from rscaffold.evalsets.loaders import BENCHMARKS

    if cfg.teacher.prompt_template is not None:
        return cfg.teacher
    return cfg.teacher.model_copy(update={"prompt_template": BENCHMARKS[cfg.problems.format].prompt_template})


def run_teacher(
    cfg: PipelineConfig,
    fps: dict[str, str],
    problems: StageRef,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> StageRef:
    """Generate (or resume) the teacher traces of the train problems; write ``traces.parquet`` and
    ``kept_traces.parquet`` (``teacher.keep``)."""
    from rscaffold.evalsets.answers import extract_answer, is_correct
    from rscaffold.evalsets.loaders import BENCHMARKS
    from rscaffold.llm import create_backend

    sd, done = open_stage(cfg, "teacher", fps, force=force)
    if done:
        return done
    started = time.time()
    answer_type = BENCHMARKS[cfg.problems.format].answer_type
    numeric = BENCHMARKS[cfg.problems.format].numeric_answer
    teacher_cfg = teacher_prompt_config(cfg)
    train = read_problems(problems, "train")
    backend = create_backend(cfg.teacher.llm)
    try:
        result = generate_traces(
            train,
            backend,
            teacher_cfg,
            stage=sd,
            answer_fn=lambda text: extract_answer(text, answer_type, numeric=numeric),
            check_fn=lambda pred, gold: pred is not None and is_correct(pred, gold, answer_type),
            progress=progress,
        )
    finally:
        backend.close()
    kept, dropped = select_traces(result.traces, cfg.teacher.keep)
    write_records(sd.path / "traces.parquet", result.traces, TraceRecord)
    write_records(sd.path / "kept_traces.parquet", kept, TraceRecord)
    summary = {
        **result.counts,
        "kept": len(kept),
        "dropped": dropped,
        "failure_reasons": dict(result.failure_reasons),
    }
    return sd.finish(
        outputs={"traces": "traces.parquet", "kept_traces": "kept_traces.parquet"},
        config=cfg.teacher,
        inputs=stage_inputs(problems),
        summary=summary,
        started=started,
        code=stage_code_version("teacher"),
    )
