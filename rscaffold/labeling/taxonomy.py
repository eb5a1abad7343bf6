"""The signal taxonomy: categories with names, special tokens, definitions and cue words, loaded from YAML.

The taxonomy is configuration (``labeling.taxonomy``); its :meth:`Taxonomy.digest` is part of the
labeling fingerprint and travels with the labeling stage's output.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from rscaffold.config import format_validation_error


class TaxonomyError(ValueError):
    """A taxonomy file that cannot be used; the message says which file and what is wrong."""


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def _norm_cue(cue: str) -> str:
    """Canonical form of a cue or of matched text: lowercase, straight quotes, no , ; :"""
    return " ".join(re.sub(r"[,;:]", " ", cue.translate(_APOSTROPHES).lower()).split())


class SignalSpec(BaseModel):
    """One signal category."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    token: str = Field(min_length=1)
    definition: str = Field(min_length=1)
    cues: list[str] = Field(default_factory=list)
    essential: bool = True
    example: str = ""

    @field_validator("name", "definition", "example")
    @classmethod
    def _strip(cls, v: str) -> str:
        return " ".join(v.split())

    @field_validator("token")
    @classmethod
    def _token_no_space(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError(f"token must not contain whitespace: {v!r}")
        return v

    @field_validator("cues")
    @classmethod
    def _cues_clean(cls, v: list[str]) -> list[str]:
        out = []
        for cue in v:
            if not isinstance(cue, str) or not _norm_cue(cue):
                raise ValueError(f"empty cue {cue!r}")
            out.append(" ".join(cue.lower().split()))
        return out


class Taxonomy(BaseModel):
    """The signal categories (names, tokens, definitions, cues), loaded from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    default_signal: str
    signals: list[SignalSpec] = Field(min_length=1)

    _cue_re: re.Pattern[str] = PrivateAttr()
    _cue_owner: dict[str, tuple[str, str]] = PrivateAttr()  # normalized cue -> (signal, cue)

    @model_validator(mode="after")
    def _check(self) -> Taxonomy:
        problems: list[str] = []
        for what, values in (
            ("name", [s.name.lower() for s in self.signals]),
            ("token", [s.token for s in self.signals]),
        ):
            dups = sorted(v for v, c in Counter(values).items() if c > 1)
            if dups:
                problems.append(f"duplicate signal {what}(s): {', '.join(dups)}")
        if self.default_signal not in {s.name for s in self.signals}:
            problems.append(f"default_signal {self.default_signal!r} is not one of the signal names")
        seen: dict[str, str] = {}
        for s in self.signals:
            for cue in s.cues:
                key = _norm_cue(cue)
                if key in seen and seen[key] != s.name:
                    problems.append(f"cue {cue!r} belongs to both {seen[key]!r} and {s.name!r}")
                seen[key] = s.name
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model_post_init(self, __context: Any) -> None:
        owner: dict[str, tuple[str, str]] = {}
        for s in self.signals:
            for cue in s.cues:
                owner[_norm_cue(cue)] = (s.name, cue)
        alts = []
        for key in sorted(owner, key=len, reverse=True):  # longest cue first: it wins
            words = [re.escape(w) for w in key.split()]
            alts.append(r"[,;:]?\s+".join(words))
        pattern = r"(?:" + "|".join(alts) + r")(?![\w'-])" if alts else r"(?!x)x"
        self._cue_re = re.compile(pattern, re.IGNORECASE)
        self._cue_owner = owner

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.signals]

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.signals]

    @property
    def by_name(self) -> dict[str, SignalSpec]:
        return {s.name: s for s in self.signals}

    @property
    def by_token(self) -> dict[str, SignalSpec]:
        return {s.token: s for s in self.signals}

    @property
    def essential_names(self) -> list[str]:
        return [s.name for s in self.signals if s.essential]

    def digest(self) -> str:
        """sha256 of the canonical content (16 hex chars); part of the labeling fingerprint."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write the taxonomy as YAML (what :func:`load_taxonomy` reads back, same digest)."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
        return path

    def match_cue(self, text: str) -> tuple[str, str] | None:
        """(signal, cue) of the longest cue ``text`` starts with, else None."""
        m = self._cue_re.match(text.translate(_APOSTROPHES))
        if m is None:
            return None
        return self._cue_owner[_norm_cue(m.group(0))]


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Load and validate a taxonomy YAML file; :class:`TaxonomyError` says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"taxonomy file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TaxonomyError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TaxonomyError(f"{path}: the top level must be a mapping with 'version', 'default_signal', 'signals'")
    try:
        return Taxonomy.model_validate(raw)
    except ValidationError as err:
        raise TaxonomyError(f"invalid taxonomy {path}:\n{format_validation_error(err)}") from None
