"""Labeling traces, the paper's two stages together.

1. *keyword pre-label* (:func:`~rscaffold.labeling.keywords.keyword_prelabel`): a step whose first
   words are a cue of the taxonomy gets that cue's category;
2. *LLM validation* (:class:`Labeler`): one request per trace lists all its steps with their
   pre-labels; the LLM confirms or corrects each one and labels the steps without a cue. An answer
   that cannot be parsed is retried (with the parser's error), then falls back to
   :func:`~rscaffold.labeling.keywords.fallback_label`. A trace longer than one request holds is
   labeled in windows of consecutive steps (:func:`~rscaffold.labeling.prompts.plan_windows`),
   merged in order; a window that fails falls back alone.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

from rscaffold.config import BackendConfig, LabelingConfig, SamplingConfig
from rscaffold.labeling.keywords import keyword_prelabel
from rscaffold.labeling.parsing import LabelParseError, ParsedLabel, parse_labels
from rscaffold.labeling.prompts import (
    AnswerFormat,
    Window,
    answer_budget,
    answer_format_for,
    build_label_request,
    build_retry_request,
    plan_windows,
    prompt_fixed_text,
    window_context,
)
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend
from rscaffold.llm.parsing import RATE_LIMITED
from rscaffold.records import LabeledStepRecord

log = logging.getLogger(__name__)


Source = Literal["llm", "keyword", "fallback"]


class TraceSteps(NamedTuple):
    """What :func:`label_traces` needs of one trace (a plain 4-tuple works too)."""

    trace_id: str
    problem_id: str
    question: str
    steps: Sequence[str]


@dataclass
class LabelStats:
    """Counters of one labeling run."""

    traces: int = 0
    steps: int = 0
    llm_ok: int = 0  # traces labeled by the LLM (first answer or a retry)
    retried: int = 0  # traces that needed at least one retry
    fallback_traces: int = 0  # traces the LLM failed on, in one window or more (fallback labels there)
    windows: int = 0  # label requests (a trace longer than one request holds: one per window of steps)
    windowed_traces: int = 0  # traces labeled in more than one window
    fallback_windows: int = 0  # windows the LLM failed on
    cut_steps: int = 0  # steps longer than a whole request holds, shown cut (the record keeps the text)
    keyword_steps: int = 0  # steps with a keyword pre-label
    prelabel_checked: int = 0  # LLM-labeled steps that had a pre-label
    prelabel_agreed: int = 0  # ... and the LLM kept it
    errors: list[str] = field(default_factory=list)  # last parse/backend error of each fallback trace

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _TraceLabels:
    """The LLM labels of one trace's steps (None: its window failed), and its windows."""

    labels: list[ParsedLabel | None]
    window_of: list[int]  # per step, the window that labels it
    windows: int


class LabelerUnavailableError(RuntimeError):
    """The labeler's endpoint could not be reached (transport errors after the client's retries)."""


class StructuredOutputIgnoredError(RuntimeError):
    """The labeler's server answers requests that carry a JSON schema with text that does not
    follow it: it ignores structured output (``response_format``)."""


def describe_endpoint(backend: Any) -> str:
    """``model <id> at <url>`` of a backend (its config's ``base_url``), for error messages."""
    cfg = getattr(backend, "cfg", None)
    url = getattr(cfg, "base_url", None) or "the OPENAI_BASE_URL endpoint"
    return f"model {getattr(backend, 'model_id', '?')!r} at {url}"


def conforms_to_json(comp: Completion) -> bool:
    """Whether an answer to a request with a JSON schema is a JSON object (what a server that
    honours ``response_format`` returns; of an answer cut at the token limit, its start)."""
    if comp.truncated:
        return comp.text.lstrip().startswith("{")
    try:
        return isinstance(json.loads(comp.text), dict)
    except ValueError:
        return False


class Labeler:
    """Labels traces: keyword pre-labels, then (method ``llm``) one batched LLM call per pass."""

    def __init__(
        self,
        tax: Taxonomy,
        backend: LLMBackend | None,
        sampling: SamplingConfig,
        *,
        cfg: LabelingConfig,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        self.tax = tax
        # the labeler's own tokenizer where it is at hand (labeler_token_counter), else an
        # estimate at cfg.chars_per_token: what windows are sized by
        self.count_tokens = count_tokens
        self.backend = backend
        self.sampling = sampling
        self.cfg = cfg
        self.stats = LabelStats()

    @property
    def uses_llm(self) -> bool:
        return self.cfg.method == "llm" and self.backend is not None

    def label(self, traces: Sequence[tuple[str, str, str, Sequence[str]]]) -> Iterator[list[LabeledStepRecord]]:
        """Yield one list of records per trace, in input order."""
        items = [TraceSteps(*t) for t in traces]
        dups = sorted(k for k, c in Counter(t.trace_id for t in items).items() if c > 1)
        if dups:
            raise ValueError(f"trace ids must be unique within one call: {', '.join(dups[:5])}")
        pre = [[keyword_prelabel(s, self.tax) for s in t.steps] for t in items]
        for t, p in zip(items, pre):
            self.stats.traces += 1
            self.stats.steps += len(t.steps)
            self.stats.keyword_steps += sum(1 for sig, _ in p if sig is not None)
        if self.cfg.method == "llm" and self.backend is None:
            log.warning("labeling method 'llm' without a backend: using keyword labels")
        labels: dict[int, _TraceLabels] = self._llm_labels(items, pre) if self.uses_llm else {}
        for k, (t, p) in enumerate(zip(items, pre)):
            yield self._records(t, p, labels.get(k))

    def _records(
        self, t: TraceSteps, pre: list[tuple[str | None, str | None]], got: _TraceLabels | None
    ) -> list[LabeledStepRecord]:
        out = []
        source: Source
        for i, (step, (sig, cue)) in enumerate(zip(t.steps, pre)):
            parsed = got.labels[i] if got is not None else None
            if parsed is not None:
                signal, source, rationale = parsed.signal, "llm", parsed.rationale
            else:
                signal = sig or self.tax.default_signal
                source = "keyword" if sig is not None else "fallback"
                if self.uses_llm:
                    source = "fallback"  # the LLM failed on this step's window
                rationale = None
            out.append(
                LabeledStepRecord(
                    trace_id=t.trace_id,
                    problem_id=t.problem_id,
                    step_index=i,
                    text=step,
                    prelabel=sig,
                    cue=cue,
                    signal=signal,
                    source=source,
                    rationale=rationale,
                    window=got.window_of[i] if got is not None else 0,
                    windows=got.windows if got is not None else 0,
                )
            )
        return out

    def _windows(self, t: TraceSteps, pre: list[str | None], fmt: AnswerFormat) -> list[Window]:
        """The windows of consecutive steps one trace is labeled in (one, when it fits a request)."""
        cfg, with_rat = self.cfg, self.cfg.with_rationale
        n = len(t.steps)
        count = self.count_tokens or (lambda text: math.ceil(len(text) / cfg.chars_per_token))
        fixed = prompt_fixed_text(
            t.question,
            self.tax,
            n_steps=n,
            with_rationale=with_rat,
            context=window_context(t.steps, n, cfg.window_context_chars),
        )
        spans = plan_windows(
            t.steps,
            pre,
            fixed_tokens=count(fixed),
            context_tokens=cfg.context_tokens,
            max_steps=cfg.max_window_steps,
            answer_tokens=lambda m: answer_budget(m, fmt, with_rationale=with_rat, base=self.sampling.max_new_tokens),
            count_tokens=count,
        )
        return [
            Window(
                j,
                len(spans),
                a,
                b,
                n,
                context=window_context(t.steps, a, cfg.window_context_chars) if len(spans) > 1 else "",
                step_limit=limit,
            )
            for j, (a, b, limit) in enumerate(spans)
        ]

    def _llm_labels(
        self, items: list[TraceSteps], pre: list[list[tuple[str | None, str | None]]]
    ) -> dict[int, _TraceLabels]:
        assert self.backend is not None
        with_rat = self.cfg.with_rationale
        base = self.sampling.max_new_tokens
        caps = self.backend.capabilities
        fmt: dict[tuple[int, int], AnswerFormat] = {}
        windows: dict[tuple[int, int], Window] = {}
        pending: dict[tuple[int, int], ChatRequest] = {}
        out: dict[int, _TraceLabels] = {}
        for k, t in enumerate(items):
            if not t.steps:
                continue
            prelabels = [s for s, _ in pre[k]]
            if caps.line_choices and not caps.json_schema and not with_rat:
                # The backend constrains decoding to valid answer lines (and cannot to the JSON
                # schema): always well formed.
                trace_fmt: AnswerFormat = "lines"
            else:  # JSON when the answer of a (largest) window fits the base budget
                trace_fmt = answer_format_for(min(len(t.steps), self.cfg.max_window_steps), base, with_rat)
            plan = self._windows(t, prelabels, trace_fmt)
            out[k] = _TraceLabels(
                [None] * len(t.steps), [w.index for w in plan for _ in range(w.start, w.end)], len(plan)
            )
            self.stats.windows += len(plan)
            self.stats.windowed_traces += len(plan) > 1
            self.stats.cut_steps += sum(1 for w in plan if w.step_limit is not None)
            for w in plan:
                key = (k, w.index)
                windows[key] = w
                fmt[key] = trace_fmt
                pending[key] = build_label_request(
                    t.trace_id,
                    t.question,
                    list(t.steps[w.start : w.end]),
                    prelabels=prelabels[w.start : w.end],
                    tax=self.tax,
                    with_rationale=with_rat,
                    answer_format=fmt[key],
                    window=w,
                )
        done: dict[tuple[int, int], list[ParsedLabel]] = {}
        last_error: dict[tuple[int, int], str] = {}
        retried: set[int] = set()
        for attempt in range(self.cfg.retries_on_invalid + 1):
            if not pending:
                break
            if attempt == 1:
                retried = {k for k, _ in pending}
            budgets = {
                key: answer_budget(windows[key].end - windows[key].start, fmt[key], with_rationale=with_rat, base=base)
                for key in pending
            }
            results = self._generate(list(pending.values()), [budgets[key] for key in pending])
            retry: dict[tuple[int, int], ChatRequest] = {}
            for key, req in pending.items():
                w = windows[key]
                n = w.end - w.start
                comp = results.get(req.request_id) or Completion(req.request_id, error="no completion returned")
                if not comp.ok:
                    error = f"backend error: {comp.error}"
                else:
                    try:
                        done[key] = parse_labels(comp.text, n, self.tax)
                        continue
                    except LabelParseError as err:
                        error = str(err)
                        if comp.truncated:
                            fmt[key] = "lines"  # the answer did not fit: ask for the compact form
                last_error[key] = error
                retry[key] = build_retry_request(
                    req,
                    comp,
                    error,
                    n_steps=n,
                    tax=self.tax,
                    with_rationale=with_rat,
                    attempt=attempt + 1,
                    answer_format=fmt[key],
                )
            pending = retry
        self.stats.retried += len(retried)
        failed_traces = sorted({k for k, _ in pending})
        for k in failed_traces:
            keys = sorted(key for key in pending if key[0] == k)
            where = (
                ""
                if out[k].windows == 1
                else f" (window(s) {', '.join(str(j + 1) for _, j in keys)} of {out[k].windows})"
            )
            error = "; ".join(last_error.get(key, "") for key in keys)
            self.stats.fallback_traces += 1
            self.stats.fallback_windows += len(keys)
            self.stats.errors.append(f"{items[k].trace_id}{where}: {error}")
            log.warning("labeling failed for trace %s%s, using fallback labels: %s", items[k].trace_id, where, error)
        for (k, j), parsed in done.items():
            w = windows[(k, j)]
            for i, lab in enumerate(parsed):
                out[k].labels[w.start + i] = lab
        for k, got in out.items():
            if k not in failed_traces:
                self.stats.llm_ok += 1
            for (sig, _), lab in zip(pre[k], got.labels):
                if sig is not None and lab is not None:
                    self.stats.prelabel_checked += 1
                    self.stats.prelabel_agreed += int(lab.signal == sig)
        return out

    def _conformance_check(self, requests: list[ChatRequest]):
        """A result callback that stops the run (raises :class:`StructuredOutputIgnoredError`)
        after ``stop_after_nonconforming`` answers in a row that ignore the JSON schema they
        were sent with, on a backend that says it enforces one."""
        limit = self.cfg.stop_after_nonconforming
        assert self.backend is not None
        if not limit or not self.backend.capabilities.json_schema:
            return None
        with_schema = {r.request_id for r in requests if r.json_schema}
        in_a_row = 0

        def check(comp: Completion) -> None:
            nonlocal in_a_row
            if comp.request_id not in with_schema or not comp.ok:
                return
            in_a_row = 0 if conforms_to_json(comp) else in_a_row + 1
            if in_a_row >= limit:
                raise StructuredOutputIgnoredError(
                    f"the labeler's server ignores structured output: {in_a_row} answers in a row to requests "
                    f"with a JSON schema (response_format json_schema) are not JSON, from "
                    f"{describe_endpoint(self.backend)} (e.g. {comp.text[:80]!r}). Serve the labeler from a "
                    "server that enforces response_format (e.g. vLLM, or a hosted API with structured "
                    "outputs), or a local labeler that constrains decoding itself (labeling.llm.backend: "
                    "transformers or vllm); "
                    "labeling.stop_after_nonconforming: 0 goes on with fallback labels"
                )

        return check

    def _generate(self, requests: list[ChatRequest], budgets: list[int]) -> dict[str, Completion]:
        """Run ``requests``, one batch per answer budget (``max_new_tokens``), in order."""
        out: dict[str, Completion] = {}
        for budget in sorted(set(budgets)):
            batch = [r for r, b in zip(requests, budgets) if b == budget]
            sampling = (
                self.sampling
                if budget == self.sampling.max_new_tokens
                else self.sampling.model_copy(update={"max_new_tokens": budget})
            )
            out.update(self._generate_batch(batch, sampling))
        return out

    def _generate_batch(self, requests: list[ChatRequest], sampling: SamplingConfig) -> dict[str, Completion]:
        assert self.backend is not None
        # A backend reports a bad request in its Completion; an exception is a systemic failure
        # (server down, out of memory) and propagates, so no shard is filled with fallback labels.
        # The same holds for a labeler that cannot be reached: its transport errors (after the
        # client's retries) are not a trace the LLM failed on, and must not become fallback labels.
        completions = self.backend.generate(requests, sampling, on_result=self._conformance_check(requests))
        unreachable = [c for c in completions if c.error_kind == "transport"]
        if unreachable:
            if all((c.error or "").startswith(RATE_LIMITED) for c in unreachable):
                raise LabelerUnavailableError(
                    f"the labeler is rate-limiting this run: {len(unreachable)} of {len(requests)} requests were "
                    f"refused with HTTP 429 after the client's retries (e.g. {unreachable[0].error}); the labels "
                    "made so far are saved, re-run later or lower the labeler's concurrency"
                )
            raise LabelerUnavailableError(
                f"the labeler is unreachable: {len(unreachable)} of {len(requests)} requests failed with "
                f"transport errors (e.g. {unreachable[0].error}) from {describe_endpoint(self.backend)}; the "
                "labels made so far are saved, re-run when the endpoint is back"
            )
        out: dict[str, Completion] = {}
        for c in completions:
            out.setdefault(c.request_id, c)  # n=1: the first sample
        return out


def label_traces(
    traces: Sequence[tuple[str, str, str, Sequence[str]]],
    tax: Taxonomy,
    backend: LLMBackend | None,
    *,
    sampling: SamplingConfig,
    cfg: LabelingConfig,
    stats: LabelStats | MutableMapping[str, int] | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> Iterator[list[LabeledStepRecord]]:
    """Label ``(trace_id, problem_id, question, steps)`` tuples; yield one record list per trace.

    Method ``keyword`` (or no backend): keyword pre-label, else the default signal. Method ``llm``:
    one batched ``generate`` call for all traces, one for each retry round. ``stats`` receives the
    counters: a :class:`LabelStats` is updated in place; a mapping (e.g. a ``Counter``) gets the
    numeric counters added when the iteration ends. ``count_tokens``: the labeler's token count of
    a text (:func:`labeler_token_counter`), which sizes the windows of long traces.
    """
    labeler = Labeler(tax, backend, sampling, cfg=cfg, count_tokens=count_tokens)
    if isinstance(stats, LabelStats):
        labeler.stats = stats
    try:
        yield from labeler.label(traces)
    finally:
        if stats is not None and not isinstance(stats, LabelStats):
            for key, value in labeler.stats.as_dict().items():
                if isinstance(value, int):
                    stats[key] = stats.get(key, 0) + value


def labeler_token_counter(llm: BackendConfig) -> Callable[[str], int] | None:
    """Token counting with the labeler's own tokenizer when it is on this machine (a local
    transformers or vLLM model, or ``tokenizer``); None otherwise (an OpenAI-compatible server, a
    hub id not in the local cache): windows are then sized at ``labeling.chars_per_token``."""
    if llm.backend == "openai" and not llm.tokenizer:
        return None
    tok = _local_tokenizer(llm.tokenizer or llm.model)
    if tok is None:
        return None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=4)
def _local_tokenizer(name: str) -> Any:
    """The tokenizer of a local model directory (or one in the hub cache), once per process."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: estimate instead
        log.info("labeling: no local tokenizer for %s (%s); windows sized by characters", name, err)
        return None


def labeler_context_limit(llm: BackendConfig) -> int | None:
    """The labeler model's own context window (``max_position_embeddings`` of its config) when the
    model is on this machine; None otherwise (an OpenAI-compatible server, a hub id not cached)."""
    if llm.backend == "openai":
        return None
    return _local_context_limit(llm.model)


@functools.lru_cache(maxsize=4)
def _local_context_limit(name: str) -> int | None:
    try:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(name, local_files_only=True)
        limit = getattr(conf.get_text_config(), "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 - unknown: no check
        return None
    return int(limit) if isinstance(limit, int) and limit > 0 else None


_WARNED: set[tuple[str, int]] = set()


def warn_context_larger_than_model(llm: BackendConfig, cfg: LabelingConfig) -> int | None:
    """Warn when ``labeling.context_tokens`` is larger than the local labeler model's own context
    window: windows sized by it would send requests the model cannot hold. Returns that window."""
    limit = labeler_context_limit(llm)
    if limit is not None and limit < cfg.context_tokens and (llm.model, cfg.context_tokens) not in _WARNED:
        _WARNED.add((llm.model, cfg.context_tokens))  # once per process, not once per shard
        log.warning(
            "labeling.context_tokens=%d is larger than the labeler model's context window (%s: %d tokens): "
            "long traces' label requests will not fit it; set labeling.context_tokens to %d or less",
            cfg.context_tokens,
            llm.model,
            limit,
            limit,
        )
    return limit
