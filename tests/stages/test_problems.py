"""The problems stage, and how a custom format reaches the teacher prompt, the answer checker and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rscaffold.config import config_from_dict
from rscaffold.evalsets.loaders import benchmark_for, load_problems
from rscaffold.evaluation.report import overlap_section
from rscaffold.evaluation.suites import benchmark_source_digest, evaluation_suites
from rscaffold.prompts import PROMPT_MATH, PROMPT_TEXT
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import ProblemOverlapError, overlap_removed, read_problems, run_problems
from rscaffold.stages.teacher import teacher_prompt_config


def _custom_config(tmp_path: Path, answer_type: str = "number") -> dict:
    rows = [{"uid": f"w{i}", "body": f"What is {i} + {i}?", "result": 2 * i} for i in range(6)]
    (tmp_path / "train.json").write_text(json.dumps(rows[:4]))
    (tmp_path / "test.json").write_text(json.dumps(rows[4:]))
    quiz = [{"q": "Capital of France?", "a": "Paris"}]
    (tmp_path / "quiz.jsonl").write_text("\n".join(json.dumps(r) for r in quiz) + "\n")
    return {
        "run": {"artifacts_dir": str(tmp_path / "artifacts")},
        "problems": {
            "format": "custom",
            "train": "train.json",
            "eval": "test.json",
            "custom": {
                "name": "wordmath",
                "answer_type": answer_type,
                "fields": {"question": "body", "answer": "result", "id": "uid"},
            },
        },
    }


def test_custom_problems_reach_every_stage(tmp_path: Path) -> None:
    cfg = config_from_dict(_custom_config(tmp_path), base=tmp_path)
    fps = plan_fingerprints(cfg)
    ref = run_problems(cfg, fps)
    train, evl = read_problems(ref, "train"), read_problems(ref, "eval")
    assert [p.problem_id for p in train] == ["wordmath-w0", "wordmath-w1", "wordmath-w2", "wordmath-w3"]
    assert [p.gold_answer for p in evl] == ["8", "10"]
    # the teacher's prompt and checker come from the answer type
    assert teacher_prompt_config(cfg).prompt_template == PROMPT_MATH
    assert benchmark_for(cfg.problems.format, cfg.problems.custom).answer_type == "math"
    # evaluation: the problems' eval split under the custom name, and a custom benchmark beside a built-in one
    (suite,) = evaluation_suites(cfg.evaluation, benchmark_for("custom", cfg.problems.custom), evl)
    assert suite.name == "wordmath" and suite.answer_type == "math" and len(suite.problems) == 2
    raw = _custom_config(tmp_path)
    raw["evaluation"] = {
        "benchmarks": [
            {
                "name": "custom",
                "source": "quiz.jsonl",
                "custom": {"name": "quiz", "answer_type": "text", "fields": {"question": "q", "answer": "a"}},
            },
            {"name": "custom", "source": "test.json", "custom": raw["problems"]["custom"]},
        ]
    }
    cfg2 = config_from_dict(raw, base=tmp_path)
    quiz, wordmath = evaluation_suites(cfg2.evaluation, "gsm8k", [])
    assert (quiz.name, quiz.answer_type, quiz.prompt_template) == ("quiz", "text", PROMPT_TEXT)
    assert quiz.problems[0].gold_answer == "Paris" and wordmath.name == "wordmath"
    assert benchmark_source_digest(cfg2.evaluation.benchmarks[0])


def test_custom_spec_enters_the_fingerprints(tmp_path: Path) -> None:
    a = plan_fingerprints(config_from_dict(_custom_config(tmp_path, "number"), base=tmp_path))
    b = plan_fingerprints(config_from_dict(_custom_config(tmp_path, "math"), base=tmp_path))
    assert a["problems"] != b["problems"] and a["teacher"] != b["teacher"]


def test_the_custom_example_config_loads(tmp_path: Path) -> None:
    from rscaffold.config import load_config
    from rscaffold.evalsets.loaders import load_problems

    cfg = load_config(Path(__file__).resolve().parents[2] / "data" / "examples" / "custom_problems.yaml")
    bench = benchmark_for(cfg.problems.format, cfg.problems.custom)
    train = load_problems(cfg.problems.train, bench, split="train")
    assert len(train) == 8 and train[0].problem_id == "wordmath-wm-001" and train[4].gold_answer == "900"
    assert len(load_problems(cfg.problems.eval, bench)) == 4


def _strategyqa_config(tmp_path: Path, benchmarks_dir: Path, **problems) -> dict:
    """Training on StrategyQA's one published file, evaluating it (a directory that holds the file)."""
    file = str(benchmarks_dir / "strategyqa" / "strategyqa_train.json")
    return {
        "run": {"artifacts_dir": str(tmp_path / "artifacts")},
        "problems": {"format": "strategyqa", "train": file, "eval": file, **problems},
        "evaluation": {"benchmarks": [{"name": "strategyqa", "source": str(benchmarks_dir), "part": "heldout"}]},
    }


def test_training_on_a_benchmark_file_leaves_its_heldout_part_out(tmp_path: Path, benchmarks_dir: Path) -> None:
    cfg = config_from_dict(_strategyqa_config(tmp_path, benchmarks_dir), base=tmp_path)
    ref = run_problems(cfg, plan_fingerprints(cfg))
    train = read_problems(ref, "train")
    (suite,) = evaluation_suites(cfg.evaluation, "strategyqa", read_problems(ref, "eval"))
    heldout = {p.problem_id for p in suite.problems}
    assert len(heldout) > 400 and len(train) > 1500
    assert not heldout & {p.problem_id for p in train}
    # the problems' own eval split of the same file is the held-out part too
    assert {p.problem_id for p in read_problems(ref, "eval")} == heldout
    assert ref.summary["training_part"] == "train" and ref.summary["overlap_removed"] == {"strategyqa": 0}


def test_evaluating_trained_problems_fails_naming_counts_and_examples(tmp_path: Path, benchmarks_dir: Path) -> None:
    raw = _strategyqa_config(tmp_path, benchmarks_dir, part="all", limit_train=1000, seed=3)
    raw["evaluation"]["benchmarks"][0].update(part="all", limit=20)
    train_ids = {p.problem_id for p in load_problems(benchmarks_dir, "strategyqa", "train", limit=1000, seed=3)}
    evaluated = load_problems(benchmarks_dir, "strategyqa", "eval", limit=20)
    expected = sum(p.problem_id in train_ids for p in evaluated)
    assert 0 < expected < 20
    cfg = config_from_dict(raw, base=tmp_path)
    with pytest.raises(
        ProblemOverlapError, match=rf"{expected} of 20 problems of evaluation benchmark 'strategyqa'"
    ) as err:
        run_problems(cfg, plan_fingerprints(cfg))
    assert "strategyqa-" in str(err.value) and "on_overlap" in str(err.value)
    # remove: the overlapping problems leave the evaluation, counted in the manifest and the suites
    raw["problems"]["on_overlap"] = "remove"
    cfg = config_from_dict(raw, base=tmp_path)
    ref = run_problems(cfg, plan_fingerprints(cfg))
    assert ref.summary["overlap_removed"] == {"strategyqa": expected}
    (suite,) = evaluation_suites(cfg.evaluation, "strategyqa", [], exclude=overlap_removed(ref))
    assert suite.removed_overlap == expected and len(suite.problems) == 20 - expected
    assert not {p.problem_id for p in suite.problems} & train_ids
    (tmp_path / "overlap.json").write_text(json.dumps({"strategyqa": expected}))
    assert "Left out: trained on" in overlap_section(tmp_path / "overlap.json")


def test_overlap_is_found_by_normalised_question_text(tmp_path: Path) -> None:
    raw = _custom_config(tmp_path)
    rows = [
        {"uid": "x1", "body": "  what IS 0 + 0 ", "result": 0},
        {"uid": "x2", "body": "What is 9 + 9?", "result": 18},
    ]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    cfg = config_from_dict(raw, base=tmp_path)
    with pytest.raises(ProblemOverlapError, match=r"1 of 2 problems .*wordmath-x1 = training wordmath-w0"):
        run_problems(cfg, plan_fingerprints(cfg))
    raw["problems"]["on_overlap"] = "remove"
    cfg = config_from_dict(raw, base=tmp_path)
    ref = run_problems(cfg, plan_fingerprints(cfg))
    assert [p.problem_id for p in read_problems(ref, "eval")] == ["wordmath-x2"]
    assert ref.summary["overlap_removed"] == {"wordmath": 1}


def test_custom_question_template_for_problems_and_evaluation_benchmarks(tmp_path: Path) -> None:
    rows = [
        {"uid": f"s{i}", "Body": f"Jo has {i} pens and buys {i} more.", "Question": "How many pens now?", "n": 2 * i}
        for i in range(1, 5)
    ]
    (tmp_path / "svamp.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    custom = {
        "name": "svamp",
        "answer_type": "number",
        "fields": {"question_template": "{Body} {Question}", "answer": "n", "id": "uid"},
    }
    raw = {
        "run": {"artifacts_dir": str(tmp_path / "artifacts")},
        "problems": {"format": "custom", "train": "svamp.jsonl", "eval": "svamp.jsonl", "custom": custom},
        "evaluation": {
            "benchmarks": [{"name": "custom", "source": "svamp.jsonl", "part": "heldout", "custom": custom}]
        },
    }
    cfg = config_from_dict(raw, base=tmp_path)
    ref = run_problems(cfg, plan_fingerprints(cfg))
    train = read_problems(ref, "train")
    assert train and all(p.question.startswith("Jo has") and p.question.endswith("How many pens now?") for p in train)
    (suite,) = evaluation_suites(cfg.evaluation, "gsm8k", [], exclude=overlap_removed(ref))
    assert suite.problems and all(p.question.endswith(" more. How many pens now?") for p in suite.problems)
    assert not {p.problem_id for p in suite.problems} & {p.problem_id for p in train}


def test_removing_an_overlap_that_is_the_whole_evaluation_is_refused(tmp_path: Path) -> None:
    raw = _custom_config(tmp_path)
    raw["problems"].update(eval="train.json", part="all", on_overlap="remove")
    cfg = config_from_dict(raw, base=tmp_path)
    with pytest.raises(ProblemOverlapError, match=r"nothing to evaluate: all 4 problems of evaluation benchmark"):
        run_problems(cfg, plan_fingerprints(cfg))
