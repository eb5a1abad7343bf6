"""Student decoding in-process (rscaffold.decoding): batched guided decoding equals unbatched, on a random
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
    from rscaffold.decoding.in_process import generate

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


@pytest.mark.parametrize(
    "guided",
    [
        GuidedInferenceConfig(max_step_tokens=8, confidence_threshold=0.9),
        GuidedInferenceConfig(max_step_tokens=10, confidence_threshold=0.0, prune_signals=["elaborate"]),
    ],
    ids=["gated", "nogate-pruned"],
)
def test_kv_cached_guided_equals_the_reference_decoder(random_student, guided):
    """The KV-cached decoder gives the re-encoding decoder's outputs, batched and not, on a
    student that takes every stopping path (questions finish at different rounds)."""
    from rscaffold.decoding.in_process import generate

    def run(kv_cache, bs):
        return generate(
            random_student, QUESTIONS, mode="guided", max_new_tokens=40, batch_size=bs, guided=guided, kv_cache=kv_cache
        )

    reference = run(False, 4)
    assert len({len(g.steps) for g in reference}) > 1, "questions finish at different rounds"
    for bs in (1, 4):
        cached = run(True, bs)
        assert [_key(g) for g in cached] == [_key(g) for g in reference]
        for a, b in zip(reference, cached):
            assert all(
                (x is None) == (y is None) and (x is None or math.isclose(x, y, abs_tol=1e-4))
                for x, y in zip(a.confidences, b.confidences)
            )


def test_kv_cached_guided_equals_the_reference_on_long_outputs_with_the_papers_shapes():
    """Hundreds of output tokens over many rounds, on an untied Qwen2 with a padded vocabulary:
    the cache (with its holes, joins, leaves and compactions) decodes what re-encoding decodes."""
    from method_shapes import tiny_qwen2

    from rscaffold.decoding.in_process import generate
    from rscaffold.student import Student
    from rscaffold.training.signal_tokens import add_signal_tokens

    torch = pytest.importorskip("torch")
    model, tok = tiny_qwen2(seed=3)
    names = ["setup", "elaborate", "conclude"]
    tokens = [f"<sig:{n}>" for n in names]
    ids = add_signal_tokens(tok, model, tokens)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # varied text, blank lines and signal tokens under greedy decoding
        w = model.lm_head.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)
        w[ids] *= 1.6
        w[tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])] *= 2.0
    model.eval()
    student = Student(
        model=model, tokenizer=tok, signal_names=names, signal_tokens=tokens, signal_token_ids=ids,
        scaffolded=True, signal_objective="token", system_prompt="You are a careful reasoner.",
    )  # fmt: skip
    settings = GuidedInferenceConfig(confidence_threshold=0.5, max_step_tokens=48)
    kw = dict(mode="guided", max_new_tokens=320, batch_size=3, guided=settings)
    reference = generate(student, QUESTIONS[:5], kv_cache=False, **kw)
    cached = generate(student, QUESTIONS[:5], kv_cache=True, **kw)
    assert max(g.output_tokens for g in reference) > 250 and max(len(g.steps) for g in reference) > 8
    assert [_key(g) for g in cached] == [_key(g) for g in reference]
