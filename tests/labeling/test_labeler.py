"""Labeling traces (rscaffold.labeling.labeler): keyword labels, batched LLM calls, retries with the
parse error, fallback, statistics; against a scripted backend."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import (
    LABEL_SAMPLING,
    QWQ_GOLD,
    QWQ_PRELABELS,
    R1_CUES,
    R1_GOLD,
    R1_PRELABELS,
    REASONING,
    ScriptedLabelerBackend,
    json_label_answer,
    labeling_traces,
    llm_labeling_config,
)

from rscaffold.config import LabelingConfig, SamplingConfig
from rscaffold.labeling.keywords import fallback_label
from rscaffold.labeling.labeler import LabelStats, label_traces
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend


def test_scripted_backend_satisfies_the_protocol() -> None:
    assert isinstance(ScriptedLabelerBackend({}), LLMBackend)


def test_keyword_method_does_not_call_the_backend(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({})
    stats = LabelStats()
    out = list(
        label_traces(
            labeling_traces(), tax, backend, sampling=LABEL_SAMPLING, cfg=LabelingConfig(method="keyword"), stats=stats
        )
    )
    assert backend.calls == []
    r1 = out[0]
    assert [r.signal for r in r1] == [p or REASONING for p in R1_PRELABELS]
    assert [r.source for r in r1] == ["fallback" if p is None else "keyword" for p in R1_PRELABELS]
    assert [r.cue for r in r1] == R1_CUES
    assert [r.step_index for r in r1] == list(range(10))
    assert stats.traces == 2 and stats.steps == 16 and stats.keyword_steps == 9 + 5
    assert stats.llm_ok == 0


def test_no_backend_means_keyword_labels(tax: Taxonomy) -> None:
    out = list(label_traces(labeling_traces()[:1], tax, None, sampling=LABEL_SAMPLING, cfg=llm_labeling_config()))
    assert [r.signal for r in out[0]] == [p or REASONING for p in R1_PRELABELS]


def test_llm_valid_json_is_one_batched_call(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend(
        {"r1": [json_label_answer(R1_GOLD)], "qwq": ["```json\n" + json_label_answer(QWQ_GOLD) + "\n```"]}
    )
    stats = LabelStats()
    out = list(
        label_traces(labeling_traces(), tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config(), stats=stats)
    )
    assert len(backend.calls) == 1 and [r.request_id for r in backend.calls[0]] == ["r1:label", "qwq:label"]
    r1, qwq = out
    assert [r.signal for r in r1] == R1_GOLD
    assert [r.signal for r in qwq] == QWQ_GOLD
    assert all(r.source == "llm" for r in r1 + qwq)
    assert [r.prelabel for r in r1] == R1_PRELABELS  # the pre-label is kept beside the final label
    assert [r.cue for r in r1] == R1_CUES
    assert r1[0].trace_id == "r1" and r1[0].problem_id == "p1" and qwq[0].problem_id == "p2"
    assert stats.llm_ok == 2 and stats.retried == 0 and stats.fallback_traces == 0
    # R1: 9 pre-labeled steps, the LLM changed one (step 4 "Hmm" -> verification);
    # QwQ: 5 pre-labeled steps, the LLM changed one (step 4 "Hmm... so" -> reasoning)
    assert stats.prelabel_checked == 9 + 5 and stats.prelabel_agreed == 8 + 4


def test_llm_compact_list_format(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({"qwq": ["\n".join(f"{i}: {s}" for i, s in enumerate(QWQ_GOLD, 1))]})
    (qwq,) = label_traces(
        labeling_traces()[1:], tax, backend, sampling=SamplingConfig(max_new_tokens=40), cfg=llm_labeling_config()
    )
    assert [r.signal for r in qwq] == QWQ_GOLD
    # 6 JSON entries do not fit 40 new tokens: the prompt asks for the compact form, without schema
    req = backend.calls[0][0]
    assert req.json_schema is None and "exactly 6 lines" in req.messages[-1]["content"]


def test_llm_invalid_then_valid_is_retried_with_the_error(tax: Taxonomy) -> None:
    bad = json_label_answer(QWQ_GOLD[:4])  # steps 5 and 6 missing
    backend = ScriptedLabelerBackend({"r1": [json_label_answer(R1_GOLD)], "qwq": [bad, json_label_answer(QWQ_GOLD)]})
    stats = LabelStats()
    out = list(
        label_traces(
            labeling_traces(),
            tax,
            backend,
            sampling=LABEL_SAMPLING,
            cfg=llm_labeling_config(retries_on_invalid=1),
            stats=stats,
        )
    )
    assert len(backend.calls) == 2
    (retry,) = backend.calls[1]  # only the failed trace is retried
    assert retry.request_id == "qwq:label:retry1"
    assert retry.messages[:2] == backend.calls[0][1].messages
    assert retry.messages[2] == {"role": "assistant", "content": bad}
    assert "missing step(s): 5-6" in retry.messages[3]["content"]
    assert [r.signal for r in out[1]] == QWQ_GOLD and all(r.source == "llm" for r in out[1])
    assert stats.llm_ok == 2 and stats.retried == 1 and stats.fallback_traces == 0


def test_llm_invalid_twice_falls_back(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend(
        {"r1": [json_label_answer(R1_GOLD)], "qwq": ["1: Musing\n2: Pondering", "I cannot label these steps."]}
    )
    stats = LabelStats()
    out = list(
        label_traces(
            labeling_traces(),
            tax,
            backend,
            sampling=LABEL_SAMPLING,
            cfg=llm_labeling_config(retries_on_invalid=1),
            stats=stats,
        )
    )
    assert len(backend.calls) == 2
    assert "step 1: unknown signal 'Musing'" in backend.calls[1][0].messages[3]["content"]
    qwq = out[1]
    steps = [r.text for r in qwq]
    assert [r.signal for r in qwq] == [fallback_label(s, tax) for s in steps]
    assert all(r.source == "fallback" for r in qwq)
    assert [r.prelabel for r in qwq] == QWQ_PRELABELS
    assert all(r.source == "llm" for r in out[0])
    assert stats.llm_ok == 1 and stats.retried == 1 and stats.fallback_traces == 1
    assert stats.errors == [
        "qwq: no labels found: expected JSON {\"labels\": [...]} or lines '<step>: <signal>' for 6 steps"
    ]


def test_no_retries_configured_falls_back_at_once(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({"qwq": ['["Contrast"]']})
    stats = LabelStats()
    (qwq,) = label_traces(
        labeling_traces()[1:],
        tax,
        backend,
        sampling=LABEL_SAMPLING,
        cfg=llm_labeling_config(retries_on_invalid=0),
        stats=stats,
    )
    assert len(backend.calls) == 1
    assert all(r.source == "fallback" for r in qwq)
    assert stats.fallback_traces == 1 and stats.retried == 0


def test_backend_error_is_retried(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({"qwq": [Completion("x", error="HTTP 503"), json_label_answer(QWQ_GOLD)]})
    (qwq,) = label_traces(labeling_traces()[1:], tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config())
    assert [r.signal for r in qwq] == QWQ_GOLD
    assert backend.calls[1][0].messages == backend.calls[0][0].messages  # nothing to quote back


def test_backend_exception_propagates(tax: Taxonomy) -> None:
    def boom(req: ChatRequest) -> str:
        raise ConnectionError("server down")

    with pytest.raises(ConnectionError, match="server down"):
        list(
            label_traces(
                labeling_traces(), tax, ScriptedLabelerBackend(boom), sampling=LABEL_SAMPLING, cfg=llm_labeling_config()
            )
        )


def test_truncated_answer_retries_in_compact_form(tax: Taxonomy) -> None:
    cut = Completion("x", text=json_label_answer(QWQ_GOLD)[:70], finish_reason="length")
    backend = ScriptedLabelerBackend({"qwq": [cut, "\n".join(f"{i}: {s}" for i, s in enumerate(QWQ_GOLD, 1))]})
    (qwq,) = label_traces(labeling_traces()[1:], tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config())
    retry = backend.calls[1][0]
    assert retry.json_schema is None and "exactly 6 lines" in retry.messages[-1]["content"]
    assert "cut off at the length limit" in retry.messages[-1]["content"]
    assert [r.signal for r in qwq] == QWQ_GOLD


def test_zero_step_trace_yields_empty_list_and_no_request(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({"qwq": [json_label_answer(QWQ_GOLD)]})
    traces = [("empty", "p0", "Q?", []), labeling_traces()[1]]
    out = list(label_traces(traces, tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config()))
    assert out[0] == [] and len(out[1]) == 6
    assert [r.request_id for r in backend.calls[0]] == ["qwq:label"]


def test_duplicate_trace_ids_are_rejected(tax: Taxonomy) -> None:
    t = labeling_traces()[1]
    with pytest.raises(ValueError, match="trace ids must be unique within one call: qwq"):
        list(label_traces([t, t], tax, ScriptedLabelerBackend({}), sampling=LABEL_SAMPLING, cfg=llm_labeling_config()))


def test_a_step_longer_than_a_request_is_cut_in_its_own_window_and_kept_whole_in_the_record(tax: Taxonomy) -> None:
    huge = "So " + "7 * 6 = 42. " * 3000
    backend = ScriptedLabelerBackend(lambda req: '["Reasoning"]')
    cfg = llm_labeling_config()
    (recs,) = label_traces([("h", "p", "Q?", [huge, "Thus 42."])], tax, backend, sampling=LABEL_SAMPLING, cfg=cfg)
    assert recs[0].text == huge
    (first, second) = backend.calls[0]
    chars = sum(len(m["content"]) for m in first.messages)
    assert 10_000 < chars <= (cfg.context_tokens - LABEL_SAMPLING.max_new_tokens) * cfg.chars_per_token
    assert "Thus 42." in second.messages[-1]["content"] and "Thus 42." not in first.messages[-1]["content"]
    assert [(r.signal, r.source, r.window, r.windows) for r in recs] == [
        (REASONING, "llm", 0, 2),
        (REASONING, "llm", 1, 2),
    ]


def test_rationale_is_stored(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({"qwq": [json_label_answer(QWQ_GOLD, rationale=True)]})
    (qwq,) = label_traces(
        labeling_traces()[1:], tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config(with_rationale=True)
    )
    assert [r.rationale for r in qwq] == [f"reason {i}" for i in range(1, 7)]
    assert '"rationale"' in backend.calls[0][0].messages[-1]["content"]


def test_counter_stats_accumulate_over_calls(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend({"qwq": [json_label_answer(QWQ_GOLD), "nonsense", "still nonsense"]})
    stats: Counter[str] = Counter()
    list(
        label_traces(
            labeling_traces()[1:], tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config(), stats=stats
        )
    )
    list(
        label_traces(
            labeling_traces()[1:], tax, backend, sampling=LABEL_SAMPLING, cfg=llm_labeling_config(), stats=stats
        )
    )
    assert stats["traces"] == 2 and stats["steps"] == 12 and stats["keyword_steps"] == 10
    assert stats["llm_ok"] == 1 and stats["retried"] == 1 and stats["fallback_traces"] == 1
    assert "errors" not in stats
