"""Export a dataset stage's output as a Hugging Face dataset, and push it to the Hub.

:func:`export_dataset` turns ``<artifacts>/dataset/<fingerprint>/`` into a folder that
``datasets.load_dataset(folder)`` (and the Hub) understands:

* ``data/train-00000-of-00001.parquet`` and ``data/validation-00000-of-00001.parquet``: the
  splits as separate splits (no ``split`` column), written by ``datasets``;
* ready-to-train columns: ``messages`` (chat format: the student's system prompt, the question,
  and the answer in the scaffolded form, each step preceded by its signal token) and
  ``messages_plain`` (the same answer without signal tokens, for plain CoT-SFT), beside the
  structured ``steps`` (index, signal, text, label source), ``signals``, ``n_steps`` and the
  question, gold answer and teacher answer;
* ``README.md``: the dataset card, a YAML header (license of the sources, task categories, size,
  source datasets, the split files and features) and a body with the taxonomy and its signal
  tokens, the teacher and labeler models, counts, labeling quality figures and how it was made,
  read from the manifests of the stages that made it.

:func:`push_to_hub` uploads such a folder to a dataset repository (``huggingface_hub``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rscaffold.evalsets.loaders import prompt_family_of
from rscaffold.labeling.taxonomy import Taxonomy, load_taxonomy
from rscaffold.paths import data_dir
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, student_user_message
from rscaffold.store import MANIFEST, StageDir, is_published_name, published_dirs
from rscaffold.student_format import family_of
from rscaffold.vocabulary import CUSTOM_FORMAT, STEP_SEPARATOR

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportResult", "Provenance", "export_dataset", "find_dataset_dir", "push_to_hub"]

PAPER = "https://arxiv.org/abs/2509.23619"
DATA_DIR = "data"
CARD = "README.md"
BUILT_IN_LICENSE = "apache-2.0"  # rscaffold's own built-in problem set (data/problems)
TASK_CATEGORIES = ["text-generation", "question-answering"]
TAGS = ["reasoning", "chain-of-thought", "distillation", "reasoning-scaffolding", "rscaffold", "synthetic"]


class ExportError(ValueError):
    """A dataset directory that cannot be exported, or an output folder that is in the way."""


# ---------------------------------------------------------------------------------------------
# where the dataset is, and what made it


def find_dataset_dir(path: str | Path) -> Path:
    """The dataset stage directory ``path`` means: one itself (its manifest says ``dataset``), or
    the newest published one under ``path`` or ``path/dataset`` (an artifacts root). Only a
    published output is exported (never a ``<fingerprint>.partial`` work directory or a
    ``<fingerprint>.damaged-<time>`` one set aside), and only when it verifies against its
    manifest as the pipeline checks it before reuse; anything else is an :class:`ExportError`."""
    path = Path(path).expanduser().resolve()
    manifest = _read_json(path / MANIFEST)
    if manifest is not None:
        if manifest.get("stage") != "dataset":
            raise ExportError(f"{path} is the output of the {manifest.get('stage')!r} stage, not of 'dataset'")
        if not is_published_name(path.name) or manifest.get("fingerprint") != path.name:
            raise ExportError(
                f"{path} is not a published dataset (a work directory or one set aside as damaged); "
                f"export {path.parent / str(manifest.get('fingerprint'))} or re-run the pipeline"
            )
        return _verified(path)
    if not path.is_dir():
        raise ExportError(f"no such directory: {path}")
    for root in (path, path.parent) if path.name == "dataset" else (path,):
        found = [
            (m.get("finished_at", 0), sd.path)
            for sd in published_dirs(root, "dataset")
            if (m := _read_json(sd.manifest_path)) and m.get("stage") == "dataset"
        ]
        if found:
            return _verified(max(found)[1])
    raise ExportError(f"{path}: not a complete dataset stage directory, and none under it or under {path / 'dataset'}")


def _verified(path: Path) -> Path:
    problems = StageDir.at(path).verify()
    if problems:
        raise ExportError(
            f"{path} is damaged and is not exported: "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + " (a re-run of the pipeline sets it aside and rebuilds it)"
        )
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Provenance:
    """What made a dataset, read from the manifests of its stage and the stages before it (any of
    which may be missing when a dataset directory was copied on its own: then that part is empty)."""

    dataset: dict[str, Any]
    labeling: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, dataset_dir: Path) -> Provenance:
        dataset = _read_json(dataset_dir / MANIFEST) or {}
        root = dataset_dir.parent.parent

        def upstream(manifest: dict[str, Any], stage: str) -> dict[str, Any]:
            fp = manifest.get("inputs", {}).get(stage)
            return (_read_json(StageDir(root, stage, fp).manifest_path) or {}) if fp else {}

        labeling = upstream(dataset, "labeling")
        teacher = upstream(dataset, "teacher")
        problems = upstream(teacher, "problems")
        quality = {}
        if labeling.get("outputs", {}).get("quality"):
            quality = (
                _read_json(StageDir(root, "labeling", labeling["fingerprint"]).path / labeling["outputs"]["quality"])
                or {}
            )
        return cls(dataset=dataset, labeling=labeling, teacher=teacher, problems=problems, quality=quality)

    # -- what the card shows -------------------------------------------------------------------
    @property
    def problem_format(self) -> str | None:
        return self.problems.get("config", {}).get("format")

    @property
    def problem_set(self) -> str | None:
        """The benchmark name, or the custom set's name."""
        cfg = self.problems.get("config", {})
        if cfg.get("format") == CUSTOM_FORMAT:
            return (cfg.get("custom") or {}).get("name", CUSTOM_FORMAT)
        return cfg.get("format")

    @property
    def built_in_problems(self) -> bool:
        train = self.problems.get("config", {}).get("train", "")
        return bool(train) and Path(train).resolve().parent == (data_dir() / "problems").resolve()

    def license(self) -> str | None:
        if self.built_in_problems:
            return BUILT_IN_LICENSE
        from rscaffold.evalsets.loaders import BENCHMARKS

        bench = BENCHMARKS.get(self.problem_format or "")
        return bench.license if bench is not None else None  # a benchmark's license is on its registry entry

    def source_datasets(self) -> list[str]:
        from rscaffold.evalsets.loaders import BENCHMARKS

        fmt = self.problem_format
        return [BENCHMARKS[fmt].hub_id] if fmt in BENCHMARKS and not self.built_in_problems else []

    def prompt_family(self) -> str | dict[str, str] | None:
        """The benchmark family whose prompt the students are trained on (the training stage's
        ``prompt_families(problems)``: for a mix of benchmarks, the family of each problem source);
        None when the problems stage's manifest is missing."""
        from rscaffold.config import CustomFormat, ProblemsConfig
        from rscaffold.evalsets.loaders import benchmark_for, prompt_families

        cfg = self.problems.get("config") or {}
        if cfg.get("mix"):
            return prompt_families(ProblemsConfig.model_validate({"mix": cfg["mix"]}))
        if not cfg.get("format"):
            return None
        custom = cfg.get("custom")
        return benchmark_for(cfg["format"], CustomFormat(**custom) if custom else None).prompt_family

    def degenerate_labeling(self) -> list[str]:
        """The labeling quality gate's reasons to call the labels degenerate (empty: it did not)."""
        return list((self.labeling.get("summary") or {}).get("degenerate_labeling") or [])

    def teacher_model(self) -> str:
        return _model_name(self.teacher.get("config", {}).get("llm", {}))

    def labeler_model(self) -> str:
        cfg = self.labeling.get("config", {})
        if not cfg:
            return "unknown"
        if (cfg.get("labeling") or {}).get("method") == "keyword":
            return "none (keyword pre-labels only)"
        return _model_name(cfg.get("labeler") or {})


def _model_name(llm: dict[str, Any]) -> str:
    """A model as the card names it: a hub id or served name as is, a local directory by its name
    (the card never shows local paths)."""
    model = llm.get("model")
    if not model:
        return "unknown"
    name = Path(model).name + " (local directory)" if model.startswith(("/", ".", "~")) else model
    revision = f" @ {llm['revision']}" if llm.get("revision") else ""
    return f"{name}{revision} via {llm.get('backend', '?')}"


# ---------------------------------------------------------------------------------------------
# the rows


def chat_columns(
    examples: pl.DataFrame,
    taxonomy: Taxonomy,
    system_prompt: str = STUDENT_SYSTEM_PROMPT,
    *,
    benchmark: str | Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """``examples`` (ExampleRecord columns) with ``messages`` (the scaffolded answer: each step
    preceded by its signal token) and ``messages_plain`` (the plain answer), both in chat format
    (system, user, assistant) in the student's training format (:mod:`rscaffold.prompts`); and the
    same split into ``prompt`` (system, user) and ``completion`` / ``completion_plain``
    (assistant), the prompt-completion form. ``benchmark``: the user turn is that benchmark
    family's prompt (:func:`rscaffold.prompts.student_user_message`, what the students are
    trained on), or for a mix of benchmarks a map of each example's ``source`` to its family;
    None: the bare question."""
    unknown = set(examples.get_column("signals").explode().drop_nulls().unique().to_list()) - set(taxonomy.names)
    if unknown:
        raise ExportError(f"signals not in the dataset's taxonomy: {sorted(unknown)}")
    tokens = dict(zip(taxonomy.names, taxonomy.tokens))
    step = pl.element().struct
    scaffolded = (
        pl.col("steps")
        .list.eval(step.field("signal").replace_strict(tokens, return_dtype=pl.String) + step.field("text"))
        .list.join(STEP_SEPARATOR)
    )
    plain = pl.col("steps").list.eval(step.field("text")).list.join(STEP_SEPARATOR)

    user = pl.col("question")
    if isinstance(benchmark, Mapping):
        user = pl.struct("question", "source").map_elements(
            lambda r: student_user_message(r["question"], family_of(benchmark, r["source"])), return_dtype=pl.String
        )
    elif benchmark is not None:
        user = user.map_elements(lambda q: student_user_message(q, family_of(benchmark, None)), return_dtype=pl.String)
    system_turn = pl.struct(role=pl.lit("system"), content=pl.lit(system_prompt))
    user_turn = pl.struct(role=pl.lit("user"), content=user)

    def assistant(answer: pl.Expr) -> pl.Expr:
        return pl.concat_list(pl.struct(role=pl.lit("assistant"), content=answer))

    return examples.with_columns(
        messages=pl.concat_list(system_turn, user_turn, assistant(scaffolded)),
        messages_plain=pl.concat_list(system_turn, user_turn, assistant(plain)),
        prompt=pl.concat_list(system_turn, user_turn),
        completion=assistant(scaffolded),
        completion_plain=assistant(plain),
    )


def _plain(t: pa.DataType) -> pa.DataType:
    """Arrow's ``string`` and ``list`` for polars' ``large_string`` and ``large_list`` (the features
    the Hub shows are then ``string`` and lists, as for any other dataset)."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_plain(t.field(i).type)) for i in range(t.num_fields)])
    return t


EXPORT_COLUMNS = (
    "problem_id",
    "source_id",
    "trace_id",
    "question",
    "gold_answer",
    "teacher_answer",
    "correct",
    "messages",
    "messages_plain",
    "prompt",
    "completion",
    "completion_plain",
    "steps",
    "signals",
    "n_steps",
)


# ---------------------------------------------------------------------------------------------
# the export


@dataclass
class ExportResult:
    out_dir: Path
    splits: dict[str, int]
    card: Path
    dataset_dir: Path


def export_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    license: str | None = None,
    pretty_name: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the dataset of a dataset stage directory as a Hugging Face dataset folder (module
    docstring). ``license``: the card's license (default: that of the problems' source, ``other``
    when unknown, e.g. for a custom set). An existing, non-empty ``out_dir`` is refused unless
    ``overwrite`` (then its ``data/`` and ``README.md`` are replaced)."""
    import datasets

    dataset_dir = find_dataset_dir(dataset_dir)
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (use --overwrite to replace its data/ and README.md)")
    prov = Provenance.read(dataset_dir)
    outputs = prov.dataset.get("outputs") or {}
    examples_path = dataset_dir / outputs.get("examples", "examples.parquet")
    taxonomy_path = dataset_dir / outputs.get("taxonomy", "taxonomy.yaml")
    for p in (examples_path, taxonomy_path):
        if not p.is_file():
            raise ExportError(f"{dataset_dir}: missing {p.name}")
    taxonomy = load_taxonomy(taxonomy_path)
    examples = pl.read_parquet(examples_path)
    if "source_id" not in examples.columns:  # a dataset made before the user's own ids were kept
        examples = examples.with_columns(pl.lit(None, pl.String).alias("source_id"))
    examples = chat_columns(examples, taxonomy, benchmark=prov.prompt_family())
    record_metadata = {
        k: v for k, v in (pq.read_schema(examples_path).metadata or {}).items() if k.startswith(b"rscaffold.")
    }

    splits: dict[str, datasets.Dataset] = {}
    for split in ("train", "validation"):
        part = examples.filter(pl.col("split") == split).select(EXPORT_COLUMNS)
        if part.height:
            table = part.to_arrow()
            splits[split] = datasets.Dataset(table.cast(pa.schema([f.with_type(_plain(f.type)) for f in table.schema])))
    if "train" not in splits:
        raise ExportError(f"{examples_path}: no training rows")
    dsd = datasets.DatasetDict(splits)

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / DATA_DIR, ignore_errors=True)
    for split, ds in dsd.items():
        path = out_dir / DATA_DIR / f"{split}-00000-of-00001.parquet"
        ds.to_parquet(str(path))
        _add_metadata(path, record_metadata)
    card = dataset_card(dsd, prov, taxonomy, license=license or prov.license() or "other", pretty_name=pretty_name)
    card.save(out_dir / CARD)
    log.info("exported %s to %s (%s)", dataset_dir, out_dir, {k: len(v) for k, v in dsd.items()})
    return ExportResult(out_dir, {k: len(v) for k, v in dsd.items()}, out_dir / CARD, dataset_dir)


def _add_metadata(path: Path, metadata: dict[bytes, bytes]) -> None:
    """Add the source file's record metadata (``rscaffold.record``, ``rscaffold.schema_version``)
    to a Parquet file ``datasets`` wrote (it keeps only its own ``huggingface`` features key)."""
    if not metadata:
        return
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), path)


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M"


def dataset_card(dsd, prov: Provenance, taxonomy: Taxonomy, *, license: str, pretty_name: str | None = None):
    """The dataset card (``huggingface_hub.DatasetCard``): YAML header and body (module docstring)."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    n_rows = sum(len(ds) for ds in dsd.values())
    problem_set = prov.problem_set or "unknown"
    name = pretty_name or f"rscaffold reasoning scaffolds ({problem_set})"
    data = DatasetCardData(
        license=license,
        language=["en"],
        task_categories=TASK_CATEGORIES,
        tags=TAGS,
        pretty_name=name,
        size_categories=[_size_category(n_rows)],
        source_datasets=prov.source_datasets() or None,
    )
    MetadataConfigs(
        {"default": {"data_files": [{"split": s, "path": f"{DATA_DIR}/{s}-*"} for s in dsd]}}
    ).to_dataset_card_data(data)
    split_dict = SplitDict()
    for s, ds in dsd.items():
        split_dict.add(SplitInfo(name=s, num_examples=len(ds), num_bytes=ds.data.nbytes))
    features = next(iter(dsd.values())).features
    DatasetInfosDict({"default": DatasetInfo(features=features, splits=split_dict)}).to_dataset_card_data(data)
    body = _card_body(dsd, prov, taxonomy, name=name, license=license)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


CITATION = """@misc{reasoning_scaffolding_2025,
  title         = {Reasoning Scaffolding: Distilling the Flow of Thought from LLMs},
  year          = {2025},
  eprint        = {2509.23619},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2509.23619}
}"""


def _hide_local_paths(value: Any) -> Any:
    """``value`` with absolute local paths replaced by ``<local>/<name>`` (a card is published)."""
    if isinstance(value, dict):
        return {k: _hide_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide_local_paths(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")):
        return f"<local>/{Path(value).name}"
    return value


def _resolved_config(prov: Provenance) -> dict[str, Any]:
    return _hide_local_paths(
        {
            stage: manifest.get("config")
            for stage, manifest in (
                ("problems", prov.problems),
                ("teacher", prov.teacher),
                ("labeling", prov.labeling),
                ("dataset", prov.dataset),
            )
            if manifest.get("config") is not None
        }
    )


def _segmentation(prov: Provenance) -> dict[str, Any]:
    return ((prov.labeling.get("config") or {}).get("labeling") or {}).get("segmentation") or {}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _card_body(dsd, prov: Provenance, taxonomy: Taxonomy, *, name: str, license: str) -> str:  # noqa: C901 - a document
    stats = prov.dataset.get("summary") or {}
    dcfg = prov.dataset.get("config") or {}
    tcfg = prov.teacher.get("config") or {}
    sampling = tcfg.get("sampling") or {}
    q = prov.quality
    signal_counts = stats.get("signal_counts") or {}
    total_steps = sum(signal_counts.values()) or None
    family = prov.prompt_family()
    degenerate = prov.degenerate_labeling()
    lines = [f"# {name}", ""]
    if degenerate:
        lines += [
            "> **Warning: the labeling looks degenerate.** rscaffold's labeling quality gate flagged these labels; "
            "a student trained on them learns little of the steps' roles:",
            *(f"> - {reason}" for reason in degenerate),
            "",
        ]
    lines += [
        "Teacher reasoning traces split into steps, each step labeled with a semantic signal, made by rscaffold "
        "for *Reasoning Scaffolding: Distilling the Flow of Thought from LLMs* "
        f"([arXiv 2509.23619]({PAPER})). A student trained on the `messages` column learns to predict the next "
        "signal and to write the step under it; `messages_plain` is the same data for plain CoT-SFT.",
        "",
        "## Use",
        "",
        "Train on `prompt` + `completion` (TRL's prompt-completion form: the loss is on the answer only, as "
        "rscaffold trains its students), or on `messages` (the whole chat, for trainers that take "
        "conversations; TRL then also learns the prompt unless told `assistant_only_loss`). The user turn is "
        + (
            (
                f"the question inside its own benchmark's family prompt ({', '.join(sorted(family))})"
                if isinstance(family, dict)
                else f"the question inside the {prompt_family_of(family)!r} family's prompt"
            )
            + ", exactly what rscaffold's students are trained "
            "and evaluated on"
            if family
            else "the bare question (the problems stage's manifest was not found, so the family's prompt is unknown)"
        )
        + ". For the plain CoT-SFT baseline: `completion_plain` or `messages_plain`.",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset('<this repository or folder>')  # splits: " + ", ".join(dsd),
        "",
        "# the signal tokens must be single tokens of the student's tokenizer:",
        f"signal_tokens = {list(taxonomy.tokens)!r}",
        "tokenizer.add_special_tokens({'additional_special_tokens': signal_tokens})",
        "model.resize_token_embeddings(len(tokenizer))",
        "train = ds['train'].select_columns(['prompt', 'completion'])",
        "# then e.g. trl.SFTTrainer(model, train_dataset=train, processing_class=tokenizer)",
        "```",
        "",
        "## Columns",
        "",
        "| column | meaning |",
        "|---|---|",
        "| `prompt` | the student's system prompt and the user turn (chat messages) |",
        "| `completion` | the answer as `<signal token>step` per step, steps separated by a blank line (one assistant message) |",
        "| `completion_plain` | the same answer without signal tokens (the CoT-SFT baseline's target) |",
        "| `messages` | `prompt` and `completion` as one chat |",
        "| `messages_plain` | the same chat without signal tokens |",
        "| `steps` | the labeled steps: `index`, `signal` (a taxonomy name), `text`, `source` of the label (`llm`, `keyword`, `fallback`) |",
        "| `signals`, `n_steps` | the scaffold (the sequence of signals) and its length |",
        "| `question`, `gold_answer` | the problem and its reference answer |",
        "| `teacher_answer`, `correct` | the teacher's final answer and whether it checks out |",
        "| `problem_id`, `trace_id` | ids (`<problem>#<sample>`); the splits are disjoint by problem |",
        "| `source_id` | the problem's own id in the problem file it came from (custom sets with `fields.id`), else empty |",
        "",
        "## Counts",
        "",
        "| split | rows |",
        "|---|---|",
        *(f"| {s} | {len(ds)} |" for s, ds in dsd.items()),
        "",
        f"- problems: {_fmt(stats.get('problems'))}; mean steps per trace: {_fmt(stats.get('mean_steps'))}; "
        f"teacher accuracy on the kept traces: {_fmt(stats.get('teacher_accuracy'))}",
        f"- traces dropped: {json.dumps(stats.get('dropped', {}))}; label sources: {json.dumps(stats.get('label_sources', {}))}",
        "",
        "## Taxonomy (signals and their tokens)",
        "",
        "| signal | token | share of steps | definition | cue words (keyword pre-label) |",
        "|---|---|---|---|---|",
    ]
    for spec in taxonomy.signals:
        share = f"{signal_counts.get(spec.name, 0) / total_steps:.1%}" if total_steps else "n/a"
        cues = ", ".join(f"`{c}`" for c in spec.cues[:8]) + (", ..." if len(spec.cues) > 8 else "")
        lines.append(f"| {spec.name} | `{spec.token}` | {share} | {spec.definition} | {cues} |")
    lines += [
        "",
        f"Taxonomy digest `{taxonomy.digest()}`.",
        "",
        "## How it was made",
        "",
        f"- **Problems**: {prov.problem_set or 'unknown'}"
        + (" (rscaffold's built-in problem set)" if prov.built_in_problems else "")
        + (f"; source datasets: {', '.join(prov.source_datasets())}" if prov.source_datasets() else ""),
        f"- **Teacher**: {prov.teacher_model()}; sampling: temperature {sampling.get('temperature', 'n/a')}, "
        f"top_p {sampling.get('top_p', 'n/a')}, at most {sampling.get('max_new_tokens', 'n/a')} new tokens; "
        f"{_fmt(tcfg.get('samples_per_problem'))} sample(s) per problem; traces kept: {tcfg.get('keep', 'n/a')}",
        "- **Segmentation**: steps split at blank lines (`\\n\\n`), as in the paper"
        + (" and before discourse turns" if _segmentation(prov).get("split_on_discourse_turns") else ""),
        f"- **Labels**, two stages as in the paper: a keyword pre-label from the step's first words, then the "
        f"labeler LLM validates or corrects every pre-label and labels the rest. Labeler: {prov.labeler_model()}",
        f"- **Split**: {dcfg.get('validation_fraction', 'n/a')} of the problems held out as validation "
        f"(seed {dcfg.get('seed', 'n/a')}); at least {dcfg.get('min_steps', 'n/a')} step(s) per trace; "
        f"only correct traces: {dcfg.get('only_correct', 'n/a')}",
        f"- **Fingerprint** of the dataset stage: `{prov.dataset.get('fingerprint', 'n/a')}` "
        f"(rscaffold {prov.dataset.get('rscaffold_version', 'n/a')}, code version `{prov.dataset.get('code_version', 'n/a')}`)",
        "",
        "## Labeling quality",
        "",
    ]
    if q:
        lines += [
            "| figure | value | paper |",
            "|---|---|---|",
            f"| labeled steps | {_fmt(q.get('steps'))} | |",
            f"| steps with a keyword pre-label | {_fmt(q.get('keyword_coverage'))} | about 0.74 |",
            f"| pre-label agrees with the LLM label (on {_fmt(q.get('prelabel_checked'))} checked steps) "
            f"| {_fmt(q.get('prelabel_agreement'))} | about 0.87 |",
            f"| Cohen's kappa, pre-label vs LLM label | {_fmt(q.get('prelabel_kappa'))} | |",
            f"| label sources | {json.dumps(q.get('source_counts', {}))} | |",
        ]
    else:
        lines.append("The labeling stage's quality report was not found next to this dataset.")
    lines += [
        "",
        "## Configuration",
        "",
        "The resolved configuration of the stages that made this dataset (from their manifests; local "
        "directories shown by name):",
        "",
        "```yaml",
        yaml.safe_dump(_resolved_config(prov), sort_keys=False).rstrip(),
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
        "## License",
        "",
        (
            f"`{license}`: the license of the problems' source is not known to rscaffold (a custom set); "
            "set it with `rscaffold export --license`."
            if license == "other"
            else f"`{license}`: the license of the problems' source."
        )
        + " The reasoning traces were written by the teacher model; their use may also be subject to that "
        "model's terms.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the Hub


def push_to_hub(out_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder (:func:`export_dataset`) to the dataset repository ``repo_id``
    (created if needed, ``private`` then), as one commit. Needs a Hugging Face token (``hf auth
    login`` or ``HF_TOKEN``). Returns the repository's URL."""
    from huggingface_hub import HfApi, get_token

    out_dir = Path(out_dir)
    if not (out_dir / CARD).is_file() or not (out_dir / DATA_DIR).is_dir():
        raise ExportError(f"{out_dir} is not an exported dataset folder (no {CARD} and {DATA_DIR}/)")
    token = token or get_token()
    if not token:
        raise ExportError("pushing needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo.repo_id,
            repo_type="dataset",
            folder_path=str(out_dir),
            allow_patterns=[CARD, f"{DATA_DIR}/*"],
            delete_patterns=[f"{DATA_DIR}/*"],
            commit_message="rscaffold export",
        )
    except Exception as err:  # the hub client's HTTP and connection errors, whatever their class
        raise ExportError(f"pushing to the Hub dataset repository {repo_id!r} failed: {err}") from err
    return str(repo)
