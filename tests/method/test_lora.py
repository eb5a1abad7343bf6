"""LoRA students with untied embeddings and padded vocabularies.

Qwen2.5-7B/14B have untied input and output embeddings and more embedding rows than tokenizer
entries. With LoRA and the default ``token`` objective, L_signal is scored by the LM head's signal
rows: those rows (not only the input embedding's) must be trainable, and the new tokens, which
land in padding rows, must be initialised. Tested on the untied, padded tiny Qwen2 and on the tied
tiny Llama: L_signal falls over a few dozen LoRA steps and the signal rows of both matrices
changed.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")

from method_shapes import NAMES, TOKENS, VOCAB_PADDING, examples, tiny_llama, tiny_qwen2, tokenizer_dir

from rscaffold.config import LoraSettings, TrainingConfig
from rscaffold.student import causal_lm_of
from rscaffold.student_format import encode_examples
from rscaffold.training.signal_tokens import add_signal_tokens
from rscaffold.training.trainer import build_trainer


def test_new_tokens_in_padding_rows_are_initialised_in_both_matrices():
    model, tok = tiny_qwen2()
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == len(tok) + VOCAB_PADDING
    known = len(tok)
    ids = add_signal_tokens(tok, model, TOKENS)
    assert model.get_input_embeddings().weight.shape[0] == rows  # no resize: the ids are padding rows
    assert all(known <= i < rows for i in ids)
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for matrix in (inp, out):
        mean = matrix[:known].mean(0)
        for i in ids:
            torch.testing.assert_close(matrix[i], mean)
    assert add_signal_tokens(tok, model, TOKENS) == ids  # idempotent: rows not re-initialised


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("shape", ["qwen2-untied-padded", "llama-tied"])
def test_lora_trains_the_signal_rows_of_both_embeddings(shape, tmp_path):
    model, tok = tiny_qwen2() if shape.startswith("qwen2") else tiny_llama()
    ids = add_signal_tokens(tok, model, TOKENS)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (shape == "llama-tied")
    before_in = model.get_input_embeddings().weight[ids].detach().clone()
    before_out = model.get_output_embeddings().weight[ids].detach().clone()
    rows = encode_examples(examples(16), tok, dict(zip(NAMES, TOKENS)), signal_token_ids=ids, max_length=128)
    cfg = TrainingConfig(
        student=tokenizer_dir(),
        max_steps=24,
        per_device_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=1000,
        bf16=False,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
    )
    trainer = build_trainer(
        model, tok, rows, cfg=cfg, checkpoint_dir=tmp_path, signal_token_ids=ids, signal_objective="token"
    )
    trainer.train()
    losses = [e["signal_loss"] for e in trainer.state.log_history if "signal_loss" in e]
    # identical mean rows: every signal starts with the same logit, L_signal = log 3
    assert losses[0] == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=0.05)
    assert losses[-1] < 0.5 * losses[0]
    merged = causal_lm_of(trainer.model.merge_and_unload())
    after_in = merged.get_input_embeddings().weight[ids].detach()
    after_out = merged.get_output_embeddings().weight[ids].detach()
    for before, after in ((before_in, after_in), (before_out, after_out)):
        assert (after - before).abs().max() > 1e-3  # the signal rows were trained ...
        assert (after[0] - after[1]).abs().max() > 1e-3  # ... and the signals told apart
