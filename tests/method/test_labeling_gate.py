"""The labeling quality gate.

A weak labeler (the default 135M one) answers in valid form (so the fallback rate is 0%) while its
labels collapse to the taxonomy's order: step 1 contrast, step 2 addition, step 3 reasoning, ...
The labeling stage must say so loudly (console log, ``quality.md``, which is also the Prefect
artifact's body, and the stage summary), and ``labeling.min_kappa`` / ``labeling.max_index_lambda``
fail the stage when set. A labeler that follows the steps' text passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pytest

from rscaffold.config import SamplingConfig, config_from_dict
from rscaffold.labeling.quality import label_quality_report, quality_gate
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.llm.base import Capabilities, ChatRequest, Completion
from rscaffold.paths import data_dir
from rscaffold.records import LabeledStepRecord, TraceRecord
from rscaffold.stages import labeling as labeling_stage
from rscaffold.store import StageDir, StageRef, write_records

TAX = load_taxonomy(data_dir() / "signals.yaml")
N_TRACES, N_STEPS = 12, 6


def cue_signal(i: int, j: int) -> str:
    """The signal whose cue opens step ``j`` of trace ``i`` (varies with the trace, not only with
    the position)."""
    return TAX.names[(i + 3 * j) % len(TAX.names)]


def step_text(i: int, j: int) -> str:
    cue = TAX.by_name[cue_signal(i, j)].cues[0]
    return f"{cue.capitalize()}, in trace {i} step {j} we add {j} + {i} = {i + j} marbles."


def in_taxonomy_order(i: int, j: int) -> str:
    return TAX.names[j % len(TAX.names)]


class FakeLabelerBackend:
    """test fake: answers every labeling request in valid ``<step>: <signal>`` lines, with the
    labels ``label(trace, step)`` gives."""

    name = "fake-labeler"
    model_id = "fake-labeler"
    capabilities = Capabilities()

    def __init__(self, label: Callable[[int, int], str]):
        self.label = label

    def generate(self, requests: Sequence[ChatRequest], sampling: SamplingConfig, on_result=None) -> list[Completion]:
        out = []
        for r in requests:
            i = int(r.request_id.split(":")[0].removeprefix("t"))
            text = "\n".join(f"{j + 1}: {self.label(i, j)}" for j in range(N_STEPS))
            c = Completion(r.request_id, text=text, finish_reason="stop")
            if on_result:
                on_result(c)
            out.append(c)
        return out

    def close(self) -> None:
        pass


def labeled_steps(label: Callable[[int, int], str]) -> list[LabeledStepRecord]:
    return [
        LabeledStepRecord(
            trace_id=f"t{i}",
            problem_id=f"p{i}",
            step_index=j,
            text=step_text(i, j),
            prelabel=cue_signal(i, j),
            cue=TAX.by_name[cue_signal(i, j)].cues[0],
            signal=label(i, j),
            source="llm",
        )
        for i in range(N_TRACES)
        for j in range(N_STEPS)
    ]


def test_labels_in_taxonomy_order_are_flagged_and_text_following_labels_pass():
    cfg = config_from_dict({}).labeling
    bad = label_quality_report(labeled_steps(in_taxonomy_order), TAX)
    assert bad["prelabel_kappa"] < 0.2 and bad["index_lambda"] == 1.0 and bad["taxonomy_order_share"] == 1.0
    verdict = quality_gate(bad, cfg)
    assert verdict["degenerate"] and len(verdict["reasons"]) == 3 and not verdict["failed"]
    good = label_quality_report(labeled_steps(cue_signal), TAX)
    assert good["prelabel_kappa"] == 1.0 and good["index_lambda"] < 0.5 and good["taxonomy_order_share"] < 0.2
    assert not quality_gate(good, cfg)["degenerate"]
    strict = config_from_dict({"labeling": {"min_kappa": 0.5, "max_order_share": 0.4, "max_index_lambda": 0.9}})
    assert len(quality_gate(bad, strict.labeling)["failed"]) == 3 and not quality_gate(good, strict.labeling)["failed"]


@pytest.fixture
def teacher_ref(tmp_path) -> StageRef:
    """A finished teacher stage's output: traces of ``N_STEPS`` blank-line separated steps."""
    traces = [
        TraceRecord(
            trace_id=f"t{i}",
            problem_id=f"p{i}",
            sample_index=0,
            question=f"How many marbles in bag {i}?",
            gold_answer=str(i),
            text="\n\n".join(step_text(i, j) for j in range(N_STEPS)),
        )
        for i in range(N_TRACES)
    ]
    path = tmp_path / "teacher"
    write_records(path / "traces.parquet", traces, TraceRecord)
    return StageRef("teacher", "fake", str(path), {"traces": "traces.parquet"})


def run(tmp_path, teacher_ref, monkeypatch, label, **labeling):
    import rscaffold.llm

    monkeypatch.setattr(rscaffold.llm, "create_backend", lambda llm_cfg, **_: FakeLabelerBackend(label))
    cfg = config_from_dict({"run": {"artifacts_dir": str(tmp_path / "artifacts")}, "labeling": labeling})
    return cfg, labeling_stage.run_labeling(cfg, {"labeling": "gate-test"}, teacher_ref)


def test_the_stage_says_loudly_that_the_labeling_is_degenerate(tmp_path, teacher_ref, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        _, ref = run(tmp_path, teacher_ref, monkeypatch, in_taxonomy_order)
    assert ref.summary["label_sources"] == {"llm": N_TRACES * N_STEPS}  # no fallback: valid answers
    assert len(ref.summary["degenerate_labeling"]) == 3
    assert "LABELING LOOKS DEGENERATE" in caplog.text
    md = ref.output("quality_report").read_text()
    assert "WARNING: the labeling looks degenerate" in md and md.index("WARNING") < md.index("## Summary")


def test_min_kappa_fails_the_stage_after_saving_labels_and_report(tmp_path, teacher_ref, monkeypatch):
    with pytest.raises(labeling_stage.LabelingFailureError, match="min_kappa"):
        run(tmp_path, teacher_ref, monkeypatch, in_taxonomy_order, min_kappa=0.3)
    sd = StageDir(tmp_path / "artifacts", "labeling", "gate-test")
    assert not sd.is_complete()
    assert "WARNING" in (sd.work / "quality.md").read_text()  # the report waits in the work dir
    assert len(sd.read_shards("labeled_steps", LabeledStepRecord)) == N_TRACES * N_STEPS


def test_a_labeler_that_follows_the_text_passes_the_gate(tmp_path, teacher_ref, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        _, ref = run(
            tmp_path, teacher_ref, monkeypatch, cue_signal, min_kappa=0.3, max_order_share=0.4, max_index_lambda=0.9
        )
    assert ref.summary["degenerate_labeling"] == [] and "DEGENERATE" not in caplog.text
    assert "WARNING" not in ref.output("quality_report").read_text()
