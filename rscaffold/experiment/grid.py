"""An experiment: a grid of pipeline configs (cells) over axes of settings, and what it costs.

An experiment file names the pipeline config every cell starts from, settings for every cell, and
the axes::

    config: ../five_benchmarks.yaml        # or an inline pipeline config; none: the built-in one
    set: {training.max_steps: 200}         # every cell
    axes:
      training.signal_loss_weight: [0.5, 1, 2]   # a dotted key and its values
      training.seed: [0, 1, 2]
      size:                                      # a named axis: label -> settings
        0.5b: {training.student: Qwen/Qwen2.5-0.5B-Instruct}
        7b: {training.student: Qwen/Qwen2.5-7B-Instruct, training.lora: {r: 16}}

Every combination of one value per axis is a cell: the base config with ``set`` and the cell's
settings applied the way ``rscaffold run --set KEY=VALUE`` applies them, validated like any
config. The cells share one artifacts directory, so a stage whose fingerprint is the same in two
cells (the teacher, labeling and dataset when only training settings vary; a baseline student
that does not depend on the varied setting, see
:func:`rscaffold.stages.training.student_fingerprint`) is computed once.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rscaffold.config import (
    ConfigError,
    PipelineConfig,
    config_from_dict,
    deep_merge,
    format_validation_error,
    load_config,
    parse_assignments,
)
from rscaffold.vocabulary import EvalModelName

AxisValues = list[Any] | dict[str, dict[str, Any]]


class ExperimentSpec(BaseModel):
    """An experiment file: the base config, the settings of every cell, the axes, the statistics."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None,
        # one folder name: a path (a/b, ../x, /x) would put the report outside experiments/
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The experiment's name (letters, digits, '.', '_', '-'): its report goes to "
        "<artifacts_dir>/experiments/<name>/ (default: the experiment file's name without its extension).",
    )
    config: str | dict[str, Any] | None = Field(
        default=None,
        description="The pipeline config every cell starts from: a YAML file (relative to the experiment file) or "
        "an inline config; none: the built-in default.",
    )
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of every cell: dotted config key -> value (as `rscaffold run --set KEY=VALUE`).",
    )
    axes: dict[str, AxisValues] = Field(
        description="The grid: a dotted config key -> its values (e.g. training.signal_loss_weight: [0.5, 1, 2]), "
        "or an axis name -> {label: {dotted key: value, ...}} for values that set several keys together. Every "
        "combination of one value per axis is a cell.",
    )
    reference: EvalModelName = Field(
        default="cot_sft",
        description="The model every other model is compared with, per benchmark and cell (default: the "
        "long-thinking student).",
    )
    bootstrap_samples: int = Field(
        default=2000, ge=1, description="Resamples of the paired bootstrap of each accuracy difference."
    )
    bootstrap_seed: int = Field(default=0, description="Seed of the paired bootstrap.")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Level of the bootstrap intervals.")

    @field_validator("axes")
    @classmethod
    def _check_axes(cls, v: dict[str, AxisValues]) -> dict[str, AxisValues]:
        if not v:
            raise ValueError("declare at least one axis")
        for name, values in v.items():
            if not values:
                raise ValueError(f"axis {name!r} has no values")
            keys = list(values.values()) if isinstance(values, dict) else [{name: None}]
            for settings in keys:
                if not isinstance(settings, dict):
                    raise ValueError(f"axis {name!r}: each label maps to settings {{dotted key: value}}")
                for key in settings:
                    if key.split(".")[0] == "run":
                        raise ValueError(
                            f"axis {name!r} sets {key}: the cells share the run settings (one artifacts "
                            "directory); set run.* under 'set'"
                        )
            if isinstance(values, list) and len({json.dumps(x, sort_keys=True, default=str) for x in values}) != len(
                values
            ):
                raise ValueError(f"axis {name!r} lists a value twice: {values}")
        return v


@dataclass(frozen=True)
class Cell:
    """One combination of axis values and its validated pipeline config."""

    id: str
    values: dict[str, Any]  # axis name -> its value here (the label, for a named axis)
    settings: dict[str, Any]  # dotted key -> value: what the axes set in this cell
    config: PipelineConfig = field(repr=False)


@dataclass
class Experiment:
    spec: ExperimentSpec
    cells: list[Cell]
    source: str  # the experiment file, or "<dict>"

    @property
    def name(self) -> str:
        return self.spec.name or Path(self.source).stem

    @property
    def axes(self) -> list[str]:
        return list(self.spec.axes)

    def report_dir(self) -> Path:
        root = self.cells[0].config.run.artifacts_root
        return root / "experiments" / self.name


def axis_label(name: str, axes: list[str]) -> str:
    """A short name of an axis: the last part of its dotted key when no other axis ends the same."""
    short = name.split(".")[-1]
    return short if sum(a.split(".")[-1] == short for a in axes) == 1 else name


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _assignments(settings: dict[str, Any]) -> list[str]:
    # JSON is YAML, so each value reads back exactly as --set reads the same text.
    return [f"{k}={json.dumps(v, default=str)}" for k, v in settings.items()]


def load_experiment_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read, validate and expand an experiment file; ``overrides``: ``KEY=VALUE`` settings of every
    cell (the command line's ``--set``, relative paths against the working directory)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the experiment file: {err}") from None
    return expand_experiment(raw, base=path.parent.resolve(), source=str(path), overrides=overrides)


def expand_experiment(
    raw: dict[str, Any], *, base: Path, source: str = "<dict>", overrides: list[str] | tuple[str, ...] = ()
) -> Experiment:
    """The experiment of a raw experiment mapping (paths relative to ``base``), its cells expanded
    and every cell's config validated (:class:`ConfigError` names the cell and the field)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid experiment {source}:\n{format_validation_error(err)}") from None
    common = parse_assignments(_assignments(spec.set), base=base)
    if overrides:
        common = deep_merge(common, parse_assignments(list(overrides), base=Path.cwd()))

    # each axis as a list of (value shown, settings)
    choices: list[list[tuple[Any, dict[str, Any]]]] = []
    for name, values in spec.axes.items():
        if isinstance(values, dict):
            choices.append([(label, dict(settings)) for label, settings in values.items()])
        else:
            choices.append([(v, {name: v}) for v in values])

    axes = list(spec.axes)
    cells: list[Cell] = []
    for combo in itertools.product(*choices):
        values = {name: value for name, (value, _) in zip(axes, combo, strict=True)}
        settings: dict[str, Any] = {}
        for name, (_, s) in zip(axes, combo, strict=True):
            clash = sorted(set(s) & set(settings))
            if clash:
                raise ConfigError(f"{source}: axis {name!r} sets {clash}, which another axis sets too")
            settings.update(s)
        cell_id = ",".join(f"{axis_label(a, axes)}={_value_text(values[a])}" for a in axes)
        try:
            cell_overrides = deep_merge(common, parse_assignments(_assignments(settings), base=base))
        except ConfigError as err:
            raise ConfigError(f"{source}, cell {cell_id}: {err}") from None
        try:
            cfg = _cell_config(spec.config, cell_overrides, base)
        except ConfigError as err:
            raise ConfigError(f"{source}, cell {cell_id}: {err}") from None
        if spec.reference not in cfg.evaluation.models:
            raise ConfigError(
                f"{source}, cell {cell_id}: the reference model {spec.reference!r} is not evaluated "
                f"(evaluation.models: {cfg.evaluation.models})"
            )
        # Two spellings of one value (1 and 1.0, two labels with the same settings) make the same
        # config: one cell twice would count its comparisons twice in the report.
        twin = next((c for c in cells if c.config == cfg), None)
        if twin is not None:
            raise ConfigError(f"{source}: cells {twin.id} and {cell_id} have the same config (a value listed twice?)")
        cells.append(Cell(cell_id, values, settings, cfg))
    roots = {str(c.config.run.artifacts_root) for c in cells}
    if len(roots) > 1:  # cannot happen through the axes (run.* refused there); kept as a guard
        raise ConfigError(f"{source}: the cells must share one artifacts directory, got {sorted(roots)}")
    return Experiment(spec, cells, source)


def _cell_config(config: str | dict[str, Any] | None, overrides: dict[str, Any], base: Path) -> PipelineConfig:
    if isinstance(config, dict):
        return config_from_dict(deep_merge(config, overrides), base=base, source="(the inline config)")
    if config is None:
        return load_config(None, overrides)
    return load_config(base / config, overrides)


# ---------------------------------------------------------------------------------------------
# what running it costs


@dataclass
class ExperimentCost:
    """What running the experiment would do now, given what the artifacts directory holds.

    Request counts are upper bounds (labeling sends one request per kept trace, and the request
    cache answers requests it has seen); None where the count is unknown without downloading."""

    cells: int
    teacher_runs: int
    teacher_requests: int | None
    labeling_runs: int
    labeler_requests: int | None
    training_runs: list[tuple[str, str]]  # (student, student fingerprint) to train
    students_reused: int
    evaluations: int
    evaluations_reused: int

    def lines(self) -> list[str]:
        def n(x: int | None) -> str:
            return "unknown" if x is None else str(x)

        return [
            f"cells: {self.cells}",
            f"teacher: {self.teacher_runs} run(s), up to {n(self.teacher_requests)} request(s)",
            f"labeling: {self.labeling_runs} run(s), up to {n(self.labeler_requests)} labeler request(s)",
            f"training runs: {len(self.training_runs)} student(s) to train "
            f"({', '.join(sorted({s for s, _ in self.training_runs})) or 'none'}), {self.students_reused} reused",
            f"evaluations: {self.evaluations} to run, {self.evaluations_reused} reused",
        ]


def _train_problem_count(cfg: PipelineConfig, fps: dict[str, str]) -> int | None:
    from rscaffold.evalsets.loaders import benchmark_for, is_hub_source, load_problems
    from rscaffold.stages.common import stage_dir

    sd = stage_dir(cfg, "problems", fps)
    if sd.is_complete():
        return int(sd.read_manifest()["summary"]["train"])
    total = 0
    for src in cfg.problems.sources():  # each benchmark of a mix
        if is_hub_source(src.train):
            if src.limit_train is None:
                return None
            total += src.limit_train
            continue
        bench = benchmark_for(src.format, src.custom)
        total += len(
            load_problems(src.train, benchmark=bench, split="train", limit=src.limit_train, seed=cfg.problems.seed)
        )
    return total


def experiment_cost(experiment: Experiment) -> ExperimentCost:
    """Count the stage runs, requests and trainings the experiment's cells need that the
    artifacts directory does not hold (each distinct one once)."""
    from rscaffold.stages.common import stage_dir
    from rscaffold.stages.plan import preflight
    from rscaffold.stages.training import is_student_stored, student_fingerprint, training_variants

    def done(cfg: PipelineConfig, stage: str, fp: str) -> bool:
        sd = stage_dir(cfg, stage, {stage: fp})
        return sd.is_complete() and not sd.verify()

    teacher: dict[str, int | None] = {}
    labeling: dict[str, int | None] = {}
    students: dict[str, str] = {}
    reused: set[str] = set()
    evaluations: set[str] = set()
    evaluations_reused: set[str] = set()
    for cell in experiment.cells:
        cfg = cell.config
        try:
            fps = preflight(cfg)
        except ConfigError as err:
            raise ConfigError(f"cell {cell.id}: {err}") from None
        needs_teacher = fps["teacher"] not in teacher and not done(cfg, "teacher", fps["teacher"])
        needs_labeling = fps["labeling"] not in labeling and not done(cfg, "labeling", fps["labeling"])
        count = _train_problem_count(cfg, fps) if needs_teacher or needs_labeling else 0
        traces = None if count is None else count * cfg.teacher.samples_per_problem
        if needs_teacher:  # one request per problem, for all its samples
            teacher[fps["teacher"]] = count
        if needs_labeling:
            labeling[fps["labeling"]] = traces if cfg.labeling.method == "llm" else 0
        training_done = done(cfg, "training", fps["training"])
        for name, _ in training_variants(cfg):
            sfp = student_fingerprint(cfg, fps["dataset"], name)
            if training_done or is_student_stored(cfg, fps["dataset"], name):
                reused.add(sfp)
            else:
                students[sfp] = name
        (evaluations_reused if done(cfg, "evaluation", fps["evaluation"]) else evaluations).add(fps["evaluation"])

    def total(counts: dict[str, int | None]) -> int | None:
        return None if any(v is None for v in counts.values()) else sum(v or 0 for v in counts.values())

    return ExperimentCost(
        cells=len(experiment.cells),
        teacher_runs=len(teacher),
        teacher_requests=total(teacher),
        labeling_runs=len(labeling),
        labeler_requests=total(labeling),
        training_runs=[(name, fp) for fp, name in students.items()],
        students_reused=len(reused - set(students)),
        evaluations=len(evaluations),
        evaluations_reused=len(evaluations_reused),
    )
