"""Small markdown helpers shared by the labeling and evaluation reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as a table cell (pipes escaped, on one line)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    """The lines of a markdown table; ``align``: one of ``l``, ``r``, ``c`` per column (default:
    no alignment marks)."""
    rule = ["---" if align is None else {"r": "---:", "c": ":---:"}.get(a, "---") for a in (align or headers)]
    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "| " + " | ".join(rule) + " |"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def percent(x: float | None, *, digits: int = 1, missing: str = "–", suffix: str = "") -> str:
    """``0.1234`` -> ``"12.3"`` (plus ``suffix``); ``missing`` for None."""
    return missing if x is None else f"{100.0 * x:.{digits}f}{suffix}"


def number(x: float | None, *, digits: int = 3, missing: str = "–") -> str:
    return missing if x is None else f"{x:.{digits}f}"
