"""Stage 1 of the paper's labeling: keyword pre-labels from a step's first words, and the deterministic fallback."""

from __future__ import annotations

import re

from rscaffold.labeling.taxonomy import Taxonomy

_LEADING_JUNK = re.compile(r"""[\s*_#>`~|+\-\u2022\u00b7"'\u201c\u201d\u2018\u2019(\[]+""")
_LIST_MARKER = re.compile(r"(?:\d{1,3}|[a-zA-Z])[.)\]:]\s+|step\s+\d+\s*[:.)\-]\s*", re.IGNORECASE)


def _strip_leading(step: str) -> str:
    text = step
    while True:
        m = _LEADING_JUNK.match(text) or _LIST_MARKER.match(text)
        if m is None or m.end() == 0:
            return text
        text = text[m.end() :]


def keyword_prelabel(step: str, tax: Taxonomy) -> tuple[str | None, str | None]:
    """(signal, cue) when ``step`` starts with a cue (the longest one wins), else (None, None).

    Case-insensitive, on word boundaries; leading markdown, list markers and quotes are ignored.
    """
    hit = tax.match_cue(_strip_leading(step[:300]))
    if hit is None:
        return None, None
    return hit


def fallback_label(step: str, tax: Taxonomy) -> str:
    """The keyword pre-label, or the taxonomy's default signal (deterministic)."""
    signal, _ = keyword_prelabel(step, tax)
    return signal or tax.default_signal
