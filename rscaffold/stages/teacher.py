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
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from rscaffold import process_cache
from rscaffold.config import PipelineConfig, TeacherConfig, fingerprint_view, shard_size_for
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend
from rscaffold.llm.parsing import EMPTY_OUTPUT, RATE_LIMITED, clean_text, derive_seed, describe_error
from rscaffold.prompts import QUESTION_FIELD, fill_prompt
from rscaffold.records import ProblemRecord, TraceRecord
from rscaffold.stages.common import Progress, open_stage, stage_code_version, stage_dir, stage_inputs
from rscaffold.stages.declare import LOCAL_BACKENDS, Shards, Stage
from rscaffold.stages.problems import read_problems, train_part
from rscaffold.stages.requests import log_request_stats, request_cache, request_summary
from rscaffold.store import StageDir, StageRef, write_records

log = logging.getLogger(__name__)

TRACES_SHARD = "traces"

AnswerFn = Callable[[str], "str | None"]
CheckFn = Callable[["str | None", str], bool]
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Family:
    """How the teacher asks and checks the problems of one benchmark of a mix (``problems.mix``):
    its prompt template (None: ``teacher.prompt_template``) and answer extraction and check."""

    template: str | None
    answer_fn: AnswerFn
    check_fn: CheckFn


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


def build_messages(problem: ProblemRecord, cfg: TeacherConfig, template: str | None = None) -> list[dict[str, str]]:
    messages = []
    if cfg.system_prompt.strip():
        messages.append({"role": "system", "content": cfg.system_prompt})
    # The pipeline fills in the benchmark family's template (teacher_prompt_config, or the
    # problem's own family's in a mix: ``template``); filled by plain replacement of '{question}',
    # so other braces (\boxed{}) are literal.
    template = cfg.prompt_template or template or QUESTION_FIELD
    messages.append({"role": "user", "content": fill_prompt(template, problem.question)})
    return messages


def build_request(
    problem: ProblemRecord, cfg: TeacherConfig, sample_index: int = 0, *, template: str | None = None
) -> ChatRequest:
    """The chat request for one (problem, sample): ``request_id`` is the trace id and the seed is
    derived from (run seed, problem id, sample index), the same for every backend, so a resumed
    or re-run request samples what the first one did."""
    return ChatRequest(
        request_id=trace_id_for(problem.problem_id, sample_index),
        messages=build_messages(problem, cfg, template),
        seed=derive_seed(cfg.sampling.seed, problem.problem_id, sample_index),
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
        source=problem.source,
        source_id=problem.source_id,
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


@dataclass(frozen=True)
class TraceWork:
    """One (problem, sample) the teacher answers; ``index`` is its place in the stage's work order."""

    index: int
    problem: ProblemRecord
    sample_index: int

    @property
    def trace_id(self) -> str:
        return trace_id_for(self.problem.problem_id, self.sample_index)


def work_items(problems: Sequence[ProblemRecord], samples: int) -> list[TraceWork]:
    """Every (problem, sample) in a fixed order: problems as given (first of a duplicated id),
    samples 0..n-1 of each."""
    unique = _unique_problems(problems)
    pairs = [(p, i) for p in unique for i in range(samples)]
    return [TraceWork(k, p, i) for k, (p, i) in enumerate(pairs)]


def shard_key(items: Sequence[TraceWork]) -> str:
    """A shard's name: the (inclusive) range of work indexes it holds."""
    return f"{items[0].index:06d}-{items[-1].index:06d}"


def shard_keys(problems: Sequence[ProblemRecord], cfg: TeacherConfig) -> list[str]:
    """The keys of every shard of the teacher's work, in order."""
    items, size = work_items(problems, cfg.samples_per_problem), shard_size_for(cfg.shard_size, cfg.llm.backend)
    return [shard_key(items[k : k + size]) for k in range(0, len(items), size)]


def _overlapping(keys: Collection[str], shards: Sequence[Sequence[TraceWork]]) -> set[str]:
    """The shard keys (index ranges ``<first>-<last>``) that hold any item of ``shards``."""
    ranges = [(s[0].index, s[-1].index) for s in shards if s]
    out = set()
    for key in keys:
        lo, _, hi = key.partition("-")
        try:
            a, b = int(lo), int(hi)
        except ValueError:
            continue
        if any(a <= hi_ and lo_ <= b for lo_, hi_ in ranges):
            out.add(key)
    return out


class TeacherUnavailableError(RuntimeError):
    """The teacher could not be reached: many requests in a row failed with transport errors."""


def generate_traces(
    problems: list[ProblemRecord],
    backend: LLMBackend,
    cfg: TeacherConfig,
    *,
    stage: StageDir,
    answer_fn: AnswerFn,
    check_fn: CheckFn,
    progress: ProgressFn | None = None,
    only: Collection[str] | None = None,
    families: Mapping[str, Family] | None = None,
) -> TraceRunResult:
    """Generate (or resume) the teacher traces of ``problems``; see the module doc.

    The work (every problem x sample) is cut into shards of ``cfg.shard_size`` consecutive items;
    a shard is persisted as ``traces-<first>-<last>.parquet`` (indexes in the work order) once its
    requests are answered. A re-run reads the shards back and asks only for the items without an
    ``ok`` trace. A backend that is not batch-invariant (a local engine) gets one call per shard,
    so a resumed shard is decoded in exactly the batches an uninterrupted run would use; the
    others get every pending request at once.

    Raises :class:`TeacherFailureError` (after persisting) when the failed fraction of all traces
    exceeds ``cfg.max_failure_rate``, and :class:`TeacherUnavailableError` when requests keep
    failing with transport errors (the endpoint is down). Exceptions from the backend itself (not
    per-request failures, which backends turn into error completions) propagate after the finished
    traces have been flushed.

    ``only``: generate just the shards with these keys (:func:`shard_keys`; one shard task of a
    stage fanned out over workers); the failure threshold is then left to the whole stage.

    ``families``: per problem ``source``, its prompt template and answer functions (a mix of
    benchmarks); a problem of a source not listed is an error. None: ``cfg``'s template and
    ``answer_fn`` / ``check_fn`` for every problem.
    """
    if families is not None:
        unknown = sorted({p.source for p in problems} - set(families))
        if unknown:
            raise ValueError(f"problems of benchmark(s) {unknown} but no prompt and answer check for them")
    items = work_items(problems, cfg.samples_per_problem)
    by_trace = {w.trace_id: w for w in items}
    size = shard_size_for(cfg.shard_size, cfg.llm.backend)
    shards = [items[k : k + size] for k in range(0, len(items), size)]
    shard_of = {w.trace_id: k for k, shard in enumerate(shards) for w in shard}
    if cfg.sampling.temperature == 0 and cfg.samples_per_problem > 1:
        log.warning(
            "teacher: greedy decoding (temperature 0) gives %d identical samples per problem", cfg.samples_per_problem
        )

    # -- resume ---------------------------------------------------------------------------
    records: dict[str, TraceRecord] = {}
    # A shard task reads only the shards over its own items (every finished shard of the stage,
    # for each of n shard tasks, would be n^2 reads); older shards of another size are among them.
    mine = (
        None
        if only is None
        else _overlapping(stage.shard_keys(TRACES_SHARD), [s for s in shards if shard_key(s) in only])
    )
    for t in stage.read_shards(TRACES_SHARD, TraceRecord, keys=mine):
        if t.trace_id in by_trace and (t.status == "ok" or t.trace_id not in records):
            records[t.trace_id] = t  # an ok trace wins over a failed one
    finished = {tid for tid, t in records.items() if t.status == "ok"}
    resumed = len(finished)
    pending = [
        [w for w in shard if w.trace_id not in finished] if only is None or shard_key(shard) in only else []
        for shard in shards
    ]
    n_requested = sum(len(p) for p in pending)
    if resumed:
        log.info("teacher: resuming, %d of %d traces already done; %d to generate", resumed, len(items), n_requested)

    # -- generate, persisting each shard as soon as it is answered --------------------------------
    new: dict[str, TraceRecord] = {}
    waiting = {k: {w.trace_id for w in p} for k, p in enumerate(pending) if p}
    breaker = _TransportBreaker(limit=max(8, 2 * getattr(getattr(backend, "cfg", None), "concurrency", 4)))

    def flush(k: int) -> None:
        rows = [new.get(w.trace_id) or records.get(w.trace_id) for w in shards[k]]
        stage.write_shard(TRACES_SHARD, [r for r in rows if r is not None], TraceRecord, key=shard_key(shards[k]))

    def on_result(c: Completion) -> None:
        w = by_trace.get(c.request_id)
        k = shard_of.get(c.request_id)
        if w is None or k is None or c.request_id not in waiting.get(k, ()):
            log.warning("ignoring an unexpected completion %r #%d", c.request_id, c.sample_index)
            return
        fam = families[w.problem.source] if families is not None else None
        record = trace_from_completion(
            w.problem,
            c,
            w.sample_index,
            answer_fn=fam.answer_fn if fam else answer_fn,
            check_fn=fam.check_fn if fam else check_fn,
            backend=backend.name,
            model=backend.model_id,
        )
        new[record.trace_id] = record
        waiting[k].discard(c.request_id)
        if not waiting[k]:
            del waiting[k]
            flush(k)
        bar.update(1)
        if progress:
            progress(resumed + len(new), len(items))
        breaker.observe(c)

    if progress:
        progress(resumed, len(items))
    # console bar; disable=None: off when stderr is not a TTY (logs, CI, Prefect workers)
    bar = tqdm(total=len(items), initial=resumed, desc="teacher", unit="trace", disable=None, dynamic_ncols=True)
    calls = [[w for p in pending for w in p]] if backend.capabilities.batch_invariant else [p for p in pending if p]
    try:
        for call in calls:
            if not call:
                continue
            requests = [
                build_request(
                    w.problem, cfg, w.sample_index, template=families[w.problem.source].template if families else None
                )
                for w in call
            ]
            returned = backend.generate(requests, cfg.sampling, on_result=on_result)
            for c in returned:  # backends that do not call on_result (or skipped some)
                if c.request_id in by_trace and c.request_id not in new:
                    on_result(c)
            for w in call:  # a backend that lost a request is a failure too
                if w.trace_id not in new:
                    on_result(Completion(request_id=w.trace_id, error="no completion returned by the backend"))
    finally:
        try:
            for k in sorted(waiting):  # shards cut short by an error keep what they have
                if any(w.trace_id in new for w in shards[k]):
                    flush(k)
        finally:
            bar.close()

    # -- outcome -----------------------------------------------------------------------------
    merged = {**records, **new}
    traces = [merged[w.trace_id] for w in items if w.trace_id in merged]
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
    if only is None and traces and len(failed) / len(traces) > cfg.max_failure_rate:
        reason, times = result.failure_reasons.most_common(1)[0]
        raise TeacherFailureError(
            f"{len(failed)} of {len(traces)} teacher generations failed "
            f"(more than max_failure_rate={cfg.max_failure_rate}); most common error ({times}x): {reason}",
            result,
        )
    return result


class _TransportBreaker:
    """Stops a run whose requests keep failing with transport errors (the endpoint is down):
    after ``limit`` in a row, the client's own retries included, asking the rest is futile."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def observe(self, c: Completion) -> None:
        if c.error_kind != "transport":
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            if (c.error or "").startswith(RATE_LIMITED):
                raise TeacherUnavailableError(
                    f"the teacher is rate-limiting this run: {self.in_a_row} requests in a row were refused with "
                    f"HTTP 429 after the client's retries (last: {c.error}); the finished traces are saved, "
                    "re-run later or lower teacher.llm.concurrency"
                )
            raise TeacherUnavailableError(
                f"the teacher is unreachable: {self.in_a_row} requests in a row failed with transport errors "
                f"(last: {c.error}); the finished traces are saved, re-run when the endpoint is back"
            )


# ---------------------------------------------------------------------------------------------
# the stage


def teacher_prompt_config(cfg: PipelineConfig) -> TeacherConfig:
    """The teacher config with its prompt template filled in from the benchmark family if unset."""
    from rscaffold.evalsets.loaders import benchmark_for

    if cfg.teacher.prompt_template is not None or cfg.problems.mix:  # a mix: each problem's own (teacher_families)
        return cfg.teacher
    template = benchmark_for(cfg.problems.format, cfg.problems.custom).prompt_template
    return cfg.teacher.model_copy(update={"prompt_template": template})


def _bench_fns(bench: Any) -> tuple[AnswerFn, CheckFn]:
    from rscaffold.evalsets.answers import extract_answer, is_correct

    answer_type, numeric = bench.answer_type, bench.numeric_answer
    return (
        lambda text: extract_answer(text, answer_type, numeric=numeric),
        lambda pred, gold: pred is not None and is_correct(pred, gold, answer_type),
    )


def _answer_fns(cfg: PipelineConfig) -> tuple[AnswerFn, CheckFn]:
    from rscaffold.evalsets.loaders import benchmark_for

    return _bench_fns(benchmark_for(cfg.problems.format, cfg.problems.custom))


def teacher_families(cfg: PipelineConfig) -> dict[str, Family] | None:
    """Per benchmark of a mix (``problems.mix``): its family's prompt template (unless
    ``teacher.prompt_template`` is set) and answer check; None for a single benchmark."""
    from rscaffold.evalsets.loaders import problem_benchmarks

    if not cfg.problems.mix:
        return None
    return {name: Family(b.prompt_template, *_bench_fns(b)) for name, b in problem_benchmarks(cfg.problems).items()}


def teacher_shards(cfg: PipelineConfig, problems: StageRef) -> list[str]:
    """The keys of the teacher's shards (for a stage fanned out as one task per shard)."""
    return shard_keys(read_problems(problems, "train"), teacher_prompt_config(cfg))


def run_teacher_shard(cfg: PipelineConfig, fps: dict[str, str], problems: StageRef, *, key: str) -> dict[str, Any]:
    """Generate one shard of the teacher stage into its work directory (one task of a fanned-out
    stage; :func:`run_teacher` then assembles and publishes). The model is loaded once per worker
    process and kept for its next shard; the shard's own lock keeps two workers off one shard."""
    from rscaffold.llm import create_backend

    sd = stage_dir(cfg, "teacher", fps)

    sd.prepare()
    answer_fn, check_fn = _answer_fns(cfg)
    with sd.shard_lock(TRACES_SHARD, key):
        backend = create_backend(cfg.teacher.llm, cache=request_cache(cfg), shared=True)
        try:
            result = generate_traces(
                read_problems(problems, "train"),
                backend,
                teacher_prompt_config(cfg),
                stage=sd,
                answer_fn=answer_fn,
                check_fn=check_fn,
                only={key},
                families=teacher_families(cfg),
            )
        finally:
            backend.close()
    return {
        "key": key,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "generated": result.counts["requested"],
        "loads": process_cache.loads(),
        "requests": request_summary(backend, cfg.teacher.llm),
    }


def run_teacher(
    cfg: PipelineConfig,
    fps: dict[str, str],
    problems: StageRef,
    *,
    force: bool = False,
    fresh: bool = False,
    progress: Progress | None = None,
) -> StageRef:
    """Generate (or resume) the teacher traces of the train problems; write ``traces.parquet``.

    Every request goes through the request cache (``run.request_cache``), so a re-run whose
    fingerprint changed for any reason re-serves every request answered before. Which traces go on
    (``teacher.keep``) is decided by the stages after this one, so changing it re-runs nothing here.
    """
    from rscaffold.llm import create_backend

    with open_stage(cfg, "teacher", fps, force=force, fresh=fresh) as (sd, done):
        if done:
            return done
        started = time.time()
        answer_fn, check_fn = _answer_fns(cfg)
        teacher_cfg = teacher_prompt_config(cfg)
        train = read_problems(problems, "train")
        backend = create_backend(cfg.teacher.llm, cache=request_cache(cfg))
        try:
            result = generate_traces(
                train,
                backend,
                teacher_cfg,
                stage=sd,
                answer_fn=answer_fn,
                check_fn=check_fn,
                progress=progress,
                families=teacher_families(cfg),
            )
        finally:
            backend.close()
            log_request_stats("teacher", backend, cfg.teacher.llm)
        write_records(sd.work / "traces.parquet", result.traces, TraceRecord)
        summary = {
            **result.counts,
            "failure_reasons": dict(result.failure_reasons),
            "requests": request_summary(backend, cfg.teacher.llm),
        }
        return sd.finish(
            outputs={"traces": "traces.parquet"},
            config=cfg.teacher,
            inputs=stage_inputs(problems),
            summary=summary,
            started=started,
            code=stage_code_version("teacher"),
        )


def _fingerprint(cfg: PipelineConfig, fps: dict[str, str]) -> list[Any]:
    # Only the train problems are read (``problems.limit_eval`` does not concern the teacher), and
    # ``teacher.keep`` decides what the later stages take, so it enters the labeling fingerprint.
    view = fingerprint_view(cfg.teacher)
    view.pop("keep")
    return [train_part(cfg), view, stage_code_version("teacher")]


STAGE = Stage(
    name="teacher",
    run=run_teacher,
    description="Generate teacher traces (sharded, resumable).",
    upstream=("problems",),
    fingerprint=_fingerprint,
    outputs=("traces",),
    shards=Shards(keys=teacher_shards, run=run_teacher_shard),
    loads_model=lambda cfg: cfg.teacher.llm.backend in LOCAL_BACKENDS,
    run_name=lambda cfg: f"teacher[{cfg.teacher.llm.backend}]",
)
