"""The evaluation stage (rscaffold.stages.evaluation) on five benchmarks (slices of the published
files), with tiny models: prompts, predictions, metrics, report, partial work, fingerprint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import RANDOM_STUDENT_SIGNALS, RANDOM_STUDENT_TOKENS, png_size

from rscaffold.config import TinyModelConfig, config_from_dict


def _slice_benchmarks(src: Path, dst: Path, n: int = 3) -> Path:
    """The first ``n`` problems of each shared benchmark file, in its published format."""
    for name, fname in [("gsm8k", "test.jsonl"), ("math500", "test.jsonl"), ("commonsenseqa", "dev_rand_split.jsonl")]:
        lines = (src / name / fname).read_text().splitlines()[:n]
        (dst / name).mkdir(parents=True)
        (dst / name / fname).write_text("\n".join(lines) + "\n")
    (dst / "strategyqa").mkdir()
    rows = json.loads((src / "strategyqa" / "strategyqa_train.json").read_text())[:n]
    (dst / "strategyqa" / "strategyqa_train.json").write_text(json.dumps(rows, indent=2))
    (dst / "truthfulqa").mkdir()
    with open(src / "truthfulqa" / "TruthfulQA.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        rows = [next(reader) for _ in range(n + 1)]
    with open(dst / "truthfulqa" / "TruthfulQA.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return dst


@pytest.fixture(scope="module")
def students(random_student, smollm2_dir, tmp_path_factory) -> Path:
    """A training stage directory with a plain tiny base model and a scaffolded tiny student."""
    from rscaffold.models import save_tiny_model

    d = tmp_path_factory.mktemp("training")
    save_tiny_model(str(smollm2_dir), TinyModelConfig(), d / "base")
    s = random_student
    s.model.save_pretrained(d / "scaffolded")
    s.tokenizer.save_pretrained(d / "scaffolded")
    meta = {
        "scaffolded": True,
        "signal_objective": "token",
        "signal_names": RANDOM_STUDENT_SIGNALS,
        "signal_tokens": RANDOM_STUDENT_TOKENS,
        "signal_token_ids": s.signal_token_ids,
        "system_prompt": s.system_prompt,
    }
    (d / "scaffolded" / "rscaffold_student.json").write_text(json.dumps(meta))
    return d


def test_evaluation_stage_on_five_benchmarks(students, benchmarks_dir, tmp_path, monkeypatch):
    import polars as pl

    import rscaffold.decoding.in_process as inference
    from rscaffold.evalsets.loaders import BENCHMARKS
    from rscaffold.stages.evaluation import run_evaluation
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.problems import run_problems
    from rscaffold.store import StageRef

    bench = _slice_benchmarks(benchmarks_dir, tmp_path / "bench")
    names = ["gsm8k", "math500", "strategyqa", "commonsenseqa", "truthfulqa"]
    cfg = config_from_dict(
        {
            "run": {"artifacts_dir": str(tmp_path / "artifacts")},
            "evaluation": {
                "models": ["base", "scaffolded"],
                "benchmarks": [{"name": n, "source": str(bench), "limit": 2, "seed": 1} for n in names],
                "max_new_tokens": 16,
                "batch_size": 4,
                "bootstrap_samples": 50,
                "guided": {"max_steps": 2, "max_step_tokens": 6},
            },
        }
    )
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    training = StageRef("training", "t" * 16, str(students), {"base": "base", "scaffolded": "scaffolded"})
    labeling_dir = tmp_path / "labeling"
    labeling_dir.mkdir()
    teacher = {
        "names": RANDOM_STUDENT_SIGNALS,
        "transitions": [[0, 3, 1, 2], [0, 1, 2, 3], [1, 0, 0, 4], [0, 0, 0, 0]],
        "signal_counts": {"setup": 6, "elaborate": 6, "check": 5, "conclude": 9},
    }
    (labeling_dir / "quality.json").write_text(json.dumps(teacher))
    labeling = StageRef("labeling", "l" * 16, str(labeling_dir), {"quality": "quality.json"})

    prompts: dict[str, list[str]] = {}
    original = inference.generate

    def recording(student, questions, **kw):
        prompts.setdefault(kw["mode"], []).extend(questions)
        return original(student, questions=questions, **kw)

    monkeypatch.setattr(inference, "generate", recording)
    ref = run_evaluation(cfg, fps, problems=problems, training=training, labeling=labeling)

    preds = pl.read_parquet(Path(ref.path) / "predictions.parquet")
    # every benchmark's own answer format reaches the model, in both decoding modes
    base = preds.filter(pl.col("model") == "base")
    expected = sorted(BENCHMARKS[b].render_prompt(q) for b, q in zip(base["benchmark"], base["question"]))
    assert sorted(prompts["plain"]) == expected == sorted(prompts["guided"])
    assert any("'The answer is yes.' or 'The answer is no.'" in q for q in expected)
    assert preds.height == 2 * 5 * 2
    assert sorted(preds["benchmark"].unique().to_list()) == sorted(names)
    assert set(preds.filter(pl.col("model") == "scaffolded")["decoding"]) == {"guided"}
    assert {"consistent", "consistency_check", "consistency_evidence", "n_steps"} <= set(preds.columns)
    # every step's signal source is recorded, and the report shows their shares per model
    sources = preds.filter(pl.col("model") == "scaffolded")["signal_sources"].to_list()
    assert all(s and set(s) <= {"gate", "free", "none"} for s in sources)
    assert "## Signal sources" in (Path(ref.path) / "report.md").read_text()
    metrics = pl.read_parquet(Path(ref.path) / "metrics.parquet")
    assert metrics.height == 10 and metrics["accuracy"].is_between(0, 1).all()
    scaf = metrics.filter(pl.col("model") == "scaffolded")
    assert (scaf["generated_signals"] > 0).any() and scaf["transition_tv"].drop_nulls().len() > 0
    assert metrics.filter(pl.col("model") == "base")["transition_tv"].null_count() == 5
    # report, chart, manifest
    text = (Path(ref.path) / "report.md").read_text()
    assert "| model | gsm8k | math500 | strategyqa | commonsenseqa | truthfulqa |" in text
    assert png_size(Path(ref.path) / "accuracy.png")[0] > 300
    assert [r["model"] for r in ref.summary["accuracy_table"]] == ["base", "scaffolded"]
    assert ref.summary["benchmarks"] == {n: 2 for n in names}
    assert json.loads((Path(ref.path) / "manifest.json").read_text())["inputs"]["labeling"] == "l" * 16
    # partial work per model and benchmark, under shards/
    assert len(list((Path(ref.path) / "shards").glob("predictions-*-*.parquet"))) == 10

    # the benchmark files' contents are part of the fingerprint
    gsm = bench / "gsm8k" / "test.jsonl"
    gsm.write_text(gsm.read_text().replace("?", "??", 1))
    assert plan_fingerprints(cfg)["evaluation"] != fps["evaluation"]
    assert plan_fingerprints(cfg)["training"] == fps["training"]
