"""Tests of rscaffold.labeling.report: the markdown quality report and the transition heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ADDITION, CONCLUSION, CONTRAST, REASONING, RESTATE, VERIFY, png_size

from rscaffold.labeling.quality import label_quality_report
from rscaffold.labeling.report import plot_transition_heatmap, render_quality_markdown, short_signal_names
from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.records import LabeledStepRecord

SHORT = ["contrast", "addition", "reasoning", "conclusion", "verify", "hypothesis", "restate"]


def _rec(trace: str, i: int, signal: str, prelabel: str | None, source: str, text: str) -> LabeledStepRecord:
    return LabeledStepRecord(
        trace_id=trace,
        problem_id=f"p-{trace}",
        step_index=i,
        text=text,
        prelabel=prelabel,
        cue="cue" if prelabel else None,
        signal=signal,
        source=source,
    )


def _records() -> list[LabeledStepRecord]:
    """3 traces, 8 steps; hand-computed numbers are in the test below."""
    return [
        # t1, labeled by the LLM: both pre-labels kept, the cue-less step labeled a conclusion
        _rec("t1", 0, RESTATE, RESTATE, "llm", "x" * 100),
        _rec("t1", 1, REASONING, REASONING, "llm", "x" * 40),
        _rec("t1", 2, CONCLUSION, None, "llm", "x" * 20),
        # t2, labeled by the LLM: the first pre-label (contrast) corrected to verification
        _rec("t2", 2, CONCLUSION, CONCLUSION, "llm", "x" * 30),  # out of order on purpose
        _rec("t2", 0, VERIFY, CONTRAST, "llm", "x" * 50),
        _rec("t2", 1, REASONING, REASONING, "llm", "x" * 60),
        # t3: the LLM failed, fallback labels (pre-label, else the default signal)
        _rec("t3", 0, CONTRAST, CONTRAST, "fallback", "x" * 10),
        _rec("t3", 1, REASONING, None, "fallback", "x" * 20),
    ]


def _row(md: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row whose first cell is ``first_cell``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{md}")


def test_short_signal_names(tax: Taxonomy) -> None:
    assert list(short_signal_names(tax.names, tax).values()) == SHORT
    assert short_signal_names(["Not A Signal"], tax) == {"Not A Signal": "Not A Signal"}


def test_markdown_has_the_hand_computed_numbers(tax: Taxonomy) -> None:
    report = label_quality_report(_records(), tax)
    md = render_quality_markdown(report, tax)

    assert _row(md, "traces")[1] == "3"
    assert _row(md, "steps")[1] == "8"
    assert _row(md, "steps per trace (mean)")[1] == "2.67"  # 8 / 3
    assert _row(md, "keyword coverage (steps with a cue pre-label)")[1].startswith("75.0%")  # 6 / 8
    assert _row(md, "fallback rate (steps with a fallback label)")[1] == "25.0% (2 of 8)"
    assert _row(md, "llm")[1:] == ["6", "75.0%"]
    assert _row(md, "fallback")[1:] == ["2", "25.0%"]

    # 5 LLM-labeled steps had a pre-label, 4 kept. kappa: p_o = 4/5; pre-labels
    # {restate 1, reasoning 2, contrast 1, conclusion 1}, LLM {restate 1, reasoning 2, verify 1,
    # conclusion 1}: p_e = (1 + 4 + 0 + 1) / 25 = 0.24; kappa = (0.8 - 0.24) / 0.76 = 0.7368
    assert _row(md, "LLM-labeled steps with a pre-label")[1] == "5"
    assert _row(md, "agreement (LLM kept the pre-label)")[1].startswith("80.0%")
    assert _row(md, "Cohen's kappa")[1] == "0.737"

    # signal distribution: steps, share, first step of a trace, mean chars
    assert _row(md, REASONING)[1:] == ["`reasoning`", "3", "37.5%", "0", "40"]  # (40 + 60 + 20) / 3
    assert _row(md, CONCLUSION)[1:] == ["`conclusion`", "2", "25.0%", "0", "25"]
    assert _row(md, RESTATE)[1:] == ["`restate`", "1", "12.5%", "1", "100"]
    assert _row(md, VERIFY)[1:] == ["`verify`", "1", "12.5%", "1", "50"]
    assert _row(md, CONTRAST)[1:] == ["`contrast`", "1", "12.5%", "1", "10"]
    assert _row(md, ADDITION)[1:] == ["`addition`", "0", "0.0%", "0", "n/a"]

    # transitions (steps in index order): t1 restate->reasoning->conclusion,
    # t2 verify->reasoning->conclusion, t3 contrast->reasoning
    assert _row(md, "from \\ to")[1:] == SHORT + ["total"]
    assert _row(md, "**reasoning**")[1:] == ["0", "0", "0", "2", "0", "0", "0", "2"]
    assert _row(md, "**restate**")[1:] == ["0", "0", "1", "0", "0", "0", "0", "1"]
    assert _row(md, "**verify**")[1:] == ["0", "0", "1", "0", "0", "0", "0", "1"]
    assert _row(md, "**contrast**")[1:] == ["0", "0", "1", "0", "0", "0", "0", "1"]
    assert _row(md, "**conclusion**")[1:] == ["0"] * 8
    assert _row(md, "**total**")[1:] == ["0", "0", "3", "2", "0", "0", "0", "5"]
    assert "over 5 consecutive step pairs" in md
    assert "Warning" not in md


def test_markdown_from_quality_json_is_the_same(tax: Taxonomy) -> None:
    report = label_quality_report(_records(), tax)
    assert render_quality_markdown(json.loads(json.dumps(report)), tax) == render_quality_markdown(report, tax)


def test_markdown_without_llm_labels(tax: Taxonomy) -> None:
    records = [
        _rec("k1", 0, RESTATE, RESTATE, "keyword", "a"),
        _rec("k1", 1, REASONING, None, "fallback", "b"),
    ]
    md = render_quality_markdown(label_quality_report(records, tax), tax)
    assert "agreement and Cohen's kappa are n/a" in md
    assert _row(md, "keyword")[1:] == ["1", "50.0%"]
    assert _row(md, "fallback rate (steps with a fallback label)")[1] == "50.0% (1 of 2)"


def test_markdown_of_an_empty_report(tax: Taxonomy) -> None:
    md = render_quality_markdown(label_quality_report([], tax), tax)
    assert _row(md, "steps")[1] == "0"
    assert _row(md, "fallback rate (steps with a fallback label)")[1] == "n/a (0 of 0)"
    assert _row(md, "**total**")[1:] == ["0"] * 8


def test_markdown_warns_on_another_taxonomy(tax: Taxonomy) -> None:
    report = label_quality_report(_records(), tax)
    report["taxonomy_digest"] = "0" * 16
    assert "Warning" in render_quality_markdown(report, tax)


def test_heatmap_png(tax: Taxonomy, tmp_path: Path) -> None:
    report = label_quality_report(_records(), tax)
    out = plot_transition_heatmap(report, tax, tmp_path / "sub" / "transitions.png")
    assert out == tmp_path / "sub" / "transitions.png" and out.is_file()
    assert out.stat().st_size > 20_000  # a real figure, not an empty canvas
    width, height = png_size(out)
    assert width >= 800 and height >= 600
    assert out.read_bytes()[-8:-4] == b"IEND"


def test_heatmap_of_an_empty_report(tax: Taxonomy, tmp_path: Path) -> None:
    out = plot_transition_heatmap(label_quality_report([], tax), tax, tmp_path / "empty.png")
    assert png_size(out)[0] > 0


def test_heatmap_rejects_a_malformed_matrix(tax: Taxonomy, tmp_path: Path) -> None:
    report = label_quality_report(_records(), tax)
    report["transitions"] = [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="7x7"):
        plot_transition_heatmap(report, tax, tmp_path / "bad.png")
