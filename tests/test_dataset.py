from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from rscaffold.config import DatasetConfig
from rscaffold.dataset import assemble_examples, dataset_stats, validation_problems
from rscaffold.records import ExampleRecord, LabeledStepRecord, TraceRecord, arrow_schema
from rscaffold.store import read_records, write_records, write_table

SIG = ["Reasoning and Analysis", "Conclusion and Summary", "Contrast and Concession"]


def trace(pid: str, sample: int = 0, status: str = "ok", correct: bool | None = True) -> TraceRecord:
    return TraceRecord(
        trace_id=f"{pid}#{sample}",
        problem_id=pid,
        sample_index=sample,
        question=f"Q {pid}",
        gold_answer="4",
        text="2 + 2 = 4\n\nThe answer is 4.",
        predicted_answer=None if correct is None else ("4" if correct else "5"),
        correct=correct,
        status=status,
    )


def steps_for(t: TraceRecord, signals=("Reasoning and Analysis", "Conclusion and Summary")) -> list[LabeledStepRecord]:
    return [
        LabeledStepRecord(
            trace_id=t.trace_id, problem_id=t.problem_id, step_index=i, text=f"step {i}", signal=s, source="llm"
        )
        for i, s in enumerate(signals)
    ]


def assemble(tmp_path: Path, traces, steps, cfg: DatasetConfig, keep: str = "all"):
    tp, sp = tmp_path / "traces.parquet", tmp_path / "labeled_steps.parquet"
    write_records(tp, traces, TraceRecord)
    write_records(sp, steps, LabeledStepRecord)
    return assemble_examples(tp, sp, cfg, keep=keep)


def test_assembly_joins_orders_and_splits_by_problem(tmp_path):
    traces = [trace(f"p{i}", s) for i in range(10) for s in range(2)]
    steps = [st for t in traces for st in reversed(steps_for(t))]  # out of order on purpose
    ex, dropped = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0.2, seed=3))
    assert ex.height == 20 and dropped == {}
    rows = ex.to_dicts()
    assert all([s["index"] for s in r["steps"]] == [0, 1] for r in rows)
    assert all(r["signals"] == ["Reasoning and Analysis", "Conclusion and Summary"] for r in rows)
    val = {r["problem_id"] for r in rows if r["split"] == "validation"}
    train = {r["problem_id"] for r in rows if r["split"] == "train"}
    assert len(val) == 2 and not (val & train)
    assert val == validation_problems([f"p{i}" for i in range(10)], 0.2, seed=3)
    assert [(r["split"], r["problem_id"], r["trace_id"]) for r in rows] == sorted(
        (r["split"], r["problem_id"], r["trace_id"]) for r in rows
    )
    # deterministic, and another seed holds out other problems
    again, _ = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0.2, seed=3))
    assert again.equals(ex)
    other, _ = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0.2, seed=4))
    assert set(other.filter(pl.col("split") == "validation")["problem_id"]) != val


def test_written_examples_have_the_record_schema(tmp_path):
    traces = [trace("a"), trace("b", correct=None)]
    ex, _ = assemble(tmp_path, traces, [s for t in traces for s in steps_for(t)], DatasetConfig(validation_fraction=0))
    path = write_table(tmp_path / "examples.parquet", ex, ExampleRecord)
    assert pq.read_schema(path) == arrow_schema(ExampleRecord)
    assert pq.read_schema(path).metadata[b"rscaffold.record"] == b"ExampleRecord"
    a, b = read_records(path, ExampleRecord)
    assert a.teacher_answer == "4" and b.teacher_answer is None and b.correct is None
    assert a.steps[1].signal == "Conclusion and Summary" and a.n_steps == 2 and a.split == "train"
    with pytest.raises(ValueError, match="lacks column"):
        write_table(tmp_path / "x.parquet", ex.drop("signals"), ExampleRecord)


def test_filters_are_counted(tmp_path):
    good, failed, wrong, nosteps = trace("a"), trace("b", status="failed"), trace("c", correct=False), trace("d")
    noanswer = trace("e", correct=None)
    steps = steps_for(good) + steps_for(failed) + steps_for(wrong) + steps_for(noanswer)
    traces = [good, failed, wrong, nosteps, noanswer]
    ex, dropped = assemble(tmp_path, traces, steps, DatasetConfig(only_correct=True, validation_fraction=0))
    assert ex["problem_id"].to_list() == ["a"]
    assert dropped == {"failed": 1, "incorrect": 2, "too_few_steps": 1}
    ex, dropped = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0), keep="correct")
    assert ex["problem_id"].to_list() == ["a"]
    assert dropped == {"failed": 1, "incorrect": 1, "no_answer": 1, "too_few_steps": 1}
    ex, dropped = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0, min_steps=3))
    assert ex.height == 0 and dropped == {"failed": 1, "too_few_steps": 4}


def test_stats_count_signals_and_steps(tmp_path):
    ts = [trace("a"), trace("b")]
    steps = steps_for(ts[0]) + steps_for(
        ts[1], ("Contrast and Concession", "Reasoning and Analysis", "Conclusion and Summary")
    )
    ex, _ = assemble(tmp_path, ts, steps, DatasetConfig(validation_fraction=0))
    st = dataset_stats(ex, SIG)
    assert st["rows"] == 2 and st["mean_steps"] == 2.5 and st["problems"] == 2 and st["teacher_accuracy"] == 1.0
    assert st["signal_counts"] == {
        "Reasoning and Analysis": 2,
        "Conclusion and Summary": 2,
        "Contrast and Concession": 1,
    }
    assert st["splits"] == {"train": 2} and st["label_sources"] == {"llm": 5}


def test_validation_problems():
    ids = [f"p{i}" for i in range(100)]
    val = validation_problems(ids, 0.1, seed=0)
    assert len(val) == 10 and val == validation_problems(reversed(ids), 0.1, seed=0)
    assert validation_problems(ids, 0.1, seed=1) != val
    assert validation_problems(["a", "b"], 0.1) and not validation_problems(["a"], 0.1)
    assert validation_problems(ids, 0.0) == set()


def test_traces_cut_at_the_teacher_token_limit_are_dropped_by_default_and_kept_only_knowingly(tmp_path, caplog):
    from rscaffold.config import TeacherConfig
    from rscaffold.dataset import select_traces

    finished, cut = trace("a"), trace("b").model_copy(update={"finish_reason": "length", "truncated": True})
    cut_wrong = trace("c", correct=False).model_copy(update={"finish_reason": "length", "truncated": True})
    traces = [finished, cut, cut_wrong]
    assert TeacherConfig().keep == "finished"
    with caplog.at_level("INFO", logger="rscaffold"):
        kept, dropped = select_traces(traces, TeacherConfig().keep)
    assert [t.trace_id for t in kept] == ["a#0"] and dropped == {"truncated": 2}
    assert "dropped 2 of 3 traces that hit the teacher's token limit" in caplog.text
    kept, dropped = select_traces(traces, "correct")
    assert [t.trace_id for t in kept] == ["a#0"] and dropped == {"truncated": 2}
    caplog.clear()
    with caplog.at_level("INFO", logger="rscaffold"):
        kept, dropped = select_traces(traces, "all")
    assert len(kept) == 3 and dropped == {}
    assert "2 of 3 traces hit the teacher's token limit and are kept" in caplog.text
    steps = [s for t in traces for s in steps_for(t)]
    ex, dropped = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0), keep="finished")
    assert ex["problem_id"].to_list() == ["a"] and dropped == {"truncated": 2}
    ex, dropped = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0), keep="all")
    assert ex.height == 3 and dropped == {}


def test_a_users_own_problem_id_reaches_the_dataset(tmp_path):
    """``problems.custom.fields.id``: the id as written in the user's file is kept beside the
    slugged ``problem_id``, in the problems, the traces and the dataset's rows."""
    import json

    from rscaffold.config import CustomFormat
    from rscaffold.evalsets.loaders import custom_benchmark, load_problems
    from rscaffold.llm.base import Completion
    from rscaffold.stages.teacher import trace_from_completion

    src = tmp_path / "mine.jsonl"
    rows = [{"ref": f"Q {i}/A", "q": f"What is {i}+1?", "a": str(i + 1)} for i in range(4)]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    spec = CustomFormat(answer_type="number", fields={"question": "q", "answer": "a", "id": "ref"})
    problems = load_problems(src, benchmark=custom_benchmark(spec), split="train")
    assert [p.source_id for p in problems] == [r["ref"] for r in rows]
    traces = [
        trace_from_completion(
            p, Completion(p.problem_id, text=f"The answer is {p.gold_answer}."), 0,
            answer_fn=lambda text: text.split()[-1].rstrip("."), check_fn=lambda pred, gold: pred == gold,
        )
        for p in problems
    ]  # fmt: skip
    assert [t.source_id for t in traces] == [r["ref"] for r in rows]
    steps = [s for t in traces for s in steps_for(t)]
    examples, _ = assemble(tmp_path, traces, steps, DatasetConfig(validation_fraction=0.25))
    assert sorted(examples.get_column("source_id").to_list()) == sorted(r["ref"] for r in rows)
