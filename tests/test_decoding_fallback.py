"""Free decoding after an uncommitted gate: by default it never emits a signal token (in-process,
on the KV cache and through a server alike); ``fallback_may_emit_signal`` (the
``scaffolded-freefallback`` evaluation row) lets it, as the signal's source records."""

from __future__ import annotations

import pytest
from helpers import RANDOM_STUDENT_SIGNALS, RANDOM_STUDENT_TOKENS
from serving_fake import fake_vllm_server

from rscaffold.config import BackendConfig, GuidedInferenceConfig, PipelineConfig
from rscaffold.decoding.policy import GuidedSettings

torch = pytest.importorskip("torch")

QUESTIONS = ["Elena has 20 marbles and buys 13 more. How many marbles does Elena have now?", "Is the sun a star?"]
BUDGET = 24


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny model's forward passes are too small to share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def signal_first_student(smollm2_dir):
    """A tiny random student whose top token, at the end of its prompt and after a step, is a
    signal token, while its next-signal distribution is flat (every signal token has the same
    output row): a gate at 0.5 never commits, and free decoding over the whole vocabulary always
    picks a signal."""
    from rscaffold.config import TinyModelConfig
    from rscaffold.models import build_tiny_model
    from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, render_prompt
    from rscaffold.student import Student
    from rscaffold.training.signal_tokens import add_signal_tokens

    model, tok = build_tiny_model(str(smollm2_dir), TinyModelConfig(seed=0))
    ids = add_signal_tokens(tok, model, RANDOM_STUDENT_TOKENS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vocab, hidden = model.get_input_embeddings().weight.shape
        w = torch.randn(vocab, hidden, generator=g)
        w[tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])] *= 3.0
        model.lm_head.weight = torch.nn.Parameter(w)
        model.config.tie_word_embeddings = False
        # the signal rows point along the last hidden state at a step's start (by a margin that a
        # server's logit bias of -100 still outweighs)
        texts = [
            render_prompt(q, tok, STUDENT_SYSTEM_PROMPT) + a
            for q in ["Is the sun a star?", "What is 2 + 3?"]
            for a in ("", "First.\n\n", "ok\n\nThen 5.\n\n")
        ]
        states = [
            model.model(**tok(t, return_tensors="pt", add_special_tokens=False)).last_hidden_state[0, -1] for t in texts
        ]
        u = torch.stack(states).mean(0)
        w[ids] = u * 12.0 / u.norm()
    model.eval()
    return Student(
        model=model,
        tokenizer=tok,
        signal_names=RANDOM_STUDENT_SIGNALS,
        signal_tokens=RANDOM_STUDENT_TOKENS,
        signal_token_ids=ids,
        scaffolded=True,
        signal_objective="token",
        system_prompt=STUDENT_SYSTEM_PROMPT,
    )


def _settings(**kw) -> GuidedSettings:
    return GuidedSettings(confidence_threshold=0.5, max_step_tokens=6, **kw)


def _key(g):
    return (g.text, g.signals, g.steps, g.step_signals, g.signal_sources, g.output_tokens)


@pytest.mark.parametrize("kv_cache", [False, True], ids=["reference", "kv-cached"])
def test_free_decoding_after_an_uncommitted_gate_emits_no_signal(signal_first_student, kv_cache):
    from rscaffold.decoding.in_process import generate

    def run(**kw):
        return generate(
            signal_first_student, QUESTIONS, mode="guided", max_new_tokens=BUDGET, batch_size=2,
            guided=_settings(**kw), kv_cache=kv_cache,
        )  # fmt: skip

    default = run()
    for g in default:
        assert g.confidences and all(c < 0.5 for c in g.confidences), "the gate committed nothing"
        assert g.signals == [] and set(g.signal_sources) == {"none"}
        assert all(g.steps), "free decoding wrote the steps' text"
    # the switch: free decoding draws from the whole vocabulary, and its top token is a signal
    free = run(fallback_may_emit_signal=True)
    for g in free:
        assert g.signals and set(g.signal_sources) == {"free"}
        assert all(c < 0.5 for c in g.confidences)


def test_served_free_decoding_emits_no_signal_as_in_process(signal_first_student):
    """Through a server (the test-only fake of vLLM's dialect), on a question where no step request
    stops at a blank line before its text (there served decoding continues from re-tokenized text,
    a documented difference)."""
    from rscaffold.decoding.in_process import generate
    from rscaffold.decoding.served import generate_served
    from rscaffold.llm import create_backend

    tok = signal_first_student.tokenizer
    with fake_vllm_server(signal_first_student.model, tok) as server:
        backend = create_backend(BackendConfig(backend="openai", model="student", base_url=server.base_url))
        for kw in ({}, {"fallback_may_emit_signal": True}):
            since = server.requests
            got = generate_served(
                backend,
                signal_first_student,
                QUESTIONS[:1],
                mode="guided",
                max_new_tokens=BUDGET,
                guided=_settings(**kw),
            )
            want = generate(
                signal_first_student, QUESTIONS[:1], mode="guided", max_new_tokens=BUDGET, batch_size=1,
                guided=_settings(**kw), kv_cache=False,
            )  # fmt: skip
            assert [_key(g) for g in got] == [_key(w) for w in want]
            steps = [b for b in server.bodies[since:] if "stop_token_ids" in b]
            answers = [a["choices"][0] for b, a in zip(server.bodies[since:], server.answers[since:]) if b in steps]
            assert not [c for c in answers if isinstance(c["stop_reason"], str) and not c["text"].strip()]
            biased = {tuple(sorted(b.get("logit_bias", {}))) for b in steps}
            if kw:
                assert all(g.signals for g in got) and biased == {()}
            else:
                assert not any(g.signals for g in got)
                assert biased == {tuple(sorted(str(i) for i in signal_first_student.signal_token_ids))}
        backend.close()


def test_the_switch_and_the_ablation_row_let_free_decoding_emit_a_signal(signal_first_student):
    from rscaffold.decoding.calibration import plan_guided_decoding
    from rscaffold.decoding.policy import resolve_guided

    cfg = GuidedInferenceConfig(confidence_threshold=0.5)
    assert not resolve_guided(cfg, signal_first_student).fallback_may_emit_signal
    switched = GuidedInferenceConfig(confidence_threshold=0.5, fallback_may_emit_signal=True)
    assert resolve_guided(switched, signal_first_student).fallback_may_emit_signal
    settings, record = plan_guided_decoding(cfg, signal_first_student, [], fallback_guard=False)
    assert settings.fallback_may_emit_signal and record["fallback_source"].startswith("ablation")
    assert GuidedSettings.from_dict(settings.to_dict()) == settings
    # the ablation row is answered on request only
    assert "scaffolded-freefallback" not in PipelineConfig().evaluation.models
    chosen = PipelineConfig.model_validate({"evaluation": {"models": ["scaffolded", "scaffolded-freefallback"]}})
    assert chosen.evaluation.models == ["scaffolded", "scaffolded-freefallback"]


def test_an_answer_whose_free_step_cannot_start_ends():
    """A free step that stopped at a signal token before anything else (a server's finite bias
    outweighed) ends the answer instead of starting the same empty step again."""
    from rscaffold.decoding.policy import GuidedPolicy, GuidedRow

    policy = GuidedPolicy(
        _settings(),
        signal_names=["a", "b", "c"],
        signal_token_ids=[7, 8, 9],
        signal_tokens=["<a>", "<b>", "<c>"],
        max_new_tokens=9,
    )
    row = GuidedRow(index=0, prompt_ids=[])
    step = policy.open_step(row, [0.3, 0.4, 0.3])
    assert step.signal is None and step.confidence == 0.4 and policy.suppressed(step) == [7, 8, 9]
    policy.end_step(row, step, "", stop="signal", tokens=0)
    assert row.done and row.result().steps == []
