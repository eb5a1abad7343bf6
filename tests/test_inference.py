"""Student decoding (rscaffold.inference): batched guided decoding equals unbatched, on a random
student that takes every stopping path."""

from __future__ import annotations

import math

import pytest

from rscaffold.config import GuidedInferenceConfig

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
