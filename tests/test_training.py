"""Student training: format, collation, the dual-objective loss, training, save/load, decoding."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from rscaffold.config import GuidedInferenceConfig, LoraSettings, TinyModelConfig, TrainingConfig
from rscaffold.models import build_tiny_model
from rscaffold.paths import default_model_dir
from rscaffold.records import ExampleRecord, Step

TOKENIZER_DIR = Path(os.environ.get("RSCAFFOLD_SMOLLM2_DIR", default_model_dir()))
if not (TOKENIZER_DIR / "tokenizer.json").exists():
    pytest.skip(
        f"SmolLM2 tokenizer not found at {TOKENIZER_DIR} (run `rscaffold models fetch`)", allow_module_level=True
    )

from rscaffold.inference import Generated, generate
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, render_example
from rscaffold.student import (
    SignalHead,
    Student,
    load_student,
)
from rscaffold.training.collator import IGNORE_INDEX, ScaffoldCollator, encode_example, encode_examples
from rscaffold.training.signal_tokens import add_signal_tokens
from rscaffold.training.trainer import (
    build_trainer,
    evaluate_signal_accuracy,
    train_student,
)

NAMES = ["setup", "elaborate", "conclude"]
TOKENS = [f"<sig:{n}>" for n in NAMES]
TOKEN_MAP = dict(zip(NAMES, TOKENS))
TOK = str(TOKENIZER_DIR)


def tiny(**kw):
    return build_tiny_model(TOK, TinyModelConfig(**kw))


def cfg(**kw) -> TrainingConfig:
    base = dict(
        student=TOK,
        tiny=TinyModelConfig(),
        max_steps=4,
        per_device_batch_size=4,
        learning_rate=5e-3,
        logging_steps=2,
        save_steps=1000,
        max_length=256,
        bf16=False,
    )
    base.update(kw)
    return TrainingConfig(**base)


def synthetic(n: int, split: str = "train") -> list[ExampleRecord]:
    """The next signal is determined by the step index (setup, elaborate, conclude)."""
    out = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        texts = [f"We have {a} apples and {b} pears.", f"Together that is {a} plus {b}.", f"The answer is {a + b}."]
        steps = [Step(index=j, signal=NAMES[j], text=t, source="llm") for j, t in enumerate(texts)]
        out.append(
            ExampleRecord(
                trace_id=f"t{i}",
                problem_id=f"p{i}",
                split=split,
                question=f"How many fruits: {a} apples, {b} pears?",
                gold_answer=str(a + b),
                steps=steps,
                signals=list(NAMES),
                n_steps=3,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# format and collation


def test_render_example_format():
    _, tok = tiny()
    steps = [("setup", "Tom has 3."), ("conclude", "The answer is 3.")]
    prompt, completion = render_example("How many?", steps, tok, signal_tokens=TOKEN_MAP)
    assert prompt == tok.apply_chat_template(
        [{"role": "system", "content": STUDENT_SYSTEM_PROMPT}, {"role": "user", "content": "How many?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert completion == "<sig:setup>Tom has 3.\n\n<sig:conclude>The answer is 3.<|im_end|>"
    _, plain = render_example("How many?", steps, tok, signal_tokens=None)
    assert plain == "Tom has 3.\n\nThe answer is 3.<|im_end|>"
    with pytest.raises(ValueError, match="not in the taxonomy"):
        render_example("q", [("nope", "x")], tok, signal_tokens=TOKEN_MAP)


def test_add_signal_tokens_mean_init_and_idempotent():
    model, tok = tiny()
    emb = model.get_input_embeddings().weight.detach().clone()
    ids = add_signal_tokens(tok, model, TOKENS)
    assert ids == list(range(emb.shape[0], emb.shape[0] + 3))
    new = model.get_input_embeddings().weight
    assert new.shape[0] == emb.shape[0] + 3
    for i in ids:
        torch.testing.assert_close(new[i], emb.mean(0))
    assert tok.decode([ids[0], 100], skip_special_tokens=True) == tok.decode([100])
    assert add_signal_tokens(tok, model, TOKENS) == ids  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == emb.shape[0] + 3


def test_encode_masks_prompt_and_signals_and_truncates_completion():
    model, tok = tiny()
    ids = add_signal_tokens(tok, model, TOKENS)
    prompt, completion = render_example(
        "Q?", [("setup", "A b c."), ("conclude", "The answer is 1.")], tok, signal_tokens=TOKEN_MAP
    )
    enc = encode_example(prompt, completion, tok, signal_token_ids=ids)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    comp = enc["input_ids"][n_prompt:]
    assert enc["labels"][n_prompt:] == [IGNORE_INDEX if t in ids else t for t in comp]
    assert enc["labels"][-1] == tok.eos_token_id  # the model learns to stop
    assert enc["signal_positions"] == [p - 1 for p in range(len(enc["input_ids"])) if enc["input_ids"][p] in ids]
    assert enc["signal_positions"][0] == n_prompt - 1  # the first signal is predicted from the prompt's end
    assert enc["signal_labels"] == [0, 2]
    short = encode_example(prompt, completion, tok, signal_token_ids=ids, max_length=n_prompt + 3)
    assert len(short["input_ids"]) == n_prompt + 3 and short["input_ids"][:n_prompt] == enc["input_ids"][:n_prompt]
    assert short["signal_labels"] == [0]
    assert encode_example(prompt, completion, tok, signal_token_ids=ids, max_length=n_prompt) is None


def test_collator_right_pads():
    model, tok = tiny()
    ids = add_signal_tokens(tok, model, TOKENS)
    rows = encode_examples(synthetic(2), tok, TOKEN_MAP, signal_token_ids=ids)
    rows[1] = encode_example(
        *render_example(
            "Longer question here?",
            [("setup", "x y z w"), ("elaborate", "more"), ("conclude", "end")],
            tok,
            signal_tokens=TOKEN_MAP,
        ),
        tok,
        signal_token_ids=ids,
    )
    batch = ScaffoldCollator(pad_token_id=tok.pad_token_id)(rows)
    B, T = batch["input_ids"].shape
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == r["input_ids"]
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        k = len(r["signal_positions"])
        assert batch["signal_positions"][b, :k].tolist() == r["signal_positions"]
        assert (batch["signal_labels"][b, k:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------
# the loss


def _hand_batch(objective: str, tmp_path: Path, weight: float = 0.7):
    model, tok = tiny()
    ids = add_signal_tokens(tok, model, TOKENS)
    if objective == "head":
        torch.manual_seed(1)
        model.signal_head = SignalHead(model.config.hidden_size, len(NAMES))
    examples = [
        ("What is 2+2?", [("setup", "Two plus two."), ("conclude", "The answer is 4.")]),
        (
            "Tom has 3 apples and eats one. How many are left?",
            [
                ("setup", "Tom starts with 3."),
                ("elaborate", "He eats 1, so 3 - 1 = 2."),
                ("conclude", "The answer is 2."),
            ],
        ),
    ]
    rows = [
        encode_example(*render_example(q, s, tok, signal_tokens=TOKEN_MAP), tok, signal_token_ids=ids)
        for q, s in examples
    ]
    trainer = build_trainer(
        model,
        tok,
        rows,
        cfg=cfg(signal_objective=objective),
        checkpoint_dir=tmp_path / "ckpt",
        signal_token_ids=ids,
        signal_objective=objective,
        signal_loss_weight=weight,
    )
    batch = trainer.data_collator(rows)
    return model, tok, ids, trainer, batch


def _reference_loss(model, batch, ids, objective, weight):
    """L_step + weight * L_signal from the model's full logits, by hand."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"]
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    step = (nll * mask).sum() / mask.sum()
    sig_terms = []
    torch.set_grad_enabled(False)
    for b in range(labels.shape[0]):
        for p in range(batch["input_ids"].shape[1] - 1):
            nxt = int(batch["input_ids"][b, p + 1])
            if batch["attention_mask"][b, p + 1] and nxt in ids:
                k = ids.index(nxt)
                z = logits[b, p, ids] if objective == "token" else model.signal_head(hidden[b, p])
                sig_terms.append(-torch.log_softmax(z.double(), -1)[k])
    torch.set_grad_enabled(True)
    signal = torch.stack(sig_terms).mean()
    return step, signal, step + weight * signal


@pytest.mark.parametrize("objective", ["token", "head"])
def test_loss_matches_hand_reference(objective, tmp_path):
    model, tok, ids, trainer, batch = _hand_batch(objective, tmp_path, weight=0.7)
    step, signal, total = _reference_loss(model, batch, ids, objective, 0.7)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss.double(), total, atol=2e-5, rtol=1e-5)
    mode = "train" if trainer.model.training else "eval"
    assert trainer._metrics[mode]["step_loss"][-1] == pytest.approx(float(step), rel=1e-5)
    assert trainer._metrics[mode]["signal_loss"][-1] == pytest.approx(float(signal), rel=1e-5)
    # the signal loss trains the right parameters
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    if objective == "head":
        assert model.signal_head.proj.weight.grad.abs().sum() > 0
    else:
        assert model.get_output_embeddings().weight.grad[ids].abs().sum() > 0


def test_no_loss_on_prompt_tokens(tmp_path):
    model, tok, ids, trainer, batch = _hand_batch("token", tmp_path, weight=0.0)
    lengths = batch["attention_mask"].sum(1)
    for b in range(2):
        # every position up to and including the last prompt token is ignored
        n_prompt = int(batch["signal_positions"][b, 0]) + 1
        assert (batch["labels"][b, :n_prompt] == IGNORE_INDEX).all()
        assert (batch["labels"][b, n_prompt : lengths[b]] != IGNORE_INDEX).sum() > 0
    loss = trainer.compute_loss(trainer.model, dict(batch))
    # Giving the prompt positions real targets (full-sequence SFT) changes the loss; ours ignores them.
    unmasked = dict(batch)
    unmasked["labels"] = batch["labels"].clone()
    for b in range(2):
        n_prompt = int(batch["signal_positions"][b, 0]) + 1
        unmasked["labels"][b, 1:n_prompt] = batch["input_ids"][b, 1:n_prompt]
    loss_unmasked = trainer.compute_loss(trainer.model, unmasked)
    assert loss_unmasked.item() != pytest.approx(loss.item(), rel=1e-3)
    # And the value equals the completion-only mean (no prompt term), computed by hand.
    step, _, _ = _reference_loss(model, batch, ids, "token", 0.0)
    torch.testing.assert_close(loss.double(), step, atol=2e-5, rtol=1e-5)


def test_baseline_equals_plain_sft_loss(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tok = tiny()
    rows = encode_examples(synthetic(3), tok, None)  # plain completions, no signal tokens
    assert all(not r["signal_positions"] for r in rows)
    scaffold = build_trainer(
        copy.deepcopy(model),
        tok,
        rows,
        cfg=cfg(signal_loss_weight=0.0),
        checkpoint_dir=tmp_path / "a",
        signal_token_ids=[],
        signal_objective="token",
        signal_loss_weight=0.0,
    )
    batch = scaffold.data_collator(rows)
    ours = scaffold.compute_loss(scaffold.model, dict(batch))

    from datasets import Dataset

    plain = SFTTrainer(
        model=copy.deepcopy(model),
        args=SFTConfig(
            output_dir=str(tmp_path / "b"),
            report_to="none",
            bf16=False,
            max_length=None,
            dataset_kwargs={"skip_prepare_dataset": True},
            activation_checkpointing=False,
        ),
        train_dataset=Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]),
        processing_class=tok,
    )
    plain_batch = plain.data_collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    theirs = plain.compute_loss(plain.model, plain_batch)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    # and both are the causal LM loss over the completion tokens
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_padding_free_matches_padded(tmp_path):
    model, tok, ids, trainer, batch = _hand_batch("token", tmp_path, weight=0.7)
    rows = [trainer.train_dataset[i] for i in range(2)]
    flat = ScaffoldCollator(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    padded_loss = trainer.compute_loss(trainer.model, dict(batch))
    flat_loss = trainer.compute_loss(trainer.model, dict(flat))
    torch.testing.assert_close(flat_loss, padded_loss, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# training, saving, loading, decoding


@pytest.fixture(scope="module")
def trained_token(tmp_path_factory):
    out = tmp_path_factory.mktemp("token")
    examples = synthetic(24) + synthetic(4, split="validation")
    c = cfg(max_steps=16, logging_steps=4, learning_rate=2e-2, signal_objective="token")
    result = train_student(
        examples,
        c,
        NAMES,
        signal_tokens=TOKENS,
        output_dir=out,
        scaffolded=True,
        model_card_info={"data_fingerprint": "data123", "taxonomy_hash": "tax456"},
    )
    return result, examples, c


def test_signal_accuracy_rises(trained_token):
    result, examples, c = trained_token
    model, tok = build_tiny_model(TOK, c.tiny)  # the same initial weights as train_student's
    ids = add_signal_tokens(tok, model, TOKENS)
    before = Student(
        model=model, tokenizer=tok, signal_names=NAMES, signal_tokens=TOKENS, signal_token_ids=ids, scaffolded=True
    )
    acc_before = evaluate_signal_accuracy(before, examples)
    after = load_student(result.model_dir, device="cpu")
    acc_after = evaluate_signal_accuracy(after, examples)
    assert acc_after > acc_before
    assert acc_after >= 0.9
    assert result.signal_accuracy is not None and result.signal_accuracy > acc_before
    assert result.steps == 16 and result.signal_loss is not None and result.step_loss is not None
    assert result.eval_metrics.get("eval_signal_accuracy", 0) >= 0.9
    assert result.tokens_per_s and result.tokens_per_s > 0


def test_saved_student_round_trip_and_generation(trained_token):
    result, _, _ = trained_token
    d = result.model_dir
    meta = json.loads((d / "rscaffold_student.json").read_text())
    assert meta["scaffolded"] and meta["signal_names"] == NAMES and meta["signal_objective"] == "token"
    card = (d / "README.md").read_text()
    assert "data123" in card and "tax456" in card and "signal_loss" in card
    student = load_student(d, device="cpu")
    assert student.scaffolded and student.signal_token_ids == student.tokenizer.convert_tokens_to_ids(TOKENS)
    questions = ["How many fruits: 2 apples, 3 pears?", "How many fruits: 5 apples, 4 pears?"]
    plain = generate(student, questions=questions, mode="plain", max_new_tokens=24, batch_size=2)
    assert len(plain) == 2 and all(isinstance(g, Generated) and 0 < g.output_tokens <= 24 for g in plain)
    # batching and left padding do not change greedy outputs; questions may be given positionally
    single = generate(student, questions[1:], mode="plain", max_new_tokens=24)
    assert single[0].text == plain[1].text
    guided = generate(
        student,
        questions=questions,
        mode="guided",
        max_new_tokens=40,
        guided=GuidedInferenceConfig(max_steps=3, max_step_tokens=12),
    )
    for g in guided:
        assert g.text and "<sig:" not in g.text
        assert g.signals and set(g.signals) <= set(NAMES)
        assert g.signals[0] == "setup"  # learned: the first step is always a setup
        assert 0 < g.output_tokens <= 40
    # pruning: a pruned signal is never committed
    pruned = generate(
        student,
        questions=questions[:1],
        mode="guided",
        max_new_tokens=30,
        guided=GuidedInferenceConfig(max_steps=2, max_step_tokens=12, prune_signals=["setup"]),
    )
    assert "setup" not in pruned[0].signals
    # gating: with an unreachable threshold nothing is committed by the gate
    gated = generate(
        student,
        questions=questions[:1],
        mode="guided",
        max_new_tokens=24,
        guided=GuidedInferenceConfig(max_steps=2, max_step_tokens=8, confidence_threshold=1.0),
    )
    # (steps the tiny model leaves empty are dropped with their confidences; none may pass the gate)
    assert gated[0].output_tokens > 0 and all(c is not None and c < 1.0 for c in gated[0].confidences)


def test_head_objective_trains_saves_and_decodes(tmp_path):
    c = cfg(max_steps=3, signal_objective="head", logging_steps=1)
    result = train_student(
        synthetic(8), c, NAMES, signal_tokens=TOKENS, output_dir=tmp_path, scaffolded=True, model_card_info={}
    )
    d = result.model_dir
    assert (d / "signal_head.pt").exists() and json.loads((d / "signal_head.json").read_text())["num_signals"] == 3
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("signal_head") for k in f.keys())
    student = load_student(d, device="cpu")
    assert student.head is not None and student.signal_objective == "head"
    out = generate(
        student,
        questions=["How many fruits: 1 apples, 1 pears?"],
        mode="guided",
        max_new_tokens=20,
        guided=GuidedInferenceConfig(max_steps=2, max_step_tokens=8),
    )
    assert out[0].signals and out[0].output_tokens <= 20


def test_baseline_training_has_no_signals(tmp_path):
    result = train_student(
        synthetic(8),
        cfg(max_steps=2),
        NAMES,
        signal_tokens=TOKENS,
        output_dir=tmp_path,
        scaffolded=False,
        model_card_info={},
    )
    student = load_student(result.model_dir, device="cpu")
    assert not student.scaffolded and student.signal_token_ids == []
    assert len(student.tokenizer) == 49152  # no signal tokens added
    assert result.signal_loss is None and result.step_loss is not None
    with pytest.raises(ValueError, match="scaffolded"):
        generate(student, questions=["q"], mode="guided")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_head_training(tmp_path):
    pytest.importorskip("peft")
    c = cfg(max_steps=2, signal_objective="head", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    result = train_student(
        synthetic(8), c, NAMES, signal_tokens=TOKENS, output_dir=tmp_path, scaffolded=True, model_card_info={}
    )
    student = load_student(result.model_dir, device="cpu")
    assert student.head is not None
    assert not any("lora" in n for n, _ in student.model.named_parameters())  # merged


def test_resume_from_checkpoint(tmp_path):
    examples = synthetic(4)
    first = train_student(
        examples,
        cfg(max_steps=4, save_steps=2, logging_steps=1, per_device_batch_size=2),
        NAMES,
        signal_tokens=TOKENS,
        output_dir=tmp_path,
        scaffolded=True,
        model_card_info={},
    )
    assert first.steps == 4 and first.resumed_from is None
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    second = train_student(
        examples,
        cfg(max_steps=6, save_steps=2, logging_steps=1, per_device_batch_size=2),
        NAMES,
        signal_tokens=TOKENS,
        output_dir=tmp_path,
        scaffolded=True,
        model_card_info={},
    )
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-4")
    assert second.steps == 6
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    logged_steps = [e["step"] for e in state["log_history"] if "step_loss" in e]
    assert logged_steps == [1, 2, 3, 4, 5, 6]  # history carried over; only steps 5 and 6 are new
