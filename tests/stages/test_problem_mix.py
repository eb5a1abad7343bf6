"""A training set mixing benchmark families (``problems.mix``): every problem keeps its own
family's prompt and answer checker, from the teacher's request to the student's training rows
and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import ScriptedTeacherBackend, tiny_config_dict

from rscaffold.config import ConfigError, PipelineConfig, ProblemsConfig, config_from_dict, load_config
from rscaffold.prompts import PROMPT_MATH, PROMPT_YESNO
from rscaffold.records import ProblemRecord
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.teacher import generate_traces, teacher_families
from rscaffold.store import StageDir

MATH_ASK = PROMPT_MATH.split("{question}")[1].strip()
YESNO_ASK = PROMPT_YESNO.split("{question}")[1].strip()


def _mix(benchmarks_dir: Path, **limits) -> list[dict]:
    strategyqa = str(benchmarks_dir / "strategyqa" / "strategyqa_train.json")
    return [
        {
            "format": "gsm8k",
            "train": str(benchmarks_dir / "gsm8k" / "train.jsonl"),
            "eval": str(benchmarks_dir / "gsm8k" / "test.jsonl"),
            **limits,
        },
        # StrategyQA has no test split: the eval split is the held-out part of the training file
        {"format": "strategyqa", "train": strategyqa, "eval": strategyqa, **limits},
    ]


def test_a_mix_refuses_single_benchmark_keys_and_two_sets_of_one_name(benchmarks_dir):
    mix = _mix(benchmarks_dir)
    with pytest.raises(ValueError, match="either mix .* or train"):
        ProblemsConfig.model_validate({"mix": mix, "train": mix[0]["train"]})
    custom = {"format": "custom", "train": mix[0]["train"]}
    twins = [
        {**custom, "custom": {"name": "mine", "answer_type": "number"}},
        {**custom, "custom": {"name": "mine", "answer_type": "text"}},
    ]
    with pytest.raises(ValueError, match="both called 'mine'"):
        ProblemsConfig.model_validate({"mix": twins})
    with pytest.raises(ConfigError, match="problems.mix.0.format"):
        config_from_dict({"problems": {"mix": [{"format": "nope", "train": "x.jsonl"}]}})


def test_a_mix_reads_its_files_relative_to_the_config_file(benchmarks_dir, tmp_path):
    (tmp_path / "data").mkdir()
    lines = (benchmarks_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:3]
    (tmp_path / "data" / "math.jsonl").write_text("\n".join(lines) + "\n")
    mix = [{"format": "gsm8k", "train": "data/math.jsonl"}, _mix(benchmarks_dir)[1]]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"problems": {"mix": mix}}))
    cfg = load_config(tmp_path / "grid.yaml")
    assert cfg.problems.mix[0].train == str(tmp_path / "data" / "math.jsonl")
    assert cfg.problems.name == "gsm8k+strategyqa"


def test_the_teacher_asks_and_checks_each_problem_in_its_own_family(benchmarks_dir, tmp_path):
    cfg = PipelineConfig.model_validate({"problems": {"mix": _mix(benchmarks_dir)}})
    problems = [
        ProblemRecord(problem_id="m", split="train", source="gsm8k", question="What is 5+7?", gold_answer="12"),
        ProblemRecord(problem_id="y", split="train", source="strategyqa", question="Is ice cold?", gold_answer="yes"),
    ]
    answers = {"m": "5 plus 7 is 12.\n\nThe answer is 12.", "y": "Ice is frozen water.\n\nThe answer is yes."}
    backend = ScriptedTeacherBackend(lambda pid, i: {"text": answers[pid], "finish_reason": "stop"})

    def never(*_):  # the single-benchmark functions must not be used for a mix
        raise AssertionError("a problem of a mix was checked by the single benchmark's function")

    res = generate_traces(
        problems,
        backend,
        cfg.teacher,
        stage=StageDir(tmp_path, "teacher", "fp").prepare(),
        answer_fn=never,
        check_fn=never,
        families=teacher_families(cfg),
    )
    asked = {r.request_id.split("#")[0]: r.messages[-1]["content"] for r in backend.requests}
    assert MATH_ASK in asked["m"] and YESNO_ASK not in asked["m"]
    assert YESNO_ASK in asked["y"] and MATH_ASK not in asked["y"]
    by_id = {t.problem_id: t for t in res.traces}
    assert by_id["m"].correct and by_id["m"].predicted_answer == "12" and by_id["m"].source == "gsm8k"
    assert by_id["y"].correct and by_id["y"].predicted_answer == "yes" and by_id["y"].source == "strategyqa"


@pytest.mark.slow
def test_a_mixed_training_set_keeps_each_familys_prompt_in_training_and_evaluation(
    benchmarks_dir, tiny_model_dir, smollm2_dir, tmp_path, monkeypatch
):
    from helpers import run_upstream_stages

    import rscaffold.training.trainer as trainer_mod
    from rscaffold.stages.evaluation import _suites
    from rscaffold.stages.problems import read_problems
    from rscaffold.stages.training import run_training

    raw = tiny_config_dict(
        tiny_model_dir, smollm2_dir, tmp_path / "artifacts", max_steps=1, students=["scaffolded"], max_length=512
    )
    raw["problems"] = {"mix": _mix(benchmarks_dir, limit_train=3, limit_eval=2)}
    raw["dataset"] = {"validation_fraction": 0.0}
    cfg = config_from_dict(raw)
    fps = plan_fingerprints(cfg)
    upstream = run_upstream_stages(cfg, fps)

    problems = read_problems(upstream["problems"])
    assert sorted((p.split, p.source) for p in problems).count(("train", "strategyqa")) == 3
    assert {(p.split, p.source) for p in problems} == {
        (s, b) for s in ("train", "eval") for b in ("gsm8k", "strategyqa")
    }
    sqa = {p.problem_id for p in problems if p.source == "strategyqa"}
    assert len(sqa) == 5  # the held-out eval part is disjoint from the training part

    # the students' training rows: the math prompt for GSM8K problems, the yes/no one for StrategyQA
    seen: list[tuple[str | None, str]] = []
    original = trainer_mod.encode_examples

    def recording(examples, tokenizer, *a, **kw):
        rows = original(examples, tokenizer, *a, **kw)
        assert len(rows) == len(examples)
        seen.extend((e.source, tokenizer.decode(r["input_ids"])) for e, r in zip(examples, rows))
        return rows

    monkeypatch.setattr(trainer_mod, "encode_examples", recording)
    ref = run_training(cfg, fps, upstream["dataset"])
    assert {s for s, _ in seen} == {"gsm8k", "strategyqa"}
    for source, text in seen:
        mine, other = (MATH_ASK, YESNO_ASK) if source == "gsm8k" else (YESNO_ASK, MATH_ASK)
        assert mine in text and other not in text, (source, text[:300])
    meta = json.loads((Path(ref.path) / ref.outputs["scaffolded"] / "rscaffold_student.json").read_text())
    assert meta["prompt_benchmark"] == {"gsm8k": "gsm8k", "strategyqa": "strategyqa"}  # what picks each prompt

    # the exported dataset's user turns: each example in its own family's prompt
    import polars as pl

    from rscaffold.evalsets.loaders import prompt_families
    from rscaffold.export import chat_columns
    from rscaffold.labeling.taxonomy import load_taxonomy

    examples = pl.read_parquet(upstream["dataset"].output("examples"))
    tax = load_taxonomy(upstream["dataset"].output("taxonomy"))
    chat = chat_columns(examples, tax, benchmark=prompt_families(cfg.problems))
    for source, prompt in zip(chat["source"], chat["prompt"]):
        assert (MATH_ASK if source == "gsm8k" else YESNO_ASK) in prompt[1]["content"]

    # the evaluation answers each benchmark of the eval split with its own prompt and checker
    suites = {s.name: s for s in _suites(cfg, upstream["problems"])}
    assert set(suites) == {"gsm8k", "strategyqa"}
    assert (suites["gsm8k"].answer_type, suites["strategyqa"].answer_type) == ("math", "yesno")
    assert all(MATH_ASK in q for q in suites["gsm8k"].prompts()) and len(suites["gsm8k"].problems) == 2
    assert all(YESNO_ASK in q for q in suites["strategyqa"].prompts()) and len(suites["strategyqa"].problems) == 2
