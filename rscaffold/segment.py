"""Split a teacher trace into reasoning steps A_1..A_n.

As in the paper, steps are the paragraphs of the trace, separated by blank lines: the one
step-boundary rule :data:`rscaffold.vocabulary.STEP_BOUNDARY`, which the training format and the
decoder share (:func:`split_at_step_boundaries`). Optional refinements, all in
:class:`~rscaffold.config.SegmentationConfig`: split a paragraph before discourse turns ("Wait,",
"But", ...), merge fragments shorter than ``min_chars``, split steps longer than ``max_chars`` at
sentence boundaries, cap the number of steps at ``max_steps`` (off by default; the tail is joined
into the last step, so no text is lost).

Invariant: no step contains a step boundary. Where pieces that were separate paragraphs are
joined into one step (a merged short fragment, the capped tail), they are joined with a single
line break (:data:`IN_STEP_JOINER`), never with a blank line, so the decoder, which ends a step at
the first blank line, parses the training text back into exactly these steps.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rscaffold.config import SegmentationConfig
from rscaffold.vocabulary import STEP_BOUNDARY, STEP_SEPARATOR, THINK_TAG

# Sentence openers before which a paragraph is split when ``split_on_discourse_turns`` is on.
DISCOURSE_TURNS: tuple[str, ...] = (
    "Wait",
    "But",
    "Alternatively",
    "So",
    "Let me check",
    "Hmm",
    "However",
)

SENTENCE_SEP = " "
IN_STEP_JOINER = "\n"
"""Joins two paragraphs that end up in one step (a single line break: not a step boundary)."""
# End of a sentence: terminal punctuation (plus closing quotes/brackets) followed by whitespace,
# or a single line break.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n")


@dataclass
class _Piece:
    text: str
    sep: str  # the separator that joins this piece to the one before it


def trace_body(reasoning: str | None, text: str) -> str:
    """The full trace to segment: the separate reasoning field (if any), then the visible text."""
    parts = [p for p in (reasoning, text) if p and p.strip()]
    return STEP_SEPARATOR.join(parts)


def split_steps(text: str, cfg: SegmentationConfig | None = None) -> list[str]:
    """Split ``text`` into steps (see the module docstring). Empty or blank text gives ``[]``."""
    cfg = cfg or SegmentationConfig()
    if not text or not text.strip():
        return []
    pieces = [_Piece(p, STEP_SEPARATOR) for p in paragraphs(text)]
    if cfg.split_on_discourse_turns:
        pieces = [q for p in pieces for q in _split_turns(p)]
    pieces = [q for p in pieces for q in _split_long(p, cfg.max_chars)]
    pieces = _merge_short(pieces, cfg.min_chars)
    pieces = _cap(pieces, cfg.max_steps)
    return [p.text for p in pieces]


def split_at_step_boundaries(text: str) -> list[str]:
    """``text`` cut at every step boundary (:data:`~rscaffold.vocabulary.STEP_BOUNDARY`, a blank
    line), pieces stripped, empty ones dropped: the one rule of the segmenter and the decoder."""
    return [p.strip() for p in STEP_BOUNDARY.split(text) if p.strip()]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, ``<think>`` tags removed (their content kept, in order)."""
    text = THINK_TAG.sub(STEP_SEPARATOR, text.replace("\r\n", "\n").replace("\r", "\n"))
    return split_at_step_boundaries(text)


def _joiner(sep: str) -> str:
    """What joins a piece to the previous one inside one step."""
    return IN_STEP_JOINER if sep == STEP_SEPARATOR else sep


def _turn_pattern(turns: tuple[str, ...]) -> re.Pattern[str]:
    alts = "|".join(re.escape(t) for t in sorted(turns, key=len, reverse=True))
    return re.compile(
        rf"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=(?:{alts})\b)"  # after a sentence end
        rf"|(?<=\n)[^\S\n]*(?=(?:{alts})\b)"  # at the start of a line
    )


_TURNS = _turn_pattern(DISCOURSE_TURNS)


def _split_turns(piece: _Piece) -> list[_Piece]:
    out: list[_Piece] = []
    start = 0
    text = piece.text
    for m in _TURNS.finditer(text):
        if m.end() == 0 or m.start() == 0:
            continue
        head = text[start : m.start()].strip()
        if head:
            out.append(_Piece(head, piece.sep if not out else SENTENCE_SEP))
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(_Piece(tail, piece.sep if not out else SENTENCE_SEP))
    return out or [piece]


def _split_long(piece: _Piece, max_chars: int) -> list[_Piece]:
    """Cut a piece longer than ``max_chars`` at sentence ends, else at whitespace, else hard."""
    out: list[_Piece] = []
    rest = piece.text
    sep = piece.sep
    while len(rest) > max_chars:
        window = rest[: max_chars + 1]
        cut = 0
        for m in _SENTENCE_END.finditer(window):
            if m.end() <= max_chars:
                cut = m.end()
        if cut < max_chars // 4:  # a sentence end too early would leave a tiny fragment
            ws = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
            cut = ws if ws > 0 else max_chars
        head, rest = rest[:cut].rstrip(), rest[cut:].lstrip()
        out.append(_Piece(head, sep))
        sep = SENTENCE_SEP
    if rest:
        out.append(_Piece(rest, sep))
    return out


def _merge_short(pieces: list[_Piece], min_chars: int) -> list[_Piece]:
    """Merge pieces shorter than ``min_chars`` into the previous piece (the next one if first)."""
    out: list[_Piece] = []
    carry: _Piece | None = None  # short leading piece waiting for a successor
    for p in pieces:
        if carry is not None:
            p = _Piece(carry.text + _joiner(p.sep) + p.text, carry.sep)
            carry = None
        if len(p.text) < min_chars:
            if out:
                out[-1] = _Piece(out[-1].text + _joiner(p.sep) + p.text, out[-1].sep)
            else:
                carry = p
            continue
        out.append(p)
    if carry is not None:  # everything was short
        out.append(carry)
    return out


def _cap(pieces: list[_Piece], max_steps: int | None) -> list[_Piece]:
    if max_steps is None or len(pieces) <= max_steps:
        return pieces
    head = pieces[: max_steps - 1]
    tail = pieces[max_steps - 1 :]
    joined = tail[0].text + "".join(_joiner(p.sep) + p.text for p in tail[1:])
    return [*head, _Piece(joined, tail[0].sep)]
