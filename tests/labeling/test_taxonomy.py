"""The signal taxonomy (rscaffold.labeling.taxonomy): the built-in file, its digest, invalid files."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import CONTRAST, REASONING, SIGNAL_NAMES

from rscaffold.labeling.taxonomy import Taxonomy, TaxonomyError, load_taxonomy
from rscaffold.paths import data_dir


def test_builtin_taxonomy(tax: Taxonomy) -> None:
    assert tax.version == 1
    assert tax.names == SIGNAL_NAMES
    assert tax.default_signal == REASONING
    assert len(set(tax.tokens)) == 7 and all(t.startswith("<sig:") and t.endswith(">") for t in tax.tokens)
    assert tax.essential_names == SIGNAL_NAMES[:6]  # only restatement can be pruned
    assert tax.by_name[CONTRAST].token == "<sig:contrast>"
    assert {"but", "however", "wait"} <= set(tax.by_name[CONTRAST].cues)
    assert all(s.definition and s.example and s.cues for s in tax.signals)
    assert re.fullmatch(r"[0-9a-f]{16}", tax.digest())


def test_digest_is_stable_and_content_sensitive(tmp_path: Path, tax: Taxonomy) -> None:
    raw = yaml.safe_load((data_dir() / "signals.yaml").read_text())
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert load_taxonomy(p).digest() == tax.digest()
    raw["signals"][0]["definition"] += " Changed."
    p.write_text(yaml.safe_dump(raw))
    assert load_taxonomy(p).digest() != tax.digest()


def _write_taxonomy(tmp_path: Path, mutate: Callable[[dict], None]) -> Path:
    raw = yaml.safe_load((data_dir() / "signals.yaml").read_text())
    mutate(raw)
    p = tmp_path / "signals.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_missing_taxonomy_file(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="taxonomy file not found"):
        load_taxonomy(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nsignals: [unclosed\n")
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        load_taxonomy(p)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(TaxonomyError, match="top level must be a mapping"):
        load_taxonomy(p)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["signals"][1].update(name=r["signals"][0]["name"].upper()), "duplicate signal name"),
        (lambda r: r["signals"][1].update(token=r["signals"][0]["token"]), "duplicate signal token"),
        (lambda r: r.update(default_signal="Musing"), "default_signal 'Musing' is not one of"),
        (lambda r: r["signals"][1]["cues"].append("However"), "cue 'however' belongs to both"),
        (lambda r: r["signals"][0].update(colour="red"), r"signals\.0\.colour: unknown key"),
        (lambda r: r["signals"][0].update(token="<sig: contrast>"), "must not contain whitespace"),
        (lambda r: r.update(signals=[]), "signals"),
    ],
)
def test_invalid_taxonomy_content(tmp_path: Path, mutate: Callable[[dict], None], message: str) -> None:
    with pytest.raises(TaxonomyError, match=message):
        load_taxonomy(_write_taxonomy(tmp_path, mutate))
