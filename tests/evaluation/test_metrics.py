"""Scoring one output and the metrics per model and benchmark (rscaffold.evaluation.metrics)."""

import pytest
from helpers import TOY_TEACHER, sample_predictions

from rscaffold.evaluation.metrics import bootstrap_ci, compute_metrics, score_output
from rscaffold.evaluation.report import render_report
from rscaffold.evaluation.signals import signal_distribution
from rscaffold.records import ProblemRecord


def problem(i: int, gold: str = "18") -> ProblemRecord:
    return ProblemRecord(problem_id=f"p{i}", split="eval", source="gsm8k", question=f"q{i}", gold_answer=gold)


def test_score_output_checks_numbers():
    good = score_output(
        "cot_sft",
        "gsm8k",
        problem(0),
        output="6 * 3 = 18\n\nThe answer is 18.",
        answer_type="math",
        output_tokens=9,
        signals=[],
        latency_s=0.1,
    )
    bad = score_output(
        "cot_sft",
        "gsm8k",
        problem(1),
        output="The answer is 17.",
        answer_type="math",
        output_tokens=5,
        signals=[],
        latency_s=0.1,
    )
    none = score_output(
        "base",
        "gsm8k",
        problem(2),
        output="I am not sure.",
        answer_type="math",
        output_tokens=4,
        signals=[],
        latency_s=0.1,
    )
    assert good.correct and good.parsed and good.predicted_answer == "18"
    assert not bad.correct and bad.parsed
    assert not none.correct and not none.parsed and none.predicted_answer is None


def test_bootstrap_interval_contains_mean_and_is_deterministic():
    correct = [True] * 30 + [False] * 70
    lo, hi = bootstrap_ci(correct, samples=500, seed=1)
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert bootstrap_ci(correct, samples=500, seed=1) == (lo, hi)
    assert bootstrap_ci([True] * 10, samples=100) == (1.0, 1.0)
    assert bootstrap_ci([]) == (0.0, 0.0)


def test_metrics_per_model():
    preds = [
        score_output(
            "base",
            "gsm8k",
            problem(0),
            output="The answer is 18.",
            answer_type="math",
            output_tokens=10,
            signals=[],
            latency_s=0.0,
        ),
        score_output(
            "base",
            "gsm8k",
            problem(1),
            output="no idea",
            answer_type="math",
            output_tokens=20,
            signals=[],
            latency_s=0.0,
        ),
        score_output(
            "scaffolded",
            "gsm8k",
            problem(0),
            output="The answer is 18.",
            answer_type="math",
            output_tokens=6,
            signals=["Conclusion and Summary"],
            latency_s=0.0,
        ),
        score_output(
            "scaffolded",
            "gsm8k",
            problem(1),
            output="The answer is 18.",
            answer_type="math",
            output_tokens=8,
            signals=["Reasoning and Analysis", "Conclusion and Summary"],
            latency_s=0.0,
        ),
    ]
    m = {x.model: x for x in compute_metrics(preds, bootstrap_samples=100)}
    assert [x.model for x in compute_metrics(preds, 0)] == ["base", "scaffolded"]
    assert m["base"].accuracy == pytest.approx(0.5) and m["base"].unparseable_rate == pytest.approx(0.5)
    assert m["base"].mean_output_tokens == pytest.approx(15)
    assert m["scaffolded"].accuracy == 1.0
    dist = signal_distribution(preds)
    assert dist == {"scaffolded": {"Conclusion and Summary": 2, "Reasoning and Analysis": 1}}
    md = render_report(list(m.values()), preds)
    assert "| gsm8k | scaffolded | – | 2 | 100.0 |" in md and "Conclusion and Summary 67%" in md


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


def test_metrics_with_consistency_and_agreement():
    metrics = {(m.model, m.benchmark): m for m in compute_metrics(sample_predictions(), 200, 0, teacher=TOY_TEACHER)}
    base, scaf = metrics[("base", "gsm8k")], metrics[("scaffolded", "gsm8k")]
    assert (
        base.accuracy == pytest.approx(2 / 6)
        and base.consistency_checked == 6
        and base.consistency_rate == pytest.approx(0.5)
    )
    assert base.transition_tv is None and base.generated_signals == 0
    assert scaf.generated_signals == 15 and scaf.mean_steps == pytest.approx(2.5)
    assert 0 <= scaf.transition_tv <= 1 and scaf.transition_kl >= 0 and scaf.signal_tv is not None
    assert compute_metrics(sample_predictions(), 0)[0].transition_tv is None  # no teacher: no agreement
