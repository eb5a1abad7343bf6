"""Shared fixtures: the offline SmolLM2 model dir, tiny models, the shared benchmark files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
