"""The problems section (stage 1), and the field mapping of a user's own problem set."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rscaffold.config.base import _Section
from rscaffold.paths import data_dir
from rscaffold.vocabulary import BENCHMARK_NAMES, CUSTOM_FORMAT, BenchmarkName

CustomAnswerType = Literal["number", "math", "yesno", "choice", "text"]


class FieldMapping(_Section):
    """Which field of a row holds what (a key of a JSON object, a CSV column, a Parquet or hub column;
    ``a.b`` reaches a nested object's field)."""

    question: str = Field(default="question", description="The field holding the question text.")
    question_template: str | None = Field(
        default=None,
        description="A question built from several fields instead: a template over field names, e.g. "
        "'{Body} {Question}' or '{context}\\n\\nQuestion: {question}' ({{ and }} for literal braces).",
    )
    answer: str = Field(
        default="answer",
        description="The field holding the gold final answer (number: a number; yesno: true/false or yes/no; "
        "choice: the option's letter, its text, or a 0-based index; math, text: the answer text).",
    )
    solution: str | None = Field(
        default=None, description="The field holding a worked solution, if any (kept as gold_solution)."
    )
    options: str | list[str] | None = Field(
        default=None,
        description="choice only: one field holding the list of options, or a list of fields with one option each "
        "(e.g. [A, B, C, D] columns of a CSV).",
    )
    id: str | None = Field(
        default=None,
        description="The field holding a stable id (problem ids become '<name>-<id>'); default: the row's position.",
    )

    @field_validator("question_template")
    @classmethod
    def _check_question_template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(v) if name is not None]
        except ValueError as err:
            raise ValueError(f"question_template {v!r}: {err}; write a literal brace as {{{{ or }}}}") from None
        if not names or any(not n.strip() or n.strip().isdigit() for n in names):
            raise ValueError(f"question_template {v!r} needs named fields, e.g. '{{Body}} {{Question}}'")
        return v

    @model_validator(mode="after")
    def _one_question_source(self) -> FieldMapping:
        if self.question_template is not None and "question" in self.model_fields_set:
            raise ValueError("give either question (one field) or question_template (several), not both")
        return self


class CustomFormat(_Section):
    """A user's own problem set: field mapping and answer type (``format: custom``).

    The answer type selects the prompt and the answer checker: ``number`` (a numeric final answer,
    GSM8K-style prompt), ``math`` (an expression, checked with math-verify, MATH-style prompt),
    ``yesno``, ``choice`` (options listed as ``A. ...`` lines, answered by letter) and ``text`` (a
    short free-text answer, compared after lower-casing and removing punctuation and articles).
    """

    name: str = Field(
        default="custom",
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="What the problem set is called: the prefix of its problem ids and the benchmark's name in reports.",
    )
    answer_type: CustomAnswerType = Field(
        description="number, math (an expression), yesno, choice or text: selects the prompt and the answer checker."
    )
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Which field holds what.")

    @model_validator(mode="after")
    def _check(self) -> CustomFormat:
        if self.name in BENCHMARK_NAMES:
            raise ValueError(f"name {self.name!r} is a built-in benchmark; use that format, or another name")
        if self.answer_type == "choice" and not self.fields.options:
            raise ValueError("answer_type 'choice' needs fields.options (the field(s) holding the options)")
        if self.answer_type != "choice" and self.fields.options:
            raise ValueError(f"fields.options is only for answer_type 'choice' (got {self.answer_type!r})")
        return self


def _check_custom(fmt: str, custom: CustomFormat | None, what: str) -> None:
    if fmt == CUSTOM_FORMAT and custom is None:
        raise ValueError(f"{what} 'custom' needs a 'custom' section (answer_type and fields)")
    if fmt != CUSTOM_FORMAT and custom is not None:
        raise ValueError(f"a 'custom' section needs {what} 'custom' (got {fmt!r})")


class ProblemSource(_Section):
    """One benchmark of a mixed training set (``problems.mix``): its format, files and limits.

    Its problems keep their own family's prompt and answer checker at training and evaluation."""

    format: BenchmarkName | Literal["custom"] = Field(
        description="The benchmark family of these problems (its file format, answer checker and prompt), or "
        "'custom' (with 'custom')."
    )
    custom: CustomFormat | None = Field(
        default=None, description="format 'custom': the problem set's name, answer type and field mapping."
    )
    train: str = Field(
        description="Training problems: a local file in the format's layout, or hub:<dataset id>[@<config>][:<split>]."
    )
    eval: str | None = Field(
        default=None,
        description="Evaluation problems of this benchmark (same forms as 'train'); none: it adds nothing to the "
        "eval split.",
    )
    limit_train: int | None = Field(
        default=None, ge=1, description="Use a seeded subsample of this many of its training problems."
    )
    limit_eval: int | None = Field(
        default=None, ge=1, description="Use a seeded subsample of this many of its evaluation problems."
    )

    @model_validator(mode="after")
    def _check_format(self) -> ProblemSource:
        _check_custom(self.format, self.custom, "format")
        return self

    @property
    def label(self) -> str:
        """The benchmark's name (the problems' ``source``): the built-in name, or the custom set's name."""
        return self.custom.name if self.custom is not None else self.format


_SINGLE_SOURCE_KEYS = ("format", "custom", "train", "eval", "limit_train", "limit_eval")


class ProblemsConfig(_Section):
    """Where the training and evaluation problems come from.

    ``train`` / ``eval`` are a local file (GSM8K-format JSONL: ``question`` and ``answer`` ending in
    ``#### <final>``) or ``hub:<dataset id>[:<split>]`` (for example ``hub:openai/gsm8k:test``),
    which needs network access to the Hugging Face hub. ``format: custom`` reads your own problems
    (JSONL, JSON array, CSV, Parquet or a hub dataset) through the ``custom`` field mapping.
    """

    format: BenchmarkName | Literal["custom"] = Field(
        default="gsm8k",
        description="The benchmark family of the problems (its file format, answer checker and prompt), or 'custom': "
        "your own file with the field mapping and answer type of 'custom'.",
    )
    custom: CustomFormat | None = Field(
        default=None, description="format 'custom': the problem set's name, answer type and field mapping."
    )
    train: str = Field(
        default_factory=lambda: str(data_dir() / "problems" / "train.jsonl"),
        description="Training problems: a local file in the format's layout, or hub:<dataset id>[@<config>][:<split>] (needs the hub). Default: the built-in set.",
    )
    eval: str = Field(
        default_factory=lambda: str(data_dir() / "problems" / "eval.jsonl"),
        description="Evaluation problems (same forms as 'train'). Default: the built-in set.",
    )
    limit_train: int | None = Field(
        default=None, ge=1, description="Use a seeded subsample of this many training problems."
    )
    limit_eval: int | None = Field(
        default=None, ge=1, description="Use a seeded subsample of this many evaluation problems."
    )
    seed: int = Field(default=0, description="Seed of the subsamples and of the held-out part.")
    part: Literal["auto", "all", "train"] = Field(
        default="auto",
        description="Which training problems: 'all'; 'train': all but the held-out share (heldout_fraction, by a seeded "
        "hash of the problem id, the complement of an evaluation part 'heldout' with the same seed and fraction); "
        "'auto': 'train' when the training file is also evaluated (problems.eval or an evaluation benchmark reads "
        "it), else 'all'. With part 'train', an eval file that is the training file gives its held-out part.",
    )
    heldout_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of a file held out from training for part 'train'."
    )
    on_overlap: Literal["fail", "remove"] = Field(
        default="fail",
        description="When an evaluation problem's question (lower-cased, punctuation and spacing normalised) is also "
        "a training question: 'fail' stops the problems stage naming the counts and examples; 'remove' drops those "
        "problems from the evaluation (counted in the problems manifest and the evaluation report; refused when "
        "that would leave a benchmark no problem).",
    )

    mix: list[ProblemSource] = Field(
        default_factory=list,
        description="Train on several benchmarks at once: a list of {format, custom, train, eval, limit_train, "
        "limit_eval}, one per benchmark, instead of the single-benchmark keys above. Each problem keeps its own "
        "family's prompt and answer checker (teacher, training, evaluation); seed, part, heldout_fraction and "
        "on_overlap apply to each.",
    )

    @model_validator(mode="after")
    def _check_format(self) -> ProblemsConfig:
        _check_custom(self.format, self.custom, "format")
        if self.mix:
            both = [k for k in _SINGLE_SOURCE_KEYS if k in self.model_fields_set]
            if both:
                raise ValueError(
                    f"give either mix (several benchmarks) or {', '.join(both)} (one benchmark), not both; "
                    "put them in the mix's entries"
                )
            family: dict[str, tuple[str, CustomFormat | None]] = {}
            for s in self.mix:
                if family.setdefault(s.label, (s.format, s.custom)) != (s.format, s.custom):
                    raise ValueError(f"mix: two different problem sets are both called {s.label!r}; rename one")
        return self

    def sources(self) -> list[ProblemSource]:
        """The benchmarks trained on: the entries of ``mix``, or the one the single-benchmark keys give."""
        if self.mix:
            return list(self.mix)
        return [
            ProblemSource(
                format=self.format,
                custom=self.custom,
                train=self.train,
                eval=self.eval,
                limit_train=self.limit_train,
                limit_eval=self.limit_eval,
            )
        ]

    @property
    def name(self) -> str:
        """What the problems are called in run names: the benchmark, or the mix's joined by '+'."""
        return "+".join(dict.fromkeys(s.label for s in self.sources()))
