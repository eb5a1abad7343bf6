"""Benchmark loaders: the published local files, or the Hugging Face hub, to ``ProblemRecord`` rows.

One :class:`Benchmark` per benchmark, registered in :data:`BENCHMARKS`:

============== ========= ================================= =====================================
name           answer    local file (published format)     hub (``hub:<id>[@<config>][:<split>]``)
============== ========= ================================= =====================================
gsm8k          math      ``test.jsonl`` / ``train.jsonl``  ``openai/gsm8k`` (config ``main``)
math500        math      ``test.jsonl`` (prm800k split)    ``HuggingFaceH4/MATH-500``
strategyqa     yesno     ``strategyqa_train.json``         ``ChilleD/StrategyQA``
commonsenseqa  choice    ``dev_rand_split.jsonl``          ``tau/commonsense_qa``
truthfulqa     choice    ``TruthfulQA.csv``                ``truthfulqa/truthful_qa`` (``generation``)
============== ========= ================================= =====================================

``custom`` (:func:`custom_benchmark`, ``problems.format: custom``): a user's own problems in a JSONL,
JSON-array, CSV or Parquet file, or a hub dataset, read through a field mapping (question, answer,
optional solution, options and id) with an answer type (number, math, yesno, choice, text) that
selects the prompt and the answer checker. It is not in :data:`BENCHMARKS` (which holds the five
published benchmarks); :func:`benchmark_for` resolves a format name and its custom spec to either.

Row conventions:

* ``problem_id`` is stable: the benchmark's own id where it has one (``math500-test-precalculus-807``,
  ``strategyqa-<qid>``, ``commonsenseqa-<id>``), otherwise the file's stem (or the hub split) and
  the row index (``gsm8k-test-00012``, ``truthfulqa-00012``), so a local file and its hub copy give
  the same ids.
* ``gold_answer``: GSM8K the number after ``####`` without thousands separators; MATH-500 the
  ``answer`` field (else the last ``\\boxed{}`` of the solution); StrategyQA ``"yes"`` / ``"no"``;
  CommonsenseQA and TruthfulQA the letter of the correct option.
* multiple-choice questions carry their options in the question text, one ``"A. ..."`` line each
  (:func:`rscaffold.evalsets.answers.format_choice_question`; read them back with
  :func:`~rscaffold.evalsets.answers.choice_options`).
* TruthfulQA multiple choice: the ``Best Answer`` is the correct option and the ``Incorrect
  Answers`` (``;``-separated) the distractors, shuffled by an RNG seeded with the question, so the
  letters do not depend on the loader's ``seed``.
* ``source`` is the benchmark name (see :func:`benchmark_for_record`), ``split`` the role given to
  the loader (``"train"`` or ``"eval"``).

Subsampling (``limit``) is seeded and nested: the first ``k`` of one seeded permutation, returned in
file order, so ``limit=10`` is a subset of ``limit=20`` under the same seed. ``part``/``heldout_fraction``
split a file that has no separate test set (StrategyQA) into disjoint train / held-out parts by a
seeded hash of each ``problem_id``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rscaffold.evalsets.answers import AnswerType, find_boxed, format_choice_question
from rscaffold.prompts import FAMILY_TEMPLATES, benchmark_prompt, benchmark_template
from rscaffold.records import ProblemRecord
from rscaffold.vocabulary import BENCHMARK_NAMES, CUSTOM_FORMAT

if TYPE_CHECKING:
    from rscaffold.config import CustomFormat

log = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
Part = Literal["all", "train", "heldout"]


class BenchmarkFormatError(ValueError):
    """A benchmark file (or hub row) that does not have the expected format.

    The message starts with where the problem is: ``path:line`` (or the hub row).
    """


class BenchmarkNotFoundError(FileNotFoundError):
    """A local benchmark file that does not exist."""


# =============================================================================================
# hub sources


@dataclass(frozen=True)
class HubSource:
    """A parsed ``hub:<dataset id>[@<config>][:<split>]`` source string."""

    dataset_id: str
    split: str | None = None
    config: str | None = None

    def __str__(self) -> str:
        s = HUB_PREFIX + self.dataset_id
        if self.config:
            s += "@" + self.config
        if self.split:
            s += ":" + self.split
        return s


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(?:/[A-Za-z0-9][\w.\-]*)?$")
_HUB_NAME = re.compile(r"^[\w.\-\[\]%+]+$")


def is_hub_source(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def parse_hub_source(source: str) -> HubSource:
    """Parse ``hub:<dataset id>[@<config>][:<split>]``, e.g. ``hub:openai/gsm8k:test`` or
    ``hub:truthfulqa/truthful_qa@generation:validation``."""
    if not is_hub_source(source):
        raise ValueError(f"not a hub source (expected 'hub:<dataset id>[:<split>]'): {source!r}")
    rest = source[len(HUB_PREFIX) :].strip()
    dataset, colon, split = rest.partition(":")
    dataset, _, config = dataset.partition("@")
    if not _HUB_ID.match(dataset):
        raise ValueError(f"invalid hub dataset id {dataset!r} in {source!r} (expected 'owner/name')")
    for what, value in (("config", config), ("split", split)):
        if value and not _HUB_NAME.match(value):
            raise ValueError(f"invalid hub {what} {value!r} in {source!r}")
    if colon and not split:  # "hub:owner/name:" with an empty split
        raise ValueError(f"empty split in hub source {source!r}")
    return HubSource(dataset_id=dataset, split=split or None, config=config or None)


# =============================================================================================
# reading the published file formats, with positions for error messages


@dataclass(frozen=True)
class RawRow:
    """One raw record and where it came from (``path:line`` or a hub row), for error messages."""

    data: Mapping[str, Any]
    where: str
    index: int  # 0-based position in the file / hub split


def read_utf8(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 are a :class:`BenchmarkFormatError` naming
    ``path:line`` and the column, like every other format error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise BenchmarkFormatError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def _iter_jsonl(path: Path, text: str | None = None) -> Iterator[RawRow]:
    index = 0
    lines = (read_utf8(path) if text is None else text).split("\n")
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkFormatError(f"{path}:{line_no}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise BenchmarkFormatError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        yield RawRow(obj, f"{path}:{line_no}", index)
        index += 1


def _iter_json_array(path: Path, text: str) -> Iterator[RawRow]:
    """The elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] != "[":
        raise BenchmarkFormatError(f"{path}:1: expected a JSON array or JSON lines")
    line, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    pos = ws.match(text, pos + 1).end()  # type: ignore[union-attr]
    index = 0
    if text[pos : pos + 1] == "]":
        return
    while True:
        start_line = line_at(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise BenchmarkFormatError(f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise BenchmarkFormatError(f"{path}:{start_line}: expected a JSON object, got {type(obj).__name__}")
        yield RawRow(obj, f"{path}:{start_line}", index)
        index += 1
        pos = ws.match(text, end).end()  # type: ignore[union-attr]
        sep = text[pos : pos + 1]
        if sep == "]":
            break
        if sep != ",":
            raise BenchmarkFormatError(f"{path}:{line_at(pos)}: expected ',' or ']' between array elements")
        pos = ws.match(text, pos + 1).end()  # type: ignore[union-attr]


def read_json_records(path: Path) -> Iterator[RawRow]:
    """JSON lines (``.jsonl``) or a JSON array of objects, whichever the file holds."""
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
        return
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        yield from _iter_json_array(path, text)
    else:
        yield from _iter_jsonl(path, text)


def read_csv_records(path: Path, required: Iterable[str] = ()) -> Iterator[RawRow]:
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise BenchmarkFormatError(
                f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})"
            )
        index = 0
        try:
            for row in reader:
                if None in row:  # more fields than the header
                    extra = len(row[None])
                    raise BenchmarkFormatError(
                        f"{path}:{reader.line_num}: {len(header) + extra} fields, the header has {len(header)}"
                    )
                if not any((v or "").strip() for v in row.values()):
                    continue
                yield RawRow(row, f"{path}:{reader.line_num}", index)
                index += 1
        except csv.Error as err:
            raise BenchmarkFormatError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None


# =============================================================================================
# field access helpers


def _field(row: RawRow, *names: str, kind: type | tuple[type, ...] = str, required: bool = True) -> Any:
    """The first present field among ``names``; a clear error when missing or of the wrong type."""
    for name in names:
        if name in row.data and row.data[name] is not None:
            value = row.data[name]
            if not isinstance(value, kind):
                kinds = kind if isinstance(kind, tuple) else (kind,)
                expected = " or ".join(k.__name__ for k in kinds)
                raise BenchmarkFormatError(
                    f"{row.where}: field {name!r} should be {expected}, got {type(value).__name__}"
                )
            if isinstance(value, str) and required and not value.strip():
                raise BenchmarkFormatError(f"{row.where}: field {name!r} is empty")
            return value
    if required:
        raise BenchmarkFormatError(f"{row.where}: missing field {' / '.join(repr(n) for n in names)}")
    return None


def _slug(value: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", value).strip("-").lower()
    return s or "x"


@dataclass(frozen=True)
class _Context:
    benchmark: str
    split: str  # the role: "train" | "eval"
    tag: str  # file stem or hub split, for index-based ids


_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


# =============================================================================================
# per-benchmark row conversion (local rows and hub rows alike)


def _gsm8k(row: RawRow, ctx: _Context) -> ProblemRecord:
    question = _field(row, "question")
    solution = _field(row, "answer")
    if "####" not in solution:
        raise BenchmarkFormatError(f"{row.where}: the 'answer' has no '#### <final answer>' line")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").strip()
    if not gold:
        raise BenchmarkFormatError(f"{row.where}: nothing after '####' in the 'answer'")
    return ProblemRecord(
        problem_id=f"{ctx.benchmark}-{_slug(ctx.tag)}-{row.index:05d}",
        split=ctx.split,
        source=ctx.benchmark,
        question=question.strip(),
        gold_answer=gold,
        gold_solution=solution,
    )


def _math500(row: RawRow, ctx: _Context) -> ProblemRecord:
    question = _field(row, "problem", "question")
    solution = _field(row, "solution", required=False)
    answer = _field(row, "answer", required=False)
    if answer is None or not str(answer).strip():
        boxed = find_boxed(solution or "")
        if not boxed:
            raise BenchmarkFormatError(f"{row.where}: no 'answer' field and no \\boxed{{}} answer in the 'solution'")
        answer = boxed[-1]
    uid = _field(row, "unique_id", required=False)
    pid = (
        f"{ctx.benchmark}-{_slug(uid.removesuffix('.json'))}"
        if uid
        else f"{ctx.benchmark}-{_slug(ctx.tag)}-{row.index:05d}"
    )
    return ProblemRecord(
        problem_id=pid,
        split=ctx.split,
        source=ctx.benchmark,
        question=question.strip(),
        gold_answer=str(answer).strip(),
        gold_solution=solution,
    )


_BOOL_WORDS = {"true": "yes", "yes": "yes", "1": "yes", "false": "no", "no": "no", "0": "no"}


def _strategyqa(row: RawRow, ctx: _Context) -> ProblemRecord:
    question = _field(row, "question")
    answer = _field(row, "answer", kind=(bool, str, int))
    gold = ("yes" if answer else "no") if isinstance(answer, (bool, int)) else _BOOL_WORDS.get(answer.strip().lower())
    if gold is None:
        raise BenchmarkFormatError(f"{row.where}: 'answer' should be true/false, got {answer!r}")
    facts = _field(row, "facts", kind=(list, str), required=False)
    if isinstance(facts, list):
        facts = " ".join(str(f).strip() for f in facts if str(f).strip())
    qid = _field(row, "qid", required=False)
    return ProblemRecord(
        problem_id=f"{ctx.benchmark}-{_slug(qid)}" if qid else f"{ctx.benchmark}-{_slug(ctx.tag)}-{row.index:05d}",
        split=ctx.split,
        source=ctx.benchmark,
        question=question.strip(),
        gold_answer=gold,
        gold_solution=facts or None,
    )


def _commonsenseqa(row: RawRow, ctx: _Context) -> ProblemRecord:
    q = _field(row, "question", kind=(str, dict))
    if isinstance(q, dict):  # the original release: {"stem", "choices": [{"label", "text"}]}
        stem = q.get("stem")
        raw_choices = q.get("choices")
        if not isinstance(stem, str) or not isinstance(raw_choices, list):
            raise BenchmarkFormatError(f"{row.where}: 'question' should have 'stem' and a 'choices' list")
        try:
            labels = [str(c["label"]) for c in raw_choices]
            texts = [str(c["text"]) for c in raw_choices]
        except (KeyError, TypeError):
            raise BenchmarkFormatError(f"{row.where}: each choice needs 'label' and 'text'") from None
    else:  # the hub layout: question string, choices {"label": [...], "text": [...]}
        stem = q
        choices = _field(row, "choices", kind=dict)
        labels, texts = choices.get("label"), choices.get("text")
        if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
            raise BenchmarkFormatError(f"{row.where}: 'choices' should hold equally long 'label' and 'text' lists")
        labels = [str(x) for x in labels]
    if not texts:
        raise BenchmarkFormatError(f"{row.where}: no answer choices")
    key = _field(row, "answerKey", required=False)
    if not key or not key.strip():
        raise BenchmarkFormatError(f"{row.where}: no 'answerKey' (an unlabeled split?)")
    if key.strip() not in labels:
        raise BenchmarkFormatError(f"{row.where}: 'answerKey' {key!r} is not one of the labels {labels}")
    gold = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[labels.index(key.strip())]
    rid = _field(row, "id", required=False)
    return ProblemRecord(
        problem_id=f"{ctx.benchmark}-{_slug(rid)}" if rid else f"{ctx.benchmark}-{_slug(ctx.tag)}-{row.index:05d}",
        split=ctx.split,
        source=ctx.benchmark,
        question=format_choice_question(stem, texts),
        gold_answer=gold,
        gold_solution=None,
    )


def _split_answers(value: Any) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(";")
    return [" ".join(str(x).split()) for x in items if str(x).strip()]


def question_rng(question: str, salt: str = "") -> random.Random:
    """An RNG seeded by the question text (stable across runs, platforms and processes)."""
    digest = hashlib.sha256((salt + "\x00" + question).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _truthfulqa(row: RawRow, ctx: _Context) -> ProblemRecord:
    question = _field(row, "Question", "question")
    best = " ".join(_field(row, "Best Answer", "best_answer").split())
    incorrect = _split_answers(_field(row, "Incorrect Answers", "incorrect_answers", kind=(str, list)))
    distractors: list[str] = []
    for d in incorrect:  # unique, and never the correct answer itself
        if d.lower() != best.lower() and d.lower() not in (x.lower() for x in distractors):
            distractors.append(d)
    if not distractors:
        raise BenchmarkFormatError(f"{row.where}: no 'Incorrect Answers' to use as distractors")
    options = [best, *distractors]
    question_rng(question.strip(), "truthfulqa-mc").shuffle(options)
    return ProblemRecord(
        problem_id=f"{ctx.benchmark}-{row.index:05d}",
        split=ctx.split,
        source=ctx.benchmark,
        question=format_choice_question(question, options),
        gold_answer="ABCDEFGHIJKLMNOPQRSTUVWXYZ"[options.index(best)],
        gold_solution=None,
    )


def _read_truthfulqa_csv(path: Path) -> Iterator[RawRow]:
    return read_csv_records(path, required=("Question", "Best Answer", "Incorrect Answers"))


# =============================================================================================
# the registry


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how to read its published file and hub copy, and how its answers look."""

    name: str
    answer_type: AnswerType
    default_file: str  # file name of the published release
    hub_id: str
    hub_splits: Mapping[str, str]  # role ("train" / "eval") -> hub split
    description: str
    convert: Callable[[RawRow, _Context], ProblemRecord] = field(repr=False)
    read_file: Callable[[Path], Iterator[RawRow]] = field(default=read_json_records, repr=False)
    hub_config: str | None = None
    numeric_answer: bool = False  # the answer is a number: extraction accepts only numbers
    family: str = ""  # its prompt family (a key of rscaffold.prompts.FAMILY_TEMPLATES)
    license: str | None = None  # the license of its published release (a dataset card's license id)

    # -- prompts ---------------------------------------------------------------------------
    @property
    def prompt_family(self) -> str:
        """What a student records as the prompt it was trained with (``prompt_benchmark``): the
        benchmark's name (:func:`prompt_family_of` reads it back as its family)."""
        return self.name

    @property
    def prompt_template(self) -> str:
        """The benchmark family's prompt template (:func:`rscaffold.prompts.benchmark_template`)."""
        return benchmark_template(self.family)

    def render_prompt(self, question: str) -> str:
        """The prompt for one question (:func:`rscaffold.prompts.benchmark_prompt`)."""
        return benchmark_prompt(self.family, question)

    # -- local files -----------------------------------------------------------------------
    def resolve_path(self, source: str | Path) -> Path:
        """A file path, or a directory holding :attr:`default_file` (directly or under ``<name>/``)."""
        path = Path(source).expanduser()
        if path.is_dir():
            for candidate in (path / self.default_file, path / self.name / self.default_file):
                if candidate.is_file():
                    return candidate
            raise BenchmarkNotFoundError(
                f"{self.name}: no {self.default_file} in directory {path} (nor in {path / self.name})"
            )
        if not path.is_file():
            raise BenchmarkNotFoundError(f"{self.name}: problem file not found: {path}")
        return path

    def load_file(self, source: str | Path, split: str = "eval") -> list[ProblemRecord]:
        path = self.resolve_path(source)
        ctx = _Context(self.name, split, path.stem)
        rows = list(self.read_file(path))
        records = _check_unique([self.convert(row, ctx) for row in rows], str(path))
        self.check_rows(rows, str(path))
        return records

    def check_rows(self, rows: list[RawRow], where: str) -> None:
        """Warnings about rows that load but look wrong (a user's field mapping); none here."""

    # -- the hub ---------------------------------------------------------------------------
    def hub_request(self, hub: HubSource, split: str = "eval") -> tuple[str, str | None, str]:
        """(dataset id, config, hub split) that :meth:`load_hub` asks ``datasets`` for."""
        config = hub.config if hub.config is not None else (self.hub_config if hub.dataset_id == self.hub_id else None)
        hub_split = hub.split or self.hub_splits.get(split) or self.hub_splits.get("eval") or "test"
        return hub.dataset_id, config, hub_split

    def load_hub(self, hub: HubSource, split: str = "eval") -> list[ProblemRecord]:
        """Rows of a hub dataset (needs network access to the Hugging Face hub)."""
        import datasets  # deferred: heavy, and only needed online

        dataset_id, config, hub_split = self.hub_request(hub, split)
        ds = datasets.load_dataset(dataset_id, config, split=hub_split)
        label = str(HubSource(dataset_id, hub_split, config))
        ctx = _Context(self.name, split, hub_split)
        rows = [RawRow(dict(r), f"{label} row {i}", i) for i, r in enumerate(ds)]
        records = _check_unique([self.convert(row, ctx) for row in rows], label)
        self.check_rows(rows, label)
        return records

    # -- either ----------------------------------------------------------------------------
    def load(
        self,
        source: str | Path,
        split: str = "eval",
        limit: int | None = None,
        *,
        seed: int = 0,
        part: Part = "all",
        heldout_fraction: float = 0.2,
    ) -> list[ProblemRecord]:
        """All rows of a local file or hub source, then the ``part``, then a seeded ``limit``."""
        if is_hub_source(source):
            records = self.load_hub(parse_hub_source(str(source)), split)
        else:
            records = self.load_file(source, split)
        records = select_part(records, part, heldout_fraction, seed=seed)
        return subsample(records, limit, seed)


def _check_unique(records: list[ProblemRecord], where: str) -> list[ProblemRecord]:
    seen: set[str] = set()
    for r in records:
        if r.problem_id in seen:
            raise BenchmarkFormatError(f"{where}: duplicate problem id {r.problem_id!r}")
        seen.add(r.problem_id)
    if not records:
        raise BenchmarkFormatError(f"{where}: no problems")
    return records


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="gsm8k",
            answer_type="math",
            default_file="test.jsonl",
            hub_id="openai/gsm8k",
            hub_config="main",
            hub_splits={"train": "train", "eval": "test"},
            description="GSM8K grade-school math word problems (Cobbe et al., 2021)",
            convert=_gsm8k,
            numeric_answer=True,
            family="math",
            license="mit",
        ),
        Benchmark(
            name="math500",
            answer_type="math",
            default_file="test.jsonl",
            hub_id="HuggingFaceH4/MATH-500",
            hub_splits={"eval": "test"},
            description="MATH-500, the 500-problem MATH test subset of PRM800K (Lightman et al., 2023)",
            convert=_math500,
            family="math_latex",
            license="mit",
        ),
        Benchmark(
            name="strategyqa",
            answer_type="yesno",
            default_file="strategyqa_train.json",
            hub_id="ChilleD/StrategyQA",
            hub_splits={"train": "train", "eval": "test"},
            description="StrategyQA implicit multi-hop yes/no questions (Geva et al., 2021)",
            convert=_strategyqa,
            family="yesno",
            license="mit",
        ),
        Benchmark(
            name="commonsenseqa",
            answer_type="choice",
            default_file="dev_rand_split.jsonl",
            hub_id="tau/commonsense_qa",
            hub_splits={"train": "train", "eval": "validation"},
            description="CommonsenseQA five-way multiple choice (Talmor et al., 2019)",
            convert=_commonsenseqa,
            family="choice",
            license="mit",
        ),
        Benchmark(
            name="truthfulqa",
            answer_type="choice",
            default_file="TruthfulQA.csv",
            hub_id="truthfulqa/truthful_qa",
            hub_config="generation",
            hub_splits={"eval": "validation"},
            description="TruthfulQA as multiple choice: best answer against the incorrect answers (Lin et al., 2022)",
            convert=_truthfulqa,
            read_file=_read_truthfulqa_csv,
            family="choice",
            license="apache-2.0",
        ),
    )
}


# One vocabulary: the registry holds exactly the benchmark names of rscaffold.vocabulary, in order.
assert tuple(BENCHMARKS) == BENCHMARK_NAMES, tuple(BENCHMARKS)
assert all(b.family in FAMILY_TEMPLATES for b in BENCHMARKS.values()), "every benchmark names a prompt family"


def prompt_family_of(name: str) -> str:
    """The prompt family of a benchmark name (a family name is its own family): what a student's
    recorded ``prompt_benchmark`` selects."""
    bench = BENCHMARKS.get(name)
    return bench.family if bench is not None else name


# =============================================================================================
# a user's own problems: the generic, field-mapped format


# custom answer type -> (answer checker type, prompt family: rscaffold.prompts.FAMILY_TEMPLATES)
CUSTOM_ANSWER_TYPES: dict[str, tuple[AnswerType, str]] = {
    "number": ("math", "math"),
    "math": ("math", "math_latex"),
    "yesno": ("yesno", "yesno"),
    "choice": ("choice", "choice"),
    "text": ("text", "text"),
}
CUSTOM_FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MISSING = object()


def read_parquet_records(path: Path) -> Iterator[RawRow]:
    """The rows of a Parquet file, as dicts, with their 1-based row number for error messages."""
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield RawRow(row, f"{path}: row {index + 1}", index)
            index += 1


def read_custom_file(path: Path) -> Iterator[RawRow]:
    """JSON lines, a JSON array, CSV or Parquet, by the file's suffix."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_json_records(path)
    if suffix == ".csv":
        return read_csv_records(path)
    if suffix == ".parquet":
        return read_parquet_records(path)
    raise BenchmarkFormatError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(CUSTOM_FILE_TYPES)}")


def _at(row: RawRow) -> str:
    """Where a row is: ``file:line (row N)``, ``file: row N`` or the hub row."""
    return row.where if "row" in row.where else f"{row.where} (row {row.index + 1})"


def _lookup(data: Mapping[str, Any], name: str) -> Any:
    """A row's field by name, or a nested field by ``a.b`` (the plain name wins)."""
    if name in data:
        return data[name]
    if "." in name:
        node: Any = data
        for part in name.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _MISSING
            node = node[part]
        return node
    return _MISSING


def _custom_field(row: RawRow, name: str, role: str, *, required: bool = True) -> Any:
    value = _lookup(row.data, name)
    if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return None
        what = "missing field" if value is _MISSING else "empty field"
        keys = ", ".join(repr(k) for k in list(row.data)[:20])
        raise BenchmarkFormatError(f"{_at(row)}: {what} {name!r} (fields.{role}); the row has {keys}")
    return value


def _custom_text(row: RawRow, name: str, role: str, *, required: bool = True) -> str | None:
    value = _custom_field(row, name, role, required=required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BenchmarkFormatError(
            f"{_at(row)}: field {name!r} (fields.{role}) should be text, got {type(value).__name__}"
        )
    return str(value).strip()


def _number_answer(row: RawRow, name: str, value: Any) -> str:
    if isinstance(value, bool):
        raise BenchmarkFormatError(f"{_at(row)}: field {name!r} (fields.answer) should be a number, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    plain = text.replace(",", "").replace("$", "").removesuffix("%").strip()
    try:
        Fraction(plain)
    except (ValueError, ZeroDivisionError):
        raise BenchmarkFormatError(
            f"{_at(row)}: field {name!r} (fields.answer) should be a number for answer_type 'number', got {text!r}"
        ) from None
    return plain


def _choice_options(row: RawRow, spec: CustomFormat) -> list[str]:
    fields = spec.fields.options
    if isinstance(fields, list):  # one field per option; empty trailing ones are dropped
        values = [_lookup(row.data, f) for f in fields]
        for f, v in zip(fields, values):
            if v is _MISSING:
                raise BenchmarkFormatError(f"{_at(row)}: missing option field {f!r} (fields.options)")
        options = [("" if v is None else " ".join(str(v).split())) for v in values]
        while options and not options[-1]:
            options.pop()
        if "" in options:
            empty = fields[options.index("")]
            raise BenchmarkFormatError(f"{_at(row)}: option field {empty!r} is empty but a later option is not")
    else:
        assert fields is not None  # CustomFormat requires options for 'choice'
        value = _custom_field(row, fields, "options")
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, Mapping) and isinstance(value.get("text"), list):  # {"label": [...], "text": [...]}
            value = value["text"]
        if not isinstance(value, list):
            raise BenchmarkFormatError(
                f"{_at(row)}: field {fields!r} (fields.options) should be a list of options, got {type(value).__name__}"
            )
        options = [" ".join(str(v).split()) for v in value]
    if len(options) < 2 or not all(options):
        raise BenchmarkFormatError(f"{_at(row)}: a multiple-choice question needs at least two non-empty options")
    if len(options) > len(_LETTERS):
        raise BenchmarkFormatError(f"{_at(row)}: at most {len(_LETTERS)} options are supported, got {len(options)}")
    return options


def _choice_answer(row: RawRow, name: str, value: Any, *, options: list[str]) -> str:
    letters = _LETTERS[: len(options)]
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(options):
            return letters[value]
        raise BenchmarkFormatError(
            f"{_at(row)}: field {name!r} (fields.answer) is index {value}, but there are {len(options)} options"
        )
    text = " ".join(str(value).split())
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    lowered = [o.lower() for o in options]
    if text.lower() in lowered:
        return letters[lowered.index(text.lower())]
    raise BenchmarkFormatError(
        f"{_at(row)}: field {name!r} (fields.answer) = {text!r} is neither an option letter ({letters[0]}-{letters[-1]}), "
        "the text of an option, nor a 0-based index"
    )


def template_fields(template: str) -> list[str]:
    """The field names a ``question_template`` uses, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _custom_question(row: RawRow, f: Any) -> str:
    """The question of a row: one field, or ``question_template`` filled with several (each field's
    text stripped; str.format's ``{{``/``}}`` escapes; ``a.b`` reaches a nested field)."""
    if f.question_template is None:
        return _custom_text(row, f.question, "question")  # type: ignore[return-value]
    parts = []
    for literal, name, _, _ in string.Formatter().parse(f.question_template):
        parts.append(literal)
        if name is not None:
            parts.append(_custom_text(row, name, "question_template"))
    return "".join(parts).strip()


def _convert_custom(spec: CustomFormat, row: RawRow, ctx: _Context) -> ProblemRecord:
    f = spec.fields
    question = _custom_question(row, f)
    raw = _custom_field(row, f.answer, "answer")
    kind = spec.answer_type
    if kind == "number":
        gold = _number_answer(row, f.answer, raw)
    elif kind == "yesno":
        word = ("yes" if raw else "no") if isinstance(raw, (bool, int)) else _BOOL_WORDS.get(str(raw).strip().lower())
        if word is None:
            raise BenchmarkFormatError(
                f"{_at(row)}: field {f.answer!r} (fields.answer) should be yes/no or true/false, got {raw!r}"
            )
        gold = word
    elif kind == "choice":
        options = _choice_options(row, spec)
        gold = _choice_answer(row, f.answer, raw, options=options)
        question = format_choice_question(question, options)
    else:  # math, text
        gold = _custom_text(row, f.answer, "answer")
    solution = _custom_text(row, f.solution, "solution", required=False) if f.solution else None
    own_id = _custom_text(row, f.id, "id") if f.id else None
    if own_id is not None:
        pid = f"{ctx.benchmark}-{_slug(own_id)}"
    else:
        pid = f"{ctx.benchmark}-{_slug(ctx.tag)}-{row.index:05d}"
    return ProblemRecord(
        problem_id=pid,
        split=ctx.split,
        source=ctx.benchmark,
        question=question,
        gold_answer=gold,
        gold_solution=solution,
        source_id=own_id,
    )


FRAGMENT_SHARE = 0.5
"""A mapped question field looks like a fragment when more than this share of rows do not end
with a question mark (or colon) and the rows have another text field."""
_QUESTION_END = re.compile(r"[?:][\s\"'\u201d)\]]*$")


def _text_fields(rows: list[RawRow], skip: set[str]) -> dict[str, float]:
    """Top-level fields (not in ``skip``) holding text of 3 words or more in most rows, with their
    mean length in characters."""
    out: dict[str, float] = {}
    keys = {k for r in rows for k in r.data} - skip
    for key in sorted(keys):
        texts = [v for r in rows if isinstance(v := r.data.get(key), str) and len(v.split()) >= 3]
        if len(texts) > len(rows) / 2:
            out[key] = sum(len(t) for t in texts) / len(texts)
    return out


def question_fragment_warnings(spec: CustomFormat, rows: list[RawRow], where: str) -> list[str]:
    """Signs that ``fields.question`` holds only part of each problem (SVAMP-style ``Body`` +
    ``Question``, a passage beside its question): most rows do not end with a question mark while
    another text field exists, or another text field is longer than the question. Empty with a
    ``question_template`` (the mapping then names every part)."""
    f = spec.fields
    if f.question_template is not None or not rows:
        return []
    options = [f.options] if isinstance(f.options, str) else list(f.options or [])
    skip = {f.question, f.answer, *(x for x in (f.solution, f.id) if x), *options}
    questions = [v.strip() for r in rows if isinstance(v := _lookup(r.data, f.question), str)]
    others = _text_fields(rows, skip)
    if not questions or not others:
        return []
    out = []
    hint = "if a problem is split over fields, build it with fields.question_template, e.g. "
    open_share = sum(not _QUESTION_END.search(q) for q in questions) / len(questions)
    if open_share > FRAGMENT_SHARE:
        other = next(iter(others))
        out.append(
            f"{where}: {open_share:.0%} of the questions (field {f.question!r}) do not end with a question mark while "
            f"the rows also have text in {', '.join(repr(k) for k in others)}; {hint}'{{{f.question}}} {{{other}}}'"
        )
    mean_q = sum(len(q) for q in questions) / len(questions)
    longer = [k for k, n in others.items() if n > mean_q]
    if longer and not out:
        out.append(
            f"{where}: field {longer[0]!r} holds longer text than the questions (field {f.question!r}, "
            f"{mean_q:.0f} characters on average): is it the problem's body or context? "
            f"{hint}'{{{longer[0]}}} {{{f.question}}}'"
        )
    return out


@dataclass(frozen=True)
class CustomBenchmark(Benchmark):
    """A user's own problem set (``format: custom``): one file (or hub dataset) read through a field mapping."""

    spec: CustomFormat | None = field(default=None, repr=False)

    def check_rows(self, rows: list[RawRow], where: str) -> None:
        """Warn when the mapped question looks like a fragment (:func:`question_fragment_warnings`)."""
        if self.spec is not None:
            for warning in question_fragment_warnings(self.spec, rows, where):
                log.warning("%s", warning)

    @property
    def prompt_family(self) -> str:
        """A student trained on a user's own problems records their prompt family."""
        return self.family

    def resolve_path(self, source: str | Path) -> Path:
        path = Path(source).expanduser()
        if path.is_dir():
            raise BenchmarkNotFoundError(
                f"{self.name}: {path} is a directory; give the problem file ({', '.join(CUSTOM_FILE_TYPES)})"
            )
        if not path.is_file():
            raise BenchmarkNotFoundError(f"{self.name}: problem file not found: {path}")
        return path


def custom_benchmark(spec: CustomFormat) -> Benchmark:
    """The :class:`Benchmark` of a user's own problems (``problems.custom`` / ``evaluation.benchmarks[].custom``)."""
    answer_type, family = CUSTOM_ANSWER_TYPES[spec.answer_type]
    return CustomBenchmark(
        name=spec.name,
        answer_type=answer_type,
        default_file="",
        hub_id="",
        hub_splits={"train": "train", "eval": "test"},
        family=family,
        numeric_answer=spec.answer_type == "number",
        description=f"your own problems ({spec.answer_type} answers)",
        convert=lambda row, ctx: _convert_custom(spec, row, ctx),
        read_file=read_custom_file,
        spec=spec,
    )


def benchmark_for(fmt: str, custom: CustomFormat | None = None) -> Benchmark:
    """The benchmark of a format name: one of :data:`BENCHMARKS`, or ``"custom"`` with its spec."""
    if fmt == CUSTOM_FORMAT:
        if custom is None:
            raise ValueError("format 'custom' needs its spec (answer_type and fields)")
        return custom_benchmark(custom)
    return get_benchmark(fmt)


def problem_benchmarks(problems: Any) -> dict[str, Benchmark]:
    """The :class:`Benchmark` of each problem ``source`` (its name) of a
    :class:`~rscaffold.config.ProblemsConfig`: the single benchmark's, or every one of its mix."""
    return {s.label: benchmark_for(s.format, s.custom) for s in problems.sources()}


def prompt_families(problems: Any) -> str | dict[str, str]:
    """The prompt family the students are trained on, for a :class:`~rscaffold.config.ProblemsConfig`:
    one family name, or for a mix (``problems.mix``) the family of each problem source
    (``ExampleRecord.source``)."""
    benches = problem_benchmarks(problems)
    if not problems.mix:
        return next(iter(benches.values())).prompt_family
    return {name: b.prompt_family for name, b in benches.items()}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


def benchmark_for_record(record: ProblemRecord) -> Benchmark:
    """The benchmark a loaded problem came from (its ``source``)."""
    return get_benchmark(record.source)


# =============================================================================================
# selection


def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select_part(
    records: list[ProblemRecord], part: Part = "all", heldout_fraction: float = 0.2, *, seed: int = 0
) -> list[ProblemRecord]:
    """Disjoint ``"train"`` / ``"heldout"`` parts of one file: the ``round(heldout_fraction * n)``
    problems with the smallest seeded hash of their id are held out (independent of file order and
    of ``limit``); ``"all"`` keeps everything."""
    if part == "all":
        return records
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'all', 'train' or 'heldout', got {part!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    ranked = sorted(records, key=lambda r: (_unit_hash(f"{seed}:{r.problem_id}"), r.problem_id))
    heldout = {r.problem_id for r in ranked[: round(heldout_fraction * len(records))]}
    want_heldout = part == "heldout"
    return [r for r in records if (r.problem_id in heldout) == want_heldout]


def subsample(records: list[ProblemRecord], limit: int | None, seed: int = 0) -> list[ProblemRecord]:
    """A seeded subsample of ``limit`` records in their original order (all when ``limit`` is
    ``None`` or not smaller than the count). Nested: a smaller limit gives a subset."""
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:limit])]


def load_problems(
    source: str | Path,
    benchmark: str | Benchmark = "gsm8k",
    split: str = "eval",
    *,
    limit: int | None = None,
    seed: int = 0,
    part: Part = "all",
    heldout_fraction: float = 0.2,
) -> list[ProblemRecord]:
    """Load one benchmark's problems from a local file (or a directory holding the default file)
    or from ``hub:<dataset id>[@<config>][:<split>]``.

    ``split`` is the role recorded on every row (``"train"`` / ``"eval"``); for a hub source without
    an explicit split it also picks the hub split (e.g. GSM8K: train -> ``train``, eval -> ``test``).
    ``benchmark``: a name of :data:`BENCHMARKS`, or a :class:`Benchmark` (e.g. :func:`custom_benchmark`).
    Raises :class:`BenchmarkNotFoundError` for a missing file and :class:`BenchmarkFormatError`
    (``path:line: ...``) for a malformed record.
    """
    bench = benchmark if isinstance(benchmark, Benchmark) else get_benchmark(benchmark)
    return bench.load(source, split, limit, seed=seed, part=part, heldout_fraction=heldout_fraction)


def benchmark_source_digest(source: Any) -> str:
    """What identifies a :class:`~rscaffold.config.BenchmarkSource`'s data in a fingerprint: the
    content digest of the resolved local file, or the hub string. A missing file raises
    :class:`BenchmarkNotFoundError`."""
    from rscaffold.store import file_digest

    if is_hub_source(source.source):
        return source.source
    return file_digest(benchmark_for(source.name, source.custom).resolve_path(source.source))
