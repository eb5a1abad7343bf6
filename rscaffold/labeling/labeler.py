"""Labeling traces, the paper's two stages together.

1. *keyword pre-label* (:func:`~rscaffold.labeling.keywords.keyword_prelabel`): a step whose first
   words are a cue of the taxonomy gets that cue's category;
2. *LLM validation* (:class:`Labeler`): one request per trace lists all its steps with their
   pre-labels; the LLM confirms or corrects each one and labels the steps without a cue. An answer
   that cannot be parsed is retried (with the parser's error), then falls back to
   :func:`~rscaffold.labeling.keywords.fallback_label`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

from rscaffold.config import LabelingConfig, SamplingConfig
from rscaffold.labeling.keywords import keyword_prelabel
from rscaffold.labeling.parsing import LabelParseError, ParsedLabel, parse_labels
from rscaffold.labeling.prompts import (
    AnswerFormat,
    answer_format_for,
    build_label_request,
    build_retry_request,
)
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend
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
    fallback_traces: int = 0  # traces the LLM failed on (fallback labels)
    keyword_steps: int = 0  # steps with a keyword pre-label
    prelabel_checked: int = 0  # LLM-labeled steps that had a pre-label
    prelabel_agreed: int = 0  # ... and the LLM kept it
    errors: list[str] = field(default_factory=list)  # last parse/backend error of each fallback trace

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    ) -> None:
        self.tax = tax
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
        labels: dict[int, list[ParsedLabel]] = self._llm_labels(items, pre) if self.uses_llm else {}
        for k, (t, p) in enumerate(zip(items, pre)):
            yield self._records(t, p, labels.get(k))

    def _records(
        self, t: TraceSteps, pre: list[tuple[str | None, str | None]], parsed: list[ParsedLabel] | None
    ) -> list[LabeledStepRecord]:
        out = []
        source: Source
        for i, (step, (sig, cue)) in enumerate(zip(t.steps, pre)):
            if parsed is not None:
                signal, source, rationale = parsed[i].signal, "llm", parsed[i].rationale
            else:
                signal = sig or self.tax.default_signal
                source = "keyword" if sig is not None else "fallback"
                if self.uses_llm:
                    source = "fallback"  # the LLM failed on this trace
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
                )
            )
        return out

    def _llm_labels(
        self, items: list[TraceSteps], pre: list[list[tuple[str | None, str | None]]]
    ) -> dict[int, list[ParsedLabel]]:
        assert self.backend is not None
        with_rat = self.cfg.with_rationale
        fmt: dict[int, AnswerFormat] = {}
        pending: dict[int, ChatRequest] = {}
        for k, t in enumerate(items):
            if not t.steps:
                continue
            caps = self.backend.capabilities
            if caps.line_choices and not caps.json_schema and not with_rat:
                # The backend constrains decoding to valid answer lines (and cannot to the JSON
                # schema): always well formed.
                fmt[k] = "lines"
            else:
                fmt[k] = answer_format_for(len(t.steps), self.sampling.max_new_tokens, with_rat)
            pending[k] = build_label_request(
                t.trace_id,
                t.question,
                list(t.steps),
                prelabels=[s for s, _ in pre[k]],
                tax=self.tax,
                with_rationale=with_rat,
                answer_format=fmt[k],
            )
        done: dict[int, list[ParsedLabel]] = {}
        last_error: dict[int, str] = {}
        for attempt in range(self.cfg.retries_on_invalid + 1):
            if not pending:
                break
            if attempt == 1:
                self.stats.retried += len(pending)
            results = self._generate(list(pending.values()))
            retry: dict[int, ChatRequest] = {}
            for k, req in pending.items():
                n = len(items[k].steps)
                comp = results.get(req.request_id) or Completion(req.request_id, error="no completion returned")
                if not comp.ok:
                    error = f"backend error: {comp.error}"
                else:
                    try:
                        done[k] = parse_labels(comp.text, n, self.tax)
                        continue
                    except LabelParseError as err:
                        error = str(err)
                        if comp.truncated:
                            fmt[k] = "lines"  # the answer did not fit: ask for the compact form
                last_error[k] = error
                retry[k] = build_retry_request(
                    req,
                    comp,
                    error,
                    n_steps=n,
                    tax=self.tax,
                    with_rationale=with_rat,
                    attempt=attempt + 1,
                    answer_format=fmt[k],
                )
            pending = retry
        for k in pending:
            self.stats.fallback_traces += 1
            self.stats.errors.append(f"{items[k].trace_id}: {last_error.get(k, '')}")
            log.warning("labeling failed for trace %s, using fallback labels: %s", items[k].trace_id, last_error.get(k))
        for k, parsed in done.items():
            self.stats.llm_ok += 1
            for (sig, _), lab in zip(pre[k], parsed):
                if sig is not None:
                    self.stats.prelabel_checked += 1
                    self.stats.prelabel_agreed += int(lab.signal == sig)
        return done

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

    def _generate(self, requests: list[ChatRequest]) -> dict[str, Completion]:
        assert self.backend is not None
        # A backend reports a bad request in its Completion; an exception is a systemic failure
        # (server down, out of memory) and propagates, so no shard is filled with fallback labels.
        # The same holds for a labeler that cannot be reached: its transport errors (after the
        # client's retries) are not a trace the LLM failed on, and must not become fallback labels.
        completions = self.backend.generate(requests, self.sampling, on_result=self._conformance_check(requests))
        unreachable = [c for c in completions if c.error_kind == "transport"]
        if unreachable:
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
) -> Iterator[list[LabeledStepRecord]]:
    """Label ``(trace_id, problem_id, question, steps)`` tuples; yield one record list per trace.

    Method ``keyword`` (or no backend): keyword pre-label, else the default signal. Method ``llm``:
    one batched ``generate`` call for all traces, one for each retry round. ``stats`` receives the
    counters: a :class:`LabelStats` is updated in place; a mapping (e.g. a ``Counter``) gets the
    numeric counters added when the iteration ends.
    """
    labeler = Labeler(tax, backend, sampling, cfg=cfg)
    if isinstance(stats, LabelStats):
        labeler.stats = stats
    try:
        yield from labeler.label(traces)
    finally:
        if stats is not None and not isinstance(stats, LabelStats):
            for key, value in labeler.stats.as_dict().items():
                if isinstance(value, int):
                    stats[key] = stats.get(key, 0) + value
