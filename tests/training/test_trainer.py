"""Student training (rscaffold.training.trainer): the dual-objective loss against a hand-computed
reference, training with the token and head objectives, the baseline, LoRA, resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from helpers import (
    STUDENT_SIGNAL_TOKENS,
    STUDENT_SIGNALS,
    STUDENT_TOKEN_MAP,
    STUDENT_TOKENIZER,
    skip_module_without_student_tokenizer,
    synthetic_examples,
    tiny_student,
    training_config,
)

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
skip_module_without_student_tokenizer()

from rscaffold.config import GuidedInferenceConfig, LoraSettings
from rscaffold.decoding.in_process import generate
from rscaffold.models import build_tiny_model
from rscaffold.prompts import render_example
from rscaffold.student import SignalHead, Student, load_student
from rscaffold.student_format import IGNORE_INDEX, ScaffoldCollator, encode_example, encode_examples
from rscaffold.training.signal_tokens import add_signal_tokens
from rscaffold.training.trainer import build_trainer, evaluate_signal_accuracy, train_student

# ---------------------------------------------------------------------------------------------
# the loss


def _hand_batch(objective: str, tmp_path: Path, weight: float = 0.7):
    model, tok = tiny_student()
    ids = add_signal_tokens(tok, model, STUDENT_SIGNAL_TOKENS)
    if objective == "head":
        torch.manual_seed(1)
        model.signal_head = SignalHead(model.config.hidden_size, len(STUDENT_SIGNALS))
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
        encode_example(*render_example(q, s, tok, signal_tokens=STUDENT_TOKEN_MAP), tok, signal_token_ids=ids)
        for q, s in examples
    ]
    trainer = build_trainer(
        model,
        tok,
        rows,
        cfg=training_config(signal_objective=objective),
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

    model, tok = tiny_student()
    rows = encode_examples(synthetic_examples(3), tok, None)  # plain completions, no signal tokens
    assert all(not r["signal_positions"] for r in rows)
    scaffold = build_trainer(
        copy.deepcopy(model),
        tok,
        rows,
        cfg=training_config(signal_loss_weight=0.0),
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
# training (the token-objective student is the session fixture `trained_token`), saving, decoding


def test_signal_accuracy_rises(trained_token):
    result, examples, c = trained_token
    model, tok = build_tiny_model(STUDENT_TOKENIZER, c.tiny)  # the same initial weights as train_student's
    ids = add_signal_tokens(tok, model, STUDENT_SIGNAL_TOKENS)
    before = Student(
        model=model,
        tokenizer=tok,
        signal_names=STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        signal_token_ids=ids,
        scaffolded=True,
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


def test_head_objective_trains_saves_and_decodes(tmp_path):
    c = training_config(max_steps=3, signal_objective="head", logging_steps=1)
    result = train_student(
        synthetic_examples(8),
        c,
        STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        output_dir=tmp_path,
        scaffolded=True,
        model_card_info={},
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


def test_baseline_training_has_no_signals(tmp_path, caplog):
    caplog.set_level("INFO", logger="rscaffold.training")
    result = train_student(
        synthetic_examples(8),
        training_config(max_steps=2),
        STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        output_dir=tmp_path,
        scaffolded=False,
        model_card_info={},
    )
    student = load_student(result.model_dir, device="cpu")
    assert not student.scaffolded and student.signal_token_ids == []
    assert len(student.tokenizer) == 49152  # no signal tokens added
    assert result.signal_loss is None and result.step_loss is not None
    # the losses reach the library's logs (and so the run's console and UI logs)
    assert any(r.getMessage().startswith("step 2/2: ") and "loss" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="scaffolded"):
        generate(student, questions=["q"], mode="guided")


def test_the_trained_model_directory_follows_the_umask(tmp_path):
    """Every file of the student's directory (the weights included, which safetensors writes
    0600) gets the mode the umask gives, like every other output."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        result = train_student(
            synthetic_examples(4),
            training_config(max_steps=1),
            STUDENT_SIGNALS,
            signal_tokens=STUDENT_SIGNAL_TOKENS,
            output_dir=tmp_path,
            scaffolded=False,
            model_card_info={},
        )
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(result.model_dir).iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_head_training(tmp_path):
    pytest.importorskip("peft")
    c = training_config(max_steps=2, signal_objective="head", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    result = train_student(
        synthetic_examples(8),
        c,
        STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        output_dir=tmp_path,
        scaffolded=True,
        model_card_info={},
    )
    student = load_student(result.model_dir, device="cpu")
    assert student.head is not None
    assert not any("lora" in n for n, _ in student.model.named_parameters())  # merged


def test_resume_from_checkpoint(tmp_path):
    examples = synthetic_examples(4)
    first = train_student(
        examples,
        training_config(max_steps=4, save_steps=2, logging_steps=1, per_device_batch_size=2),
        STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        output_dir=tmp_path,
        scaffolded=True,
        model_card_info={},
    )
    assert first.steps == 4 and first.resumed_from is None
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    second = train_student(
        examples,
        training_config(max_steps=6, save_steps=2, logging_steps=1, per_device_batch_size=2),
        STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        output_dir=tmp_path,
        scaffolded=True,
        model_card_info={},
    )
    assert second.resumed_from is not None and second.resumed_from.endswith("checkpoint-4")
    assert second.steps == 6
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    logged_steps = [e["step"] for e in state["log_history"] if "step_loss" in e]
    assert logged_steps == [1, 2, 3, 4, 5, 6]  # history carried over; only steps 5 and 6 are new


# ---------------------------------------------------------------------------------------------
# the trainer's knobs: pass-through arguments, epochs, loading, QLoRA, trackers, progress bars, model card


def test_training_args_pass_through_to_the_sft_config(tmp_path, monkeypatch):
    from rscaffold.training.trainer import make_sft_config

    c = training_config(
        lr_scheduler="cosine",
        warmup_steps=3,
        args={"optim": "adafactor", "max_grad_norm": 0.5, "lr_scheduler_kwargs": {"num_cycles": 0.25}},
    )
    sft = make_sft_config(c, tmp_path)
    assert sft.optim == "adafactor" and sft.max_grad_norm == 0.5 and sft.lr_scheduler_kwargs == {"num_cycles": 0.25}
    assert sft.lr_scheduler_type == "cosine" and sft.warmup_steps == 3 and sft.max_steps == 4
    by_epochs = make_sft_config(training_config(max_steps=None, epochs=2.5), tmp_path)
    assert by_epochs.max_steps == -1 and by_epochs.num_train_epochs == 2.5
    with pytest.raises(ValueError, match=r"training.args.no_such_arg: not an argument of TRL's SFTConfig"):
        make_sft_config(training_config(args={"no_such_arg": 1}), tmp_path)
    # progress bars where a terminal is attached, unless training.args says otherwise
    monkeypatch.setattr("sys.stderr", type("Tty", (), {"isatty": lambda self: True, "write": lambda self, s: None})())
    assert make_sft_config(c, tmp_path).disable_tqdm is False
    assert make_sft_config(training_config(args={"disable_tqdm": True}), tmp_path).disable_tqdm is True
    monkeypatch.undo()
    assert make_sft_config(c, tmp_path).disable_tqdm is True  # pytest captures stderr: no terminal


def test_epochs_bf16_weights_eager_attention_and_the_model_card(tmp_path):
    import yaml

    from rscaffold.training.trainer import load_student_base

    c = training_config(
        max_steps=None, epochs=1, student_dtype="bfloat16", attn_implementation="eager", args={"max_grad_norm": 0.5}
    )
    model, _ = load_student_base(c)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    result = train_student(
        synthetic_examples(8),
        c,
        STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        output_dir=tmp_path,
        scaffolded=True,
        model_card_info={"dataset_fingerprint": "0123abcd", "taxonomy_digest": "feed"},
    )
    assert result.steps == 2  # one epoch of 8 rows in batches of 4
    card = (result.model_dir / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n", 2)[1])
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert "base_model" not in header  # a tiny random-init student has no hub base
    for expected in (
        "| dataset_fingerprint | `0123abcd` |",
        "| setup | `<sig:setup>` |",
        "1.0 epochs",
        "weights bfloat16",
        "attention eager",
        '"max_grad_norm": 0.5',
        "| steps | 2 |",
    ):
        assert expected in card, expected


def test_model_card_names_a_hub_base_model():
    import yaml

    from rscaffold.student import model_card

    meta = {
        "scaffolded": False,
        "signal_objective": None,
        "signal_loss_weight": 0.0,
        "signal_names": [],
        "signal_tokens": [],
        "signal_token_ids": [],
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "model_card_info": {"dataset_fingerprint": "0123abcd"},
        "metrics": {"steps": 3},
    }
    card = model_card(meta, training_config(student="HuggingFaceTB/SmolLM2-135M-Instruct", tiny=None))
    assert yaml.safe_load(card.split("---\n", 2)[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_qlora_and_trackers_are_refused_clearly_when_missing():
    import importlib.util

    from rscaffold.training.trainer import QLoRAUnavailableError, check_training_settings, load_student_base

    c = training_config(tiny=None, lora=LoraSettings(r=4), load_in_4bit=True)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(QLoRAUnavailableError, match="needs bitsandbytes, which is not installed: pip install"):
            load_student_base(c)
        with pytest.raises(ValueError, match="needs bitsandbytes"):
            check_training_settings(c)
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        check_training_settings(training_config(report_to=["tensorbored"]))
    missing = [t for t in ("wandb", "mlflow", "trackio", "tensorboard") if importlib.util.find_spec(t) is None]
    if missing:
        with pytest.raises(ValueError, match=f"training.report_to: {missing[0]} is not installed"):
            check_training_settings(training_config(report_to=[missing[0]]))
    check_training_settings(training_config(args={"optim": "adafactor"}))  # a valid pass-through passes
