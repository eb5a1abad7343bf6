"""Long traces (hundreds of steps, as R1-style teachers write) labeled in windows of consecutive
steps: every step shown whole, answer budgets that fit, windows merged in order, a failed window
falling back alone; against a scripted backend."""

from __future__ import annotations

import json
import re

import pytest
from helpers import ScriptedLabelerBackend, llm_labeling_config

from rscaffold.config import SamplingConfig
from rscaffold.labeling.labeler import LabelStats, label_traces
from rscaffold.labeling.quality import label_quality_report
from rscaffold.labeling.report import render_quality_markdown
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.llm.base import Capabilities, ChatRequest

_STEP_LINE = re.compile(r"^\[(\d+)\] \(pre-label: [^)]*\) (.*)$", re.MULTILINE)


def _long_trace(n: int) -> list[str]:
    """``n`` steps of about 300 characters; step ``i`` names its signal by a marker ``sig<k>``."""
    filler = "we compute the partial sum of the series and compare it with the bound we found before, "
    return [f"Step {i} sig{i % 7}: " + filler * 3 + f"so the value after step {i} is {i * 7}." for i in range(n)]


def _answer_by_marker(tax: Taxonomy, fmt: str = "lines"):
    """Answers every shown step with the signal its ``sig<k>`` marker names."""

    def answer(req: ChatRequest) -> str:
        found = _STEP_LINE.findall(req.messages[1]["content"])
        names = [tax.names[int(re.search(r"sig(\d)", text).group(1))] for _, text in found]  # type: ignore[union-attr]
        if fmt == "json":
            return json.dumps({"labels": [{"step": i, "signal": s} for i, s in enumerate(names, 1)]})
        return "\n".join(f"{i}: {s}" for i, s in enumerate(names, 1))

    return answer


def test_a_long_trace_is_labeled_in_windows_with_every_step_whole(tax: Taxonomy) -> None:
    steps = _long_trace(300)
    backend = ScriptedLabelerBackend(_answer_by_marker(tax))
    sampling = SamplingConfig(max_new_tokens=160)  # the labeler's default
    cfg = llm_labeling_config()
    stats = LabelStats()
    (recs,) = label_traces(
        [("long", "p", "Is the series bounded?", steps)], tax, backend, sampling=sampling, cfg=cfg, stats=stats
    )
    # every step labeled by the LLM with the signal of its own text: windows merged in order
    assert [r.source for r in recs] == ["llm"] * 300
    assert [r.signal for r in recs] == [tax.names[i % 7] for i in range(300)]
    requests = sorted(
        (r for call in backend.calls for r in call), key=lambda r: int(r.request_id.split(":w")[1].split("of")[0])
    )
    windows = recs[0].windows
    assert windows == len(requests) == stats.windows > 1 and stats.windowed_traces == 1
    assert [r.window for r in recs] == sorted(r.window for r in recs) and recs[-1].window == windows - 1
    # each step whole in exactly one request; the windows cover the trace in order
    shown = [text for r in requests for _, text in _STEP_LINE.findall(r.messages[1]["content"])]
    assert shown == [" ".join(s.split()) for s in steps]
    # later windows carry the end of the steps before them as context
    assert "Step 0 sig0" not in requests[1].messages[1]["content"].split("Steps:")[1]
    assert "context only" in requests[1].messages[1]["content"]
    prev_end = _STEP_LINE.findall(requests[0].messages[1]["content"])[-1][1][-40:]
    assert prev_end in requests[1].messages[1]["content"].split("Steps:")[0]
    # the answer budget follows the steps asked for, and prompt + answer fit the context window
    for call, s in zip(backend.calls, backend.samplings):
        for r in call:
            n = len(_STEP_LINE.findall(r.messages[1]["content"]))
            assert s.max_new_tokens >= 8 + 10 * n
            chars = sum(len(m["content"]) for m in r.messages)
            assert chars / cfg.chars_per_token + s.max_new_tokens <= cfg.context_tokens


def test_a_failed_window_falls_back_alone(tax: Taxonomy) -> None:
    steps = _long_trace(150)
    good = _answer_by_marker(tax)
    backend = ScriptedLabelerBackend(lambda req: "no idea" if ":w2of" in req.request_id else good(req))
    stats = LabelStats()
    cfg = llm_labeling_config(max_window_steps=50, chars_per_token=3.0)
    (recs,) = label_traces(
        [("t", "p", "Q?", steps)], tax, backend, sampling=SamplingConfig(max_new_tokens=160), cfg=cfg, stats=stats
    )
    assert recs[0].windows == 3
    assert [r.source for r in recs] == ["llm"] * 50 + ["fallback"] * 50 + ["llm"] * 50
    assert [r.signal for r in recs[100:]] == [tax.names[i % 7] for i in range(100, 150)]
    # the fallback of a window is the keyword pre-label, else the default signal
    assert all(r.signal == (r.prelabel or tax.default_signal) for r in recs[50:100])
    assert stats.fallback_windows == 1 and stats.fallback_traces == 1 and stats.retried == 1
    assert "window(s) 2 of 3" in stats.errors[0]


def test_windows_answer_in_json_under_a_schema(tax: Taxonomy) -> None:
    class JsonBackend(ScriptedLabelerBackend):
        capabilities = Capabilities(json_schema=True)

    backend = JsonBackend(_answer_by_marker(tax, "json"))
    steps = _long_trace(50)
    cfg = llm_labeling_config(max_window_steps=20)
    (recs,) = label_traces(
        [("j", "p", "Q?", steps)], tax, backend, sampling=SamplingConfig(max_new_tokens=1024), cfg=cfg
    )
    requests = [r for call in backend.calls for r in call]
    sizes = [r.json_schema["properties"]["labels"]["maxItems"] for r in requests if r.json_schema]
    assert sizes == [20, 20, 10]
    assert [r.signal for r in recs] == [tax.names[i % 7] for i in range(50)] and {r.source for r in recs} == {"llm"}


def test_quality_report_shows_fallback_rate_by_trace_length(tax: Taxonomy) -> None:
    good = _answer_by_marker(tax)
    backend = ScriptedLabelerBackend(lambda req: "no idea" if req.request_id.startswith("long") else good(req))
    traces = [("short", "p1", "Q?", _long_trace(5)), ("long", "p2", "Q?", _long_trace(90))]
    cfg = llm_labeling_config(retries_on_invalid=0, chars_per_token=3.0)
    recs = [
        r for rs in label_traces(traces, tax, backend, sampling=SamplingConfig(max_new_tokens=160), cfg=cfg) for r in rs
    ]
    report = label_quality_report(recs, tax)
    rows = {r["steps"]: r for r in report["fallback_by_length"]}
    assert rows["1-9"]["fallback_trace_rate"] == 0.0 and rows["80-159"]["fallback_trace_rate"] == 1.0
    assert rows["80-159"]["mean_windows"] == 2 and report["windows_per_trace"] == {1: 1, 2: 1}
    md = render_quality_markdown(report, tax)
    assert "## Fallback by trace length" in md and "| 80-159 | 1 | 100.0% (1) |" in md


def test_windows_are_sized_by_the_labelers_own_tokenizer(tax: Taxonomy, smollm2_dir) -> None:
    """Digit-heavy steps take more tokens than characters suggest: counted with the labeler's
    tokenizer, every request (chat template included) and its answer budget fit the context."""
    from transformers import AutoTokenizer

    from rscaffold.config import BackendConfig
    from rscaffold.labeling.labeler import labeler_token_counter

    count = labeler_token_counter(BackendConfig(model=str(smollm2_dir)))
    assert count is not None and labeler_token_counter(BackendConfig(backend="openai", model="m")) is None
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    steps = [f"Step {i}: " + f"x_{{{i}}} = {3 * i} + {7 * i} = {10 * i}; " * 40 for i in range(40)]
    sizes: list[int] = []

    def answer(req: ChatRequest) -> str:
        text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        sizes.append(len(tok(text)["input_ids"]))
        return "\n".join(
            f"{i}: {tax.names[0]}" for i in range(1, len(_STEP_LINE.findall(req.messages[1]["content"])) + 1)
        )

    backend = ScriptedLabelerBackend(answer)
    cfg = llm_labeling_config()
    sampling = SamplingConfig(max_new_tokens=160)
    (recs,) = label_traces([("d", "p", "Q?", steps)], tax, backend, sampling=sampling, cfg=cfg, count_tokens=count)
    budgets = [s.max_new_tokens for s, call in zip(backend.samplings, backend.calls) for _ in call]
    assert recs[0].windows > 1 and {r.source for r in recs} == {"llm"}
    assert all(n + b <= cfg.context_tokens for n, b in zip(sizes, budgets))


def test_a_context_window_smaller_than_the_label_prompt_is_refused_with_the_size_needed(tax: Taxonomy) -> None:
    backend = ScriptedLabelerBackend(_answer_by_marker(tax))
    cfg = llm_labeling_config(context_tokens=512)  # the taxonomy's definitions alone take more
    with pytest.raises(ValueError, match=r"labeling.context_tokens=512 is too small .* at least \d+"):
        list(label_traces([("t", "p", "Q?", _long_trace(3))], tax, backend, sampling=SamplingConfig(), cfg=cfg))
    assert backend.calls == []  # nothing was sent


def test_a_context_larger_than_the_local_labeler_model_holds_is_warned_about(tiny_model_dir, caplog) -> None:
    import logging

    from rscaffold.config import BackendConfig, LabelingConfig
    from rscaffold.labeling.labeler import warn_context_larger_than_model

    llm = BackendConfig(backend="transformers", model=str(tiny_model_dir))
    with caplog.at_level(logging.WARNING, logger="rscaffold"):
        limit = warn_context_larger_than_model(llm, LabelingConfig(context_tokens=8192 + 7))
        assert limit is not None and limit < 8192
        assert "labeling.context_tokens=8199 is larger than the labeler model's context window" in caplog.text
        caplog.clear()
        assert warn_context_larger_than_model(llm, LabelingConfig(context_tokens=limit)) == limit
        assert caplog.text == ""
