"""The paper's baselines. Besides long-thinking distillation (``cot_sft``, SFT on
the whole teacher trace), a short-CoT student (``short_cot``) is trained on the teacher's final
answer text, what follows its reasoning block; the set of students is configuration. The stage
level (all students trained and evaluated side by side) is in ``tests/method/test_stages.py``.
"""

from __future__ import annotations

import pytest

from rscaffold.config import DatasetConfig, PipelineConfig, TrainingConfig
from rscaffold.dataset import assemble_examples
from rscaffold.records import LabeledStepRecord, TraceRecord
from rscaffold.stages.training import training_variants
from rscaffold.store import write_records
from rscaffold.vocabulary import EVAL_MODELS, STUDENTS, TRAINED_STUDENTS

REASONING = "Tom has 3 boxes.\n\nEach box holds 4 apples.\n\nWait, 3 * 4 = 12."
ANSWER = "3 boxes of 4 apples make 12 apples.\n\nThe answer is 12."


def test_the_dataset_keeps_the_teachers_final_answer_text(tmp_path):
    trace = TraceRecord(
        trace_id="t0#0", problem_id="t0", sample_index=0, question="q", gold_answer="12", text=ANSWER,
        reasoning=REASONING,
    )  # fmt: skip
    steps = [
        LabeledStepRecord(trace_id="t0#0", problem_id="t0", step_index=k, text=t, signal="s", source="llm")
        for k, t in enumerate(REASONING.split("\n\n") + ANSWER.split("\n\n"))
    ]
    write_records(tmp_path / "traces.parquet", [trace], TraceRecord)
    write_records(tmp_path / "steps.parquet", steps, LabeledStepRecord)
    examples, _ = assemble_examples(
        tmp_path / "traces.parquet", tmp_path / "steps.parquet", DatasetConfig(validation_fraction=0)
    )
    (example,) = examples.to_dicts()
    assert example["answer_text"] == ANSWER and example["n_steps"] == 5


def test_short_cot_trains_on_the_answer_text_and_cot_sft_on_the_whole_trace():
    pytest.importorskip("torch")
    from method_shapes import examples, tiny_llama

    from rscaffold.student_format import completion_steps, encode_examples

    _, tok = tiny_llama()
    (ex,) = examples(1, answer_text=True)
    assert [t for _, t in completion_steps(ex, "answer")] == ex.answer_text.split("\n\n")

    def completion(target):
        (row,) = encode_examples([ex], tok, None, target=target, benchmark="gsm8k")
        return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])

    assert completion("answer") == ex.answer_text + tok.eos_token
    assert completion("trace") == "\n\n".join(s.text for s in ex.steps) + tok.eos_token
    # a row without answer text (a teacher cut off inside its reasoning) is left out
    (bare,) = examples(1)
    assert encode_examples([bare], tok, None, target="answer") == []


def test_the_students_are_configuration():
    assert TRAINED_STUDENTS == ("scaffolded", "cot_sft", "short_cot")  # training order: the method first
    assert STUDENTS == ("base", "short_cot", "cot_sft", "scaffolded")  # report order
    assert TrainingConfig().students == list(TRAINED_STUDENTS)
    cfg = PipelineConfig.model_validate({"training": {"students": ["short_cot", "scaffolded"]}})
    assert training_variants(cfg) == [("scaffolded", True), ("short_cot", False)]
    for old in ({"train_baseline": False}, {"train_baseline": False, "students": ["cot_sft", "scaffolded"]}):
        assert training_variants(PipelineConfig.model_validate({"training": old})) == [("scaffolded", True)]
    assert list(EVAL_MODELS[:4]) == ["base", "short_cot", "cot_sft", "scaffolded"]
    assert PipelineConfig().evaluation.models == list(EVAL_MODELS)
    with pytest.raises(ValueError):
        TrainingConfig(students=[])
