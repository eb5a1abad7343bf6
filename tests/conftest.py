"""Shared fixtures: the offline SmolLM2 model dir, tiny models, the shared benchmark files, a random
scaffolded student, a trained tiny student."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import (
    RANDOM_STUDENT_SIGNALS,
    RANDOM_STUDENT_TOKENS,
    STUDENT_SIGNAL_TOKENS,
    STUDENT_SIGNALS,
    synthetic_examples,
    training_config,
)

from rscaffold.config import TinyModelConfig
from rscaffold.paths import default_model_dir

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The dequantized SmolLM2-135M-Instruct prepared by `rscaffold models fetch`."""
    d = Path(os.environ.get("RSCAFFOLD_SMOLLM2_DIR", default_model_dir()))
    if not (d / "config.json").exists():
        msg = f"SmolLM2-135M-Instruct not prepared at {d}: run `rscaffold models fetch` (scripts/setup.sh does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random-init Llama with the SmolLM2 tokenizer, saved like any model directory."""
    from rscaffold.models import save_tiny_model

    return save_tiny_model(str(smollm2_dir), TinyModelConfig(), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    if not BENCHMARKS_DIR.exists():
        pytest.skip(f"shared benchmark files not present at {BENCHMARKS_DIR}")
    return BENCHMARKS_DIR


@pytest.fixture(scope="module")
def random_student(smollm2_dir):
    """A tiny random model with signal tokens whose (untied, random) output layer makes greedy
    decoding produce varied text, blank lines, eos and signal tokens, so that every stopping path
    of guided decoding is taken."""
    torch = pytest.importorskip("torch")
    from rscaffold.models import build_tiny_model
    from rscaffold.prompts import STUDENT_SYSTEM_PROMPT
    from rscaffold.student import Student
    from rscaffold.training.signal_tokens import add_signal_tokens

    model, tok = build_tiny_model(str(smollm2_dir), TinyModelConfig(seed=0))
    ids = add_signal_tokens(tok, model, RANDOM_STUDENT_TOKENS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vocab, hidden = model.get_input_embeddings().weight.shape
        w = torch.randn(vocab, hidden, generator=g)
        w[ids] *= 2.5
        w[tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])] *= 3.0  # "\n", "\n\n"
        w[tok.eos_token_id] *= 2.5
        model.lm_head.weight = torch.nn.Parameter(w)
        model.config.tie_word_embeddings = False
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


@pytest.fixture(scope="session")
def trained_token(tmp_path_factory):
    """A tiny student trained with the token objective on synthetic examples (16 steps), saved;
    (TrainResult, the examples, the TrainingConfig). Shared read-only by the trainer and student tests."""
    from rscaffold.training.trainer import train_student

    out = tmp_path_factory.mktemp("token")
    examples = synthetic_examples(24) + synthetic_examples(4, split="validation")
    c = training_config(max_steps=16, logging_steps=4, learning_rate=2e-2, signal_objective="token")
    result = train_student(
        examples,
        c,
        STUDENT_SIGNALS,
        signal_tokens=STUDENT_SIGNAL_TOKENS,
        output_dir=out,
        scaffolded=True,
        model_card_info={"data_fingerprint": "data123", "taxonomy_hash": "tax456"},
    )
    return result, examples, c


@pytest.fixture(scope="session")
def tiny_teacher_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random-init Llama with SmolLM2's tokenizer and chat template.

    The matrices are re-drawn with std 0.3: at the default 0.02 the logits are almost flat and
    greedy decoding degenerates to whitespace, which would make output comparisons vacuous.
    """
    import torch

    from rscaffold.models import build_tiny_model

    out_dir = tmp_path_factory.mktemp("tiny-teacher")
    model, tok = build_tiny_model(str(smollm2_dir), TinyModelConfig())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=gen)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def counted_server(tiny_teacher_dir, tmp_path_factory):
    """``transformers serve`` hosting the tiny teacher, behind a :class:`helpers.CountingProxy`."""
    from helpers import CountingProxy, serve_available, transformers_serve

    why = serve_available()
    if why:
        pytest.skip(why)
    with transformers_serve(tiny_teacher_dir, tmp_path_factory.mktemp("serve") / "serve.log") as base:
        proxy = CountingProxy(base)
        yield proxy
        proxy.close()
