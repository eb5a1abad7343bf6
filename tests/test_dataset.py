from rscaffold.config import DatasetConfig
from rscaffold.dataset import assemble_examples, dataset_stats
from rscaffold.records import LabeledStepRecord, TraceRecord

SIG = ["Reasoning and Analysis", "Conclusion and Summary", "Contrast and Concession"]


def trace(pid: str, sample: int = 0, status: str = "ok", correct: bool = True) -> TraceRecord:
    return TraceRecord(
        trace_id=f"{pid}#{sample}",
        problem_id=pid,
        sample_index=sample,
        question=f"Q {pid}",
        gold_answer="4",
        text="2 + 2 = 4\n\nThe answer is 4.",
        predicted_answer="4" if correct else "5",
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


def test_assembly_joins_orders_and_splits_by_problem():
    traces = [trace(f"p{i}", s) for i in range(10) for s in range(2)]
    steps = [st for t in traces for st in reversed(steps_for(t))]  # out of order on purpose
    ex, dropped = assemble_examples(traces, steps, DatasetConfig(validation_fraction=0.2, seed=3))
    assert len(ex) == 20 and dropped == {}
    assert all([s.index for s in e.steps] == [0, 1] for e in ex)
    assert all(e.signals == ["Reasoning and Analysis", "Conclusion and Summary"] for e in ex)
    val_problems = {e.problem_id for e in ex if e.split == "validation"}
    train_problems = {e.problem_id for e in ex if e.split == "train"}
    assert len(val_problems) == 2 and not (val_problems & train_problems)
    # deterministic
    ex2, _ = assemble_examples(traces, steps, DatasetConfig(validation_fraction=0.2, seed=3))
    assert [e.split for e in ex] == [e.split for e in ex2]


def test_filters_are_counted():
    good, failed, wrong, nosteps = trace("a"), trace("b", status="failed"), trace("c", correct=False), trace("d")
    steps = steps_for(good) + steps_for(failed) + steps_for(wrong)
    ex, dropped = assemble_examples(
        [good, failed, wrong, nosteps], steps, DatasetConfig(only_correct=True, validation_fraction=0)
    )
    assert [e.problem_id for e in ex] == ["a"]
    assert dropped == {"failed": 1, "incorrect": 1, "too_few_steps": 1}


def test_stats_count_signals_and_steps():
    ts = [trace("a"), trace("b")]
    steps = steps_for(ts[0]) + steps_for(
        ts[1], ("Contrast and Concession", "Reasoning and Analysis", "Conclusion and Summary")
    )
    ex, _ = assemble_examples(ts, steps, DatasetConfig(validation_fraction=0))
    st = dataset_stats(ex, SIG)
    assert st["rows"] == 2 and st["mean_steps"] == 2.5
    assert st["signal_counts"] == {
        "Reasoning and Analysis": 2,
        "Conclusion and Summary": 2,
        "Contrast and Concession": 1,
    }
    assert st["splits"] == {"train": 2} and st["label_sources"] == {"llm": 5}
