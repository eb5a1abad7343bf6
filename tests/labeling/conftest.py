"""Fixtures of the labeling tests."""

from __future__ import annotations

import pytest

from rscaffold.labeling.taxonomy import Taxonomy, load_taxonomy
from rscaffold.paths import data_dir


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    """The built-in taxonomy (data/signals.yaml)."""
    return load_taxonomy(data_dir() / "signals.yaml")
