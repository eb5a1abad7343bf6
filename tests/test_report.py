"""Evaluation on several benchmarks: consistency checks, signal agreement with the teacher,
batched guided decoding, the report (and its regeneration from Parquet), the stage itself."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest

from rscaffold.config import BenchmarkSource, EvaluationConfig, GuidedInferenceConfig, TinyModelConfig, config_from_dict
from rscaffold.evaluation.consistency import check_consistency, yesno_verdicts
from rscaffold.evaluation.metrics import compute_metrics, score_output
from rscaffold.evaluation.report import accuracy_table, find_evaluation_dir, render_report, write_report
from rscaffold.evaluation.signals import transition_agreement, transition_counts
from rscaffold.records import MetricRecord, PredictionRecord, ProblemRecord
from rscaffold.store import write_records

# ---------------------------------------------------------------------------------------------
# consistency checks


@pytest.mark.parametrize(
    "output, predicted, consistent, check",
    [
        ("6 * 3 = 18 apples.\n\nThe answer is 18.", "18", True, "math_equation"),
        ("6 * 3 = 18.\n\nThe answer is 20.", "20", False, "math_equation"),
        # a result said in words after the last computation counts too
        ("She had 20. 20 - 4 = 16. She buys 2 more, so she has 18.\n\nThe answer is 18.", "18", True, "math_equation"),
        ("She had 20. 20 - 4 = 16. She buys 2 more, so she has 18.\n\nThe answer is 2.", "2", False, "math_equation"),
        # chains: the last link is the result
        ("x = 3 + 4 = 7\n\nThe answer is 7", "7", True, "math_equation"),
        ("3 + 4 = 7 + 1 = 8\n\nThe answer is 7", "7", False, "math_equation"),
        # calculator annotations, LaTeX operators, thousands separators, "3 x 4"
        ("<<6*3=18>>18 eggs. The answer is 18", "18", True, "math_equation"),
        ("$2 \\times 1,500 = 3,000$ dollars.\n\nAnswer: 3000", "3000", True, "math_equation"),
        ("3 x 4 = 12\n\n#### 12", "12", True, "math_equation"),
        ("So 6 \\cdot 3 = \\boxed{18}", "18", True, "math_answer_is_result"),
        # no computation: the last number before the answer statement
        ("Tom has 5 apples.\n\nThe answer is 7.", "7", False, "math_last_number"),
        ("Tom has 7 apples left.\n\nThe answer is 7.", "7", True, "math_last_number"),
        # nothing to compare with: not checked
        ("The answer is 7.", "7", None, None),
        ("maybe 7", "7", None, None),  # no stated answer (extracted from the last number)
        ("6 * 3 = 18", None, None, None),
    ],
)
def test_math_consistency(output, predicted, consistent, check):
    c = check_consistency(output, predicted, "math")
    assert (c.consistent, c.check) == (consistent, check), c


@pytest.mark.parametrize(
    "output, predicted, consistent",
    [
        ("Yes, birds can fly.\n\nBut penguins are birds that cannot.\n\nThe answer is no.", "no", False),
        ("So, yes.\n\nWait, that is wrong.\n\nThe answer is no.", "no", False),
        ("The answer is yes.\n\nThe answer is no.", "no", False),
        (
            "No one lives there now.\n\nIt was abandoned in 1900.\n\nThe answer is yes.",
            "yes",
            True,
        ),  # "No one": no verdict
        ("Therefore, yes.\n\nThe answer is \\boxed{yes}.", "yes", True),
        ("Penguins cannot fly.\n\nThe answer is no.", "no", True),
        ("I am not sure.", None, None),
    ],
)
def test_yesno_polarity_consistency(output, predicted, consistent):
    c = check_consistency(output, predicted, "yesno")
    assert c.consistent is consistent
    if consistent is not None:
        assert c.check == "yesno_polarity"
    if consistent is False:
        assert "vs answer" in c.evidence


def test_verdicts_and_choice_not_checked():
    assert [v[1] for v in yesno_verdicts("Yes. So, no! The answer is: true")] == ["yes", "no", "yes"]
    assert check_consistency("The answer is B.", "B", "choice").consistent is None


def test_score_output_flags_and_choice_options():
    q = "Where do fish live?\nA. desert\nB. river\nC. sky"
    p = ProblemRecord(problem_id="c1", split="eval", source="commonsenseqa", question=q, gold_answer="B")
    # answered with the option's text, not its letter: found through the question's options
    r = score_output(
        "base",
        "commonsenseqa",
        p,
        output="Fish need water.\n\nThey live in a river",
        answer_type="choice",
        output_tokens=9,
        signals=[],
        latency_s=0.1,
        decoding="plain",
    )
    assert r.predicted_answer == "B" and r.correct and r.consistent is None and r.n_steps == 2 and r.decoding == "plain"
    m = ProblemRecord(problem_id="m1", split="eval", source="gsm8k", question="q", gold_answer="20")
    bad = score_output(
        "cot_sft",
        "gsm8k",
        m,
        output="6 * 3 = 18\n\nThe answer is 20.",
        answer_type="math",
        output_tokens=9,
        signals=[],
        latency_s=0.1,
    )
    assert (
        bad.correct
        and bad.consistent is False
        and bad.consistency_check == "math_equation"
        and bad.consistency_evidence == "6 * 3 = 18"
    )


# ---------------------------------------------------------------------------------------------
# agreement of generated signals with the teacher's transitions

NAMES = ["A", "B", "C"]


def test_transition_agreement_identical_and_disjoint():
    teacher = transition_counts([["A", "B", "C"], ["A", "B", "C"]], NAMES)
    assert teacher == [[0, 2, 0], [0, 0, 2], [0, 0, 0]]
    same = transition_agreement([["A", "B", "C"]], teacher, NAMES, teacher_signal_counts={"A": 2, "B": 2, "C": 2})
    assert same["transition_tv"] == 0 and same["transition_coverage"] == 1 and same["signal_tv"] == 0
    assert same["rows_compared"] == 2 and same["generated_transitions"] == 2
    assert same["transition_kl"] == pytest.approx(math.log(2.5 / 1.5))  # smoothing only: (1 + .5) / (1 + 3 * .5)
    # from A the student always goes to C, from B always back to A: disjoint next-signal rows
    other = transition_agreement(
        [["A", "C"], ["B", "A"]], teacher, NAMES, teacher_signal_counts={"A": 2, "B": 2, "C": 2}
    )
    assert other["transition_tv"] == pytest.approx(1.0) and other["transition_kl"] > same["transition_kl"]


def test_transition_agreement_weights_rows_by_teacher_mass():
    teacher = [[3, 1, 0], [0, 0, 0], [0, 0, 1]]  # A: 4 transitions, C: 1
    gen = [["A", "A", "B"], ["C", "A"]]  # A -> A, A -> B; C -> A
    out = transition_agreement(gen, teacher, NAMES)
    tv_a = 0.5 * (abs(0.75 - 0.5) + abs(0.25 - 0.5))
    tv_c = 0.5 * (1 + 1)
    assert out["transition_tv"] == pytest.approx(0.8 * tv_a + 0.2 * tv_c)
    assert out["transition_coverage"] == 1.0 and out["signal_tv"] is None
    # rows the student never leaves are not compared; coverage says how much of the teacher is left out
    only_a = transition_agreement([["A", "B"]], teacher, NAMES)
    assert only_a["rows_compared"] == 1 and only_a["transition_coverage"] == pytest.approx(0.8)
    assert transition_agreement([[]], teacher, NAMES)["transition_tv"] is None


def _pred(model, bench, i, correct, signals=(), consistent=None, tokens=10):
    return PredictionRecord(
        model=model,
        benchmark=bench,
        problem_id=f"{bench}-{i}",
        question="q",
        gold_answer="1",
        output="o",
        predicted_answer="1" if correct else "2",
        correct=correct,
        parsed=True,
        output_tokens=tokens,
        signals=list(signals),
        latency_s=0.01,
        decoding="guided" if signals else "plain",
        n_steps=max(1, len(signals)),
        consistent=consistent,
        consistency_check=None if consistent is None else "math_equation",
        consistency_evidence=None if consistent is not False else "1 + 1 = 2",
    )


def _predictions() -> list[PredictionRecord]:
    out = []
    for bench in ("gsm8k", "strategyqa"):
        for i in range(6):
            out.append(_pred("base", bench, i, i % 3 == 0, consistent=i % 2 == 0))
            out.append(
                _pred(
                    "scaffolded",
                    bench,
                    i,
                    i % 2 == 0,
                    signals=["A", "B", "C"] if i % 2 else ["A", "C"],
                    consistent=True,
                )
            )
    return out


TEACHER = {"names": NAMES, "transitions": [[0, 4, 1], [0, 0, 4], [0, 0, 0]], "signal_counts": {"A": 5, "B": 4, "C": 5}}


def test_metrics_with_consistency_and_agreement():
    metrics = {(m.model, m.benchmark): m for m in compute_metrics(_predictions(), 200, 0, teacher=TEACHER)}
    base, scaf = metrics[("base", "gsm8k")], metrics[("scaffolded", "gsm8k")]
    assert (
        base.accuracy == pytest.approx(2 / 6)
        and base.consistency_checked == 6
        and base.consistency_rate == pytest.approx(0.5)
    )
    assert base.transition_tv is None and base.generated_signals == 0
    assert scaf.generated_signals == 15 and scaf.mean_steps == pytest.approx(2.5)
    assert 0 <= scaf.transition_tv <= 1 and scaf.transition_kl >= 0 and scaf.signal_tv is not None
    assert compute_metrics(_predictions(), 0)[0].transition_tv is None  # no teacher: no agreement


# ---------------------------------------------------------------------------------------------
# the report, and its regeneration from the Parquet files alone


def _write_eval_dir(d: Path, predictions, finished_at: float) -> Path:
    d.mkdir(parents=True)
    write_records(d / "predictions.parquet", predictions, PredictionRecord)
    write_records(d / "metrics.parquet", compute_metrics(predictions, 200, 0, teacher=TEACHER), MetricRecord)
    (d / "manifest.json").write_text(json.dumps({"finished_at": finished_at}))
    return d


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_report_regenerated_from_parquet(tmp_path):
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    root = tmp_path / "artifacts"
    old = _write_eval_dir(root / "evaluation" / "aaaa", _predictions()[:12], finished_at=1.0)
    new = _write_eval_dir(root / "evaluation" / "bbbb", _predictions(), finished_at=2.0)
    (root / "training").mkdir()
    report, chart = write_report(new)
    text = report.read_text()
    w, h = _png_size(chart)
    assert w > 300 and h > 200
    # one table, models x benchmarks, accuracy with its interval
    assert "| model | gsm8k | strategyqa |" in text
    row = accuracy_table(compute_metrics(_predictions(), 200, 0))[0]
    assert row["model"] == "base" and f"| base | {row['gsm8k']} | {row['strategyqa']} |" in text
    assert "![accuracy per model and benchmark](accuracy.png)" in text
    assert "math_equation" in text and "Inconsistent examples" in text and "transition TV" in text
    # deterministic: the same files give the same report
    report.unlink()
    chart.unlink()
    assert write_report(new)[0].read_text() == text

    # the command accepts the directory itself, the artifacts root and its evaluation/ folder
    assert find_evaluation_dir(new) == new.resolve()
    assert find_evaluation_dir(root) == new.resolve() == find_evaluation_dir(root / "evaluation")
    (new / "report.md").unlink()
    res = CliRunner().invoke(app, ["report", str(root)])
    assert res.exit_code == 0, res.output
    assert "newest evaluation" in res.output and "bbbb" in res.output.replace("\n", "") and (new / "report.md").exists()
    assert not (old / "report.md").exists()
    res = CliRunner().invoke(app, ["report", str(old)])
    assert res.exit_code == 0 and "newest" not in res.output and (old / "report.md").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2


def test_render_report_without_signals_or_checks():
    preds = [_pred("base", "commonsenseqa", i, i == 0) for i in range(3)]
    text = render_report(compute_metrics(preds, 0), preds, chart=None)
    assert "| base | 33.3 [33.3, 33.3] |" in text and "No model generated signals." in text and "![" not in text


# ---------------------------------------------------------------------------------------------
# config


def test_benchmark_sources_config(tmp_path):
    (tmp_path / "bench").mkdir()
    cfg = config_from_dict(
        {
            "evaluation": {
                "benchmarks": [
                    {"name": "gsm8k", "source": "bench", "limit": 3},
                    {"name": "truthfulqa", "source": "hub:truthfulqa/truthful_qa"},
                ]
            }
        },
        base=tmp_path,
    )
    assert cfg.evaluation.benchmarks[0].source == str((tmp_path / "bench").resolve())  # relative to the config file
    assert cfg.evaluation.benchmarks[1].source.startswith("hub:")
    assert EvaluationConfig().benchmarks == [] and EvaluationConfig().prompt == "benchmark"
    with pytest.raises(ValueError, match="repeated"):
        EvaluationConfig(
            benchmarks=[BenchmarkSource(name="gsm8k", source="a"), BenchmarkSource(name="gsm8k", source="b")]
        )
    with pytest.raises(ValueError):
        BenchmarkSource(name="mmlu", source="a")


# ---------------------------------------------------------------------------------------------
# batched guided decoding (needs the SmolLM2 tokenizer)

SIG_NAMES = ["setup", "elaborate", "check", "conclude"]
SIG_TOKENS = [f"<sig:{n}>" for n in SIG_NAMES]


@pytest.fixture(scope="module")
def random_student(smollm2_dir):
    """A tiny random model with signal tokens whose (untied, random) output layer makes greedy
    decoding produce varied text, blank lines, eos and signal tokens, so that every stopping path
    of guided decoding is taken."""
    torch = pytest.importorskip("torch")
    from rscaffold.models import build_tiny_model
    from rscaffold.prompts import STUDENT_SYSTEM_PROMPT
    from rscaffold.student import Student
    from rscaffold.training.signal_tokens import add_signal_tokens

    model, tok = build_tiny_model(str(smollm2_dir), TinyModelConfig(seed=0))
    ids = add_signal_tokens(tok, model, SIG_TOKENS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vocab, hidden = model.get_input_embeddings().weight.shape
        w = torch.randn(vocab, hidden, generator=g)
        w[ids] *= 2.5
        w[tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])] *= 3.0  # "\n", "\n\n"
        w[tok.eos_token_id] *= 2.5
        model.lm_head.weight = torch.nn.Parameter(w)
        model.config.tie_word_embeddings = False
    model.eval()
    return Student(
        model=model,
        tokenizer=tok,
        signal_names=SIG_NAMES,
        signal_tokens=SIG_TOKENS,
        signal_token_ids=ids,
        scaffolded=True,
        signal_objective="token",
        system_prompt=STUDENT_SYSTEM_PROMPT,
    )


QUESTIONS = [
    "Elena has 20 marbles and buys 13 more. How many marbles does Elena have now?",
    "Chloe baked 47 cookies and gave 33 of them to friends. How many cookies are left?",
    "Ines buys 6 packs of pencils. Each pack holds 4 pencils. How many pencils does Ines buy?",
    "A teacher shares 72 stickers equally among 8 students. How many stickers does each student get?",
    "Is the sun a star?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?\nA. feathers\nB. iron\nC. neither",
]


def _key(g):
    return (g.text, g.signals, g.output_tokens, g.steps, g.step_signals)


@pytest.mark.parametrize(
    "guided",
    [
        GuidedInferenceConfig(max_steps=4, max_step_tokens=8, confidence_threshold=0.9),
        GuidedInferenceConfig(max_steps=3, max_step_tokens=10, confidence_threshold=0.8, prune_signals=["elaborate"]),
    ],
    ids=["gated", "pruned"],
)
def test_batched_guided_equals_unbatched(random_student, guided):
    from rscaffold.inference import generate

    single = generate(
        random_student, questions=QUESTIONS, mode="guided", max_new_tokens=28, batch_size=1, guided=guided
    )
    kinds = {s is None for g in single for s in g.step_signals}
    assert kinds == {True, False}, "the gate both committed signals and fell back to free decoding"
    assert any(g.text for g in single) and len({g.output_tokens for g in single}) > 1
    if guided.prune_signals:
        assert not any("elaborate" in g.signals for g in single)
    for bs in (4, 6):
        batched = generate(
            random_student, questions=QUESTIONS, mode="guided", max_new_tokens=28, batch_size=bs, guided=guided
        )
        assert [_key(g) for g in batched] == [_key(g) for g in single]
        for a, b in zip(single, batched):
            assert all(
                (x is None) == (y is None) and (x is None or math.isclose(x, y, abs_tol=1e-4))
                for x, y in zip(a.confidences, b.confidences)
            )
    assert all(g.output_tokens <= 28 and g.latency_s > 0 for g in single)


# ---------------------------------------------------------------------------------------------
# the evaluation stage on five benchmarks (slices of the published files), tiny models


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
        "signal_names": SIG_NAMES,
        "signal_tokens": SIG_TOKENS,
        "signal_token_ids": s.signal_token_ids,
        "system_prompt": s.system_prompt,
    }
    (d / "scaffolded" / "rscaffold_student.json").write_text(json.dumps(meta))
    return d


def test_evaluation_stage_on_five_benchmarks(students, benchmarks_dir, tmp_path, monkeypatch):
    import polars as pl

    import rscaffold.inference as inference
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
        "names": SIG_NAMES,
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
    metrics = pl.read_parquet(Path(ref.path) / "metrics.parquet")
    assert metrics.height == 10 and metrics["accuracy"].is_between(0, 1).all()
    scaf = metrics.filter(pl.col("model") == "scaffolded")
    assert (scaf["generated_signals"] > 0).any() and scaf["transition_tv"].drop_nulls().len() > 0
    assert metrics.filter(pl.col("model") == "base")["transition_tv"].null_count() == 5
    # report, chart, manifest
    text = (Path(ref.path) / "report.md").read_text()
    assert "| model | gsm8k | math500 | strategyqa | commonsenseqa | truthfulqa |" in text
    assert _png_size(Path(ref.path) / "accuracy.png")[0] > 300
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


def test_default_evaluation_is_the_problems_eval_split():
    from rscaffold.evaluation.suites import evaluation_suites

    rows = [
        ProblemRecord(problem_id=f"p{i}", split="eval", source="gsm8k", question=f"q{i}", gold_answer="1")
        for i in range(5)
    ]
    (suite,) = evaluation_suites(EvaluationConfig(limit=3), "gsm8k", rows)
    assert suite.name == "gsm8k" and [p.problem_id for p in suite.problems] == ["p0", "p1", "p2"]
    assert suite.prompts("question") == ["q0", "q1", "q2"]
    assert (
        suite.prompts()[0].startswith("q0\n\nSolve the problem step by step")
        and "'The answer is' followed by the final number" in suite.prompts()[0]
    )
