"""README's configuration table says what the config really does: every key it names exists, and
every default it states as a value (a number, true/false, none, a `literal`, a list) is the
pydantic field's own default. Descriptive defaults ("the fetched SmolLM2", "built-in set") are
not values and are left to the reader; parenthesised remarks ("none (20 in the default run)") are
ignored."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from rscaffold.config import PipelineConfig

README = Path(__file__).resolve().parents[1] / "README.md"
_MISSING = object()


def config_table() -> list[tuple[str, str]]:
    """(keys cell, defaults cell) of every row of the table under "## Configuration"."""
    text = README.read_text()
    section = text[text.index("\n## Configuration\n") :]
    start = section.index("| key | default | meaning |")
    rows = []
    for line in section[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows.append((cells[0], cells[1]))
    return rows


def expand_keys(cell: str) -> list[list[str]]:
    """``training.a``, ``b`` / ``c`` -> [[training.a], [training.b, training.c]]: each group is one
    default; later keys are relative to the first key's parent."""
    groups = []
    parent = ""
    for part in re.split(r",\s*|\s+or\s+", cell):
        group = []
        for key in re.findall(r"`([^`]+)`", part):
            if "." in key:
                parent = key.rsplit(".", 1)[0]
            else:
                key = f"{parent}.{key}"
            group.append(key)
        if group:
            groups.append(group)
    return groups


def literal(text: str) -> Any:
    """The value a default cell states, or _MISSING when it describes one in words."""
    text = re.sub(r"\s*\([^)]*\)", "", text).strip()
    if text == "none":
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?(\d+\.\d*|\d*\.\d+|\d+(\.\d+)?e-?\d+)", text):
        return float(text)
    m = re.fullmatch(r"`([^`]*)`", text)
    if m:
        v = m.group(1)
        return {"[]": [], "{}": {}}.get(v, v)
    return _MISSING


def default_of(cfg: BaseModel, key: str) -> Any:
    """The default of ``key`` in ``cfg``; _MISSING inside a section that is None by default (its
    fields are still checked to exist); KeyError for a key the config does not have."""
    obj: Any = cfg
    cls: Any = type(cfg)
    for part in key.split("."):
        if part == "*":
            return _MISSING
        if cls is None or part not in cls.model_fields:
            raise KeyError(key)
        annotation = cls.model_fields[part].annotation
        obj = getattr(obj, part) if obj is not _MISSING and obj is not None else _MISSING
        models = [
            t for t in (annotation, *typing.get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        cls = models[0] if models else None
    return obj


def checked_defaults() -> list[tuple[str, Any, Any]]:
    """(key, README's default, the config's default) of every default README states as a value."""
    cfg = PipelineConfig()
    out = []
    for keys_cell, default_cell in config_table():
        groups = expand_keys(keys_cell)
        flat = [k for g in groups for k in g]
        values = [v.strip() for v in default_cell.split(", ")]
        if (
            len(flat) == 1
            and isinstance(default_of(cfg, flat[0]), list)
            and all(re.fullmatch(r"`?[\w-]+`?", v) for v in values)
        ):
            values = [f"`{[v.strip('`') for v in values]}`"]  # one list-valued key: the cell lists its items
        if len(values) != len(groups):
            continue
        for group, value in zip(groups, values):
            alternatives = [v.strip() for v in value.split(" / ")] if len(group) > 1 else [value]
            for key, text in zip(group, alternatives if len(alternatives) == len(group) else [value] * len(group)):
                stated = literal(text) if not text.startswith("`[") else text.strip("`")
                actual = default_of(cfg, key)
                if stated is _MISSING or actual is _MISSING or isinstance(actual, BaseModel):
                    continue
                out.append((key, stated, actual))
    return out


def unknown_keys() -> list[str]:
    cfg = PipelineConfig()
    missing = []
    for keys_cell, _ in config_table():
        for key in (k for g in expand_keys(keys_cell) for k in g):
            if "{" in key or key.endswith(".*"):
                continue
            try:
                default_of(cfg, key)
            except KeyError:
                missing.append(key)
    return missing


def test_the_configuration_table_names_real_keys_with_their_true_defaults():
    assert not unknown_keys(), f"README's configuration table names keys the config does not have: {unknown_keys()}"
    checked = checked_defaults()
    assert len(checked) >= 60, f"the table parser checks only {len(checked)} defaults"
    wrong = []
    for key, stated, actual in checked:
        if isinstance(actual, list) and isinstance(stated, str):
            ok = stated == str([str(v) for v in actual])
        elif isinstance(actual, float) or isinstance(stated, float):
            ok = actual is not None and stated is not None and float(stated) == pytest.approx(float(actual))
        else:
            # a path default (data/signals.yaml) is stated relative to the checkout
            ok = stated == actual or (
                isinstance(actual, str) and (str(stated) == actual or actual.endswith(f"/{stated}"))
            )
        if not ok:
            wrong.append(f"{key}: README says {stated!r}, the config's default is {actual!r}")
    assert not wrong, "\n".join(wrong)
