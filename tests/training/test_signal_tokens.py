"""Signal tokens added to a student's vocabulary (rscaffold.training.signal_tokens)."""

from __future__ import annotations

import pytest
from helpers import STUDENT_SIGNAL_TOKENS, skip_module_without_student_tokenizer, tiny_student

torch = pytest.importorskip("torch")
skip_module_without_student_tokenizer()

from rscaffold.training.signal_tokens import add_signal_tokens


def test_add_signal_tokens_mean_init_and_idempotent():
    model, tok = tiny_student()
    emb = model.get_input_embeddings().weight.detach().clone()
    ids = add_signal_tokens(tok, model, STUDENT_SIGNAL_TOKENS)
    assert ids == list(range(emb.shape[0], emb.shape[0] + 3))
    new = model.get_input_embeddings().weight
    assert new.shape[0] == emb.shape[0] + 3
    for i in ids:
        torch.testing.assert_close(new[i], emb.mean(0))
    assert tok.decode([ids[0], 100], skip_special_tokens=True) == tok.decode([100])
    assert add_signal_tokens(tok, model, STUDENT_SIGNAL_TOKENS) == ids  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == emb.shape[0] + 3
