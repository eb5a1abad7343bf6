"""Training examples longer than training.max_length: measured per student with its tokenizer,
handled as configured (dropped, refused, or cut in the middle keeping the ending), counted in the
metrics, the model card, the stage summaries and the log, and a max_length that cuts a large share
refused before any model is loaded. Long traces are synthetic R1-style ones (thousands of tokens,
hundreds of steps); the students are tiny random-init models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import make_config
from method_shapes import long_r1_trace, tokenizer_dir

from rscaffold.config import TrainingConfig
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.records import ExampleRecord, LabeledStepRecord, Step, TraceRecord
from rscaffold.segment import split_steps
from rscaffold.stages.dataset import run_dataset
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.training import run_training
from rscaffold.store import StageDir, write_records
from rscaffold.student_format import ExampleTooLongError, LengthCounts, encode_examples
from rscaffold.training.lengths import TooLongExamplesError, length_report

LONG_PARAGRAPHS = 600  # about 12k tokens and 500+ steps, an R1-length trace


def _long_steps() -> list[str]:
    return split_steps(long_r1_trace(LONG_PARAGRAPHS))


def _short_steps(i: int) -> list[str]:
    return [
        f"We have {i} apples and {i + 2} pears.",
        f"Together that is {i} plus {i + 2}.",
        f"The answer is {2 * i + 2}.",
    ]


# ---------------------------------------------------------------------------------------------
# encoding: what each policy does with one long trace


@pytest.fixture(scope="module")
def scaffold_tokenizer():
    from transformers import AutoTokenizer

    from rscaffold.training.signal_tokens import add_tokenizer_signal_tokens

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    names = ["setup", "elaborate", "conclude"]
    tokens = {n: f"<sig:{n}>" for n in names}
    add_tokenizer_signal_tokens(tok, list(tokens.values()))
    return tok, tokens, tok.convert_tokens_to_ids(list(tokens.values()))


def _long_example(names: list[str]) -> ExampleRecord:
    texts = _long_steps()
    steps = [Step(index=k, signal=names[k % len(names)], text=t, source="llm") for k, t in enumerate(texts)]
    return ExampleRecord(
        trace_id="long#0",
        problem_id="long",
        split="train",
        question="How many apples are in the baskets?",
        gold_answer="42",
        steps=steps,
        signals=[s.signal for s in steps],
        n_steps=len(steps),
    )


def test_a_long_trace_is_counted_and_dropped_by_default_never_cut_silently(scaffold_tokenizer):
    tok, tokens, ids = scaffold_tokenizer
    ex = _long_example(list(tokens))
    assert ex.n_steps > 300
    assert TrainingConfig().truncation == "drop"
    counts = LengthCounts()
    rows = encode_examples(
        [ex], tok, tokens, signal_token_ids=ids, max_length=1024, truncation="drop", benchmark="gsm8k", counts=counts
    )
    assert rows == []
    assert counts.lengths[0] > 8000
    assert (counts.over_max_length, counts.dropped, counts.truncated) == (1, 1, 0)
    with pytest.raises(ExampleTooLongError, match="max_length=1024"):
        encode_examples([ex], tok, tokens, signal_token_ids=ids, max_length=1024, truncation="fail")


def test_truncate_keep_end_cuts_the_middle_and_keeps_the_final_answer_and_eos(scaffold_tokenizer):
    tok, tokens, ids = scaffold_tokenizer
    ex = _long_example(list(tokens))
    counts = LengthCounts()
    (row,) = encode_examples(
        [ex], tok, tokens, signal_token_ids=ids, max_length=1024, truncation="truncate_keep_end", counts=counts
    )
    assert (counts.over_max_length, counts.dropped, counts.truncated) == (1, 0, 1)
    assert len(row["input_ids"]) == 1024
    assert row["input_ids"][-1] == tok.eos_token_id and row["labels"][-1] == tok.eos_token_id
    assert "The answer is 42." in tok.decode(row["input_ids"][-40:])
    assert "after step 0 we have" in tok.decode(row["input_ids"])  # the beginning stays too
    # every signal position still points at a signal token, and its class is that token's
    for p, k in zip(row["signal_positions"], row["signal_labels"]):
        assert row["input_ids"][p + 1] == ids[k]


def test_a_max_length_that_cuts_a_large_share_is_refused_with_the_lengths_to_use():
    cfg = TrainingConfig(max_length=512)
    lengths = {"cot_sft": {f"t{i}": 300 for i in range(8)} | {"a": 9000, "b": 12000}}
    with pytest.raises(TooLongExamplesError, match=r"2 of 10 examples \(20%\) would be dropped.*12000"):
        length_report(lengths, cfg)
    report = length_report(lengths, cfg.model_copy(update={"max_over_length_share": 0.25}))
    assert report["cot_sft"].items() >= {"count": 10, "max": 12000, "over_max_length": 2, "dropped": 2}.items()
    with pytest.raises(TooLongExamplesError, match="truncation: fail"):
        length_report({"cot_sft": {"a": 300, "b": 600}}, cfg.model_copy(update={"truncation": "fail"}))


# ---------------------------------------------------------------------------------------------
# the dataset and training stages


def _fabricate_upstream(cfg, fps, *, short: int, long: bool):
    """The teacher's and labeler's outputs as those stages write them (no LLM): ``short`` three-step
    traces and, with ``long``, one R1-length trace."""
    tax = load_taxonomy(cfg.labeling.taxonomy)
    items = [(f"p{i}", f"What is {i} + {i + 2}?", _short_steps(i)) for i in range(short)]
    if long:
        items.append(("plong", "How many apples are in the baskets?", _long_steps()))
    traces, steps = [], []
    for pid, question, texts in items:
        tid = f"{pid}#0"
        traces.append(
            TraceRecord(
                trace_id=tid,
                problem_id=pid,
                sample_index=0,
                question=question,
                gold_answer="1",
                text="\n\n".join(texts),
                predicted_answer="1",
                correct=True,
                finish_reason="stop",
            )
        )
        steps += [
            LabeledStepRecord(
                trace_id=tid,
                problem_id=pid,
                step_index=k,
                text=t,
                signal=tax.names[k % len(tax.names)],
                source="llm",
            )
            for k, t in enumerate(texts)
        ]
    refs = {}
    for stage, name, rows, record in (
        ("teacher", "traces", traces, TraceRecord),
        ("labeling", "labeled_steps", steps, LabeledStepRecord),
    ):
        sd = StageDir(cfg.run.artifacts_dir, stage, fps[stage]).prepare()
        write_records(sd.work / f"{name}.parquet", rows, record)
        outputs = {name: f"{name}.parquet"}
        if stage == "labeling":
            tax.save(sd.work / "taxonomy.yaml")
            outputs["taxonomy"] = "taxonomy.yaml"
        refs[stage] = sd.finish(outputs=outputs, config={}, inputs={}, summary={}, started=0.0, code="test")
    return run_dataset(cfg, fps, teacher=refs["teacher"], labeling=refs["labeling"])


STUDENTS = ["scaffolded", "cot_sft"]


def _config(tiny_model_dir, smollm2_dir, artifacts, **training):
    cfg = make_config(
        tiny_model_dir, smollm2_dir, artifacts, students=STUDENTS, max_steps=1, save_steps=100, **training
    )
    cfg.dataset.validation_fraction = 0.0
    return cfg


def _length_lines(caplog) -> dict[str, str]:
    return {
        name: r.getMessage()
        for r in caplog.records
        for name in STUDENTS
        if r.getMessage().startswith(f"training: {name}: ") and "longer than max_length" in r.getMessage()
    }


def test_the_training_stage_drops_a_long_trace_for_every_student_and_reports_it_everywhere(
    tiny_model_dir, smollm2_dir, tmp_path, caplog
):
    cfg = _config(tiny_model_dir, smollm2_dir, tmp_path / "a", max_length=384)
    fps = plan_fingerprints(cfg)
    dataset = _fabricate_upstream(cfg, fps, short=12, long=True)
    for name in STUDENTS:
        lengths = dataset.summary["token_lengths"][name]
        assert lengths["count"] == 13 and lengths["max"] > 8000 and lengths["over_max_length"] == 1
    with caplog.at_level(logging.INFO, logger="rscaffold"):
        ref = run_training(cfg, fps, dataset)
    metrics = json.loads((Path(ref.path) / "train_metrics.json").read_text())
    lines = _length_lines(caplog)
    for name in STUDENTS:
        for where in (metrics[name]["lengths"], ref.summary[name]["lengths"]):
            assert where["count"] == 13 and where["over_max_length"] == 1
            assert (where["dropped"], where["truncated"]) == (1, 0)
        card = (Path(ref.path) / name / "model" / "README.md").read_text()
        assert "1 longer than max_length 384: 1 dropped, 0 truncated (truncation: drop)" in card
        assert "1 longer than max_length=384; 1 dropped, 0 truncated" in lines[name]


def test_a_short_default_run_reports_zero_affected_examples_for_every_student(
    tiny_model_dir, smollm2_dir, tmp_path, caplog
):
    cfg = _config(tiny_model_dir, smollm2_dir, tmp_path / "b")
    fps = plan_fingerprints(cfg)
    dataset = _fabricate_upstream(cfg, fps, short=6, long=False)
    with caplog.at_level(logging.INFO, logger="rscaffold"):
        ref = run_training(cfg, fps, dataset)
    lines = _length_lines(caplog)
    for name in STUDENTS:
        assert (
            ref.summary[name]["lengths"].items()
            >= {"count": 6, "over_max_length": 0, "dropped": 0, "truncated": 0}.items()
        )
        assert "0 longer than max_length=128; 0 dropped, 0 truncated (truncation: drop)" in lines[name]


def test_a_max_length_that_drops_a_large_share_fails_before_any_model_is_loaded(
    tiny_model_dir, smollm2_dir, tmp_path, monkeypatch, caplog
):
    cfg = _config(tiny_model_dir, smollm2_dir, tmp_path / "c", max_length=384)
    fps = plan_fingerprints(cfg)
    with caplog.at_level(logging.WARNING, logger="rscaffold"):
        dataset = _fabricate_upstream(cfg, fps, short=4, long=True)  # 1 of 5 examples too long: 20% > 10%
    assert "the training stage will refuse to start" in caplog.text

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("rscaffold.training.trainer.load_student_base", no_model)
    monkeypatch.setattr("rscaffold.models.save_tiny_model", no_model)
    with pytest.raises(TooLongExamplesError, match=r"scaffolded: 1 of 5 examples \(20%\) would be dropped"):
        run_training(cfg, fps, dataset)


def test_a_student_trains_on_a_long_trace_cut_in_the_middle_and_its_card_says_so(tmp_path):
    from helpers import STUDENT_SIGNAL_TOKENS, STUDENT_SIGNALS, synthetic_examples, training_config

    from rscaffold.training.trainer import train_student

    cfg = training_config(max_steps=1, max_length=512, truncation="truncate_keep_end", max_over_length_share=1.0)
    examples = synthetic_examples(3) + [_long_example(STUDENT_SIGNALS)]
    result = train_student(
        examples, cfg, STUDENT_SIGNALS, signal_tokens=STUDENT_SIGNAL_TOKENS, output_dir=tmp_path, scaffolded=True
    )
    assert result.lengths.items() >= {"count": 4, "over_max_length": 1, "dropped": 0, "truncated": 1}.items()
    assert result.lengths["max"] > 8000
    card = (result.model_dir / "README.md").read_text()
    assert "1 longer than max_length 512: 0 dropped, 1 truncated (truncation: truncate_keep_end)" in card


def test_a_max_length_that_drops_every_example_is_refused_even_when_the_share_allows_it(
    tiny_model_dir, smollm2_dir, tmp_path, monkeypatch
):
    cfg = _config(tiny_model_dir, smollm2_dir, tmp_path / "d", max_length=16, max_over_length_share=1.0)
    fps = plan_fingerprints(cfg)
    dataset = _fabricate_upstream(cfg, fps, short=3, long=False)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("rscaffold.training.trainer.load_student_base", no_model)
    with pytest.raises(TooLongExamplesError, match=r"every one of the 3 training examples .* nothing to train on"):
        run_training(cfg, fps, dataset)


def test_truncate_keep_end_with_a_max_length_below_the_prompt_says_every_example_was_dropped(
    tiny_model_dir, smollm2_dir, tmp_path
):
    cfg = _config(
        tiny_model_dir,
        smollm2_dir,
        tmp_path / "e",
        max_length=16,
        truncation="truncate_keep_end",
        max_over_length_share=1.0,
    )
    fps = plan_fingerprints(cfg)
    dataset = _fabricate_upstream(cfg, fps, short=3, long=False)
    with pytest.raises(TooLongExamplesError, match=r"all 3 training examples .*max_length=16 and were dropped"):
        run_training(cfg, fps, dataset)
