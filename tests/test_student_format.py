"""Tokenization and collation of training examples (rscaffold.student_format): masks, signal
positions, truncation, padding."""

from __future__ import annotations

import pytest
from helpers import (
    STUDENT_SIGNAL_TOKENS,
    STUDENT_TOKEN_MAP,
    skip_module_without_student_tokenizer,
    synthetic_examples,
    tiny_student,
)

pytest.importorskip("torch")
skip_module_without_student_tokenizer()

from rscaffold.prompts import render_example
from rscaffold.student_format import IGNORE_INDEX, ScaffoldCollator, encode_example, encode_examples
from rscaffold.training.signal_tokens import add_signal_tokens


def test_encode_masks_prompt_and_signals_and_truncates_completion():
    model, tok = tiny_student()
    ids = add_signal_tokens(tok, model, STUDENT_SIGNAL_TOKENS)
    prompt, completion = render_example(
        "Q?", [("setup", "A b c."), ("conclude", "The answer is 1.")], tok, signal_tokens=STUDENT_TOKEN_MAP
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
    model, tok = tiny_student()
    ids = add_signal_tokens(tok, model, STUDENT_SIGNAL_TOKENS)
    rows = encode_examples(synthetic_examples(2), tok, STUDENT_TOKEN_MAP, signal_token_ids=ids)
    rows[1] = encode_example(
        *render_example(
            "Longer question here?",
            [("setup", "x y z w"), ("elaborate", "more"), ("conclude", "end")],
            tok,
            signal_tokens=STUDENT_TOKEN_MAP,
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
