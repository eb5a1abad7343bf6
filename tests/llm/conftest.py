"""Fixtures of the backend tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from rscaffold.config import TinyModelConfig


@pytest.fixture(scope="module")
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
