"""The problems stage, and how a custom format reaches the teacher prompt, the answer checker and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from rscaffold.config import config_from_dict
from rscaffold.evalsets.loaders import benchmark_for
from rscaffold.evaluation.suites import benchmark_source_digest, evaluation_suites
from rscaffold.prompts import PROMPT_MATH, PROMPT_TEXT
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import read_problems, run_problems
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
