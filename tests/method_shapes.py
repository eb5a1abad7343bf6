"""The paper's shapes at toy size, for the tests in ``tests/method`` (no weights needed).

* :func:`tiny_qwen2`: a random-init Qwen2 with *untied* embeddings and a *padded* vocabulary (more
  embedding rows than tokenizer entries), the shape of Qwen2.5-7B/14B;
* :func:`tiny_llama`: the random-init Llama with *tied* embeddings (SmolLM2's shape);
* :func:`long_r1_trace`: a synthetic R1-style trace of well over 64 steps, with short
  fragments and blank lines that hold spaces;
* :func:`examples`: dataset rows whose next signal is determined by the step index.

All use the offline SmolLM2 tokenizer (skipped when it is not prepared).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rscaffold.config import TinyModelConfig
from rscaffold.paths import default_model_dir
from rscaffold.records import ExampleRecord, Step

TOKENIZER_DIR = Path(os.environ.get("RSCAFFOLD_SMOLLM2_DIR", default_model_dir()))
VOCAB_PADDING = 64

NAMES = ["setup", "elaborate", "conclude"]
TOKENS = [f"<sig:{n}>" for n in NAMES]


def tokenizer_dir() -> str:
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"SmolLM2 tokenizer not found at {TOKENIZER_DIR} (run `rscaffold models fetch`)")
    return str(TOKENIZER_DIR)


def tiny_qwen2(seed: int = 0):
    """(model, tokenizer): a random-init Qwen2ForCausalLM with untied embeddings and
    ``VOCAB_PADDING`` padding rows, built from a transformers config directly."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = Qwen2Config(
        vocab_size=len(tok) + VOCAB_PADDING,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def tiny_llama(seed: int = 0):
    """(model, tokenizer): the project's tiny random-init Llama with tied embeddings."""
    from rscaffold.models import build_tiny_model

    model, tok = build_tiny_model(tokenizer_dir(), TinyModelConfig(seed=seed, max_position_embeddings=2048))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def long_r1_trace(paragraphs: int = 90) -> str:
    """An R1-style trace: a <think> block of ``paragraphs`` paragraphs (some only a word long,
    some blank lines holding spaces or tabs), then the visible answer."""
    parts = []
    for i in range(paragraphs):
        if i % 11 == 5:
            parts.append("Hmm.")  # a fragment shorter than min_chars: merged into a neighbour
        elif i % 7 == 3:
            parts.append(f"Wait, let me recheck step {i}: {i} * 3 = {3 * i}.\nYes, {3 * i} is right.")
        else:
            parts.append(f"So after step {i} we have {i} + {i} = {2 * i} apples in basket {i}.")
    seps = ["\n\n", "\n \n", "\n\t\n", "\n\n\n"]
    body = parts[0]
    for i, p in enumerate(parts[1:], 1):
        body += seps[i % len(seps)] + p
    return f"<think>\n{body}\n</think>\n\nThe answer is 42."


def examples(n: int, split: str = "train", *, answer_text: bool = False) -> list[ExampleRecord]:
    """Rows whose next signal is determined by the step index (setup, elaborate, conclude);
    ``answer_text``: with the teacher's final answer text (two short paragraphs)."""
    out = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        texts = [f"We have {a} apples and {b} pears.", f"Together that is {a} plus {b}.", f"The answer is {a + b}."]
        steps = [Step(index=j, signal=NAMES[j], text=t, source="llm") for j, t in enumerate(texts)]
        extra = {"answer_text": f"{a} + {b} = {a + b}.\n\nThe answer is {a + b}."} if answer_text else {}
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
                **extra,
            )
        )
    return out
