"""Training problems that are also evaluation problems: the same question text once lower-cased and
with punctuation and spacing normalised (a problem trained on and then evaluated measures recall,
not reasoning)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rscaffold.records import ProblemRecord

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
EXAMPLES = 3  # overlapping problems quoted per benchmark in errors and reports


def normalize_question(text: str) -> str:
    """``text`` in NFKC, lower-cased, every run of punctuation, symbols and whitespace one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def question_key(text: str) -> str:
    """A hash of :func:`normalize_question` (what two problems share when they ask the same)."""
    return hashlib.sha256(normalize_question(text).encode("utf-8")).hexdigest()[:16]


@dataclass
class Overlap:
    """The problems of one evaluation benchmark whose question is also a training question."""

    benchmark: str
    problems: int  # evaluated problems of the benchmark
    pairs: list[tuple[ProblemRecord, ProblemRecord]] = field(default_factory=list)  # (evaluation, training)

    @property
    def count(self) -> int:
        return len(self.pairs)

    @property
    def eval_ids(self) -> list[str]:
        return [e.problem_id for e, _ in self.pairs]

    def examples(self, k: int = EXAMPLES) -> list[str]:
        return [f"{e.problem_id} = training {t.problem_id}: {_short(e.question)!r}" for e, t in self.pairs[:k]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "problems": self.problems,
            "overlapping": self.count,
            "eval_ids": self.eval_ids,
            "examples": self.examples(),
        }


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_overlap(train: Sequence[ProblemRecord], benchmark: str, evaluated: Sequence[ProblemRecord]) -> Overlap:
    """The problems of ``evaluated`` whose normalised question is a training question."""
    by_key: dict[str, ProblemRecord] = {}
    for t in train:
        by_key.setdefault(question_key(t.question), t)
    out = Overlap(benchmark, len(evaluated))
    for e in evaluated:
        hit = by_key.get(question_key(e.question))
        if hit is not None:
            out.pairs.append((e, hit))
    return out
