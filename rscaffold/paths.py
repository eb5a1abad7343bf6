"""Where rscaffold finds its own data and keeps its model cache."""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"


def data_dir() -> Path:
    """The project's ``data/`` folder: in a source checkout, or packaged inside a built wheel."""
    packaged = Path(__file__).parent / "_data"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "data"


def cache_home() -> Path:
    """Model cache root: ``$RSCAFFOLD_HOME`` or ``~/.cache/rscaffold``."""
    return Path(os.environ.get("RSCAFFOLD_HOME", Path.home() / ".cache" / "rscaffold")).expanduser()


def default_model_dir() -> Path:
    """Where ``rscaffold models fetch`` puts the dequantized SmolLM2-135M-Instruct."""
    return cache_home() / "models" / SMOLLM2_DIRNAME
