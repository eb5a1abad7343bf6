"""Experiment files: cells from axes, clear errors, and which students cells share."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rscaffold.config import ConfigError
from rscaffold.experiment.grid import expand_experiment, load_experiment_file
from rscaffold.stages.training import student_fingerprint

BASE = {"run": {"artifacts_dir": "artifacts"}, "training": {"max_steps": 3}}


def test_axes_expand_to_every_combination_with_settings_applied(tmp_path):
    exp = expand_experiment(
        {
            "config": BASE,
            "set": {"training.learning_rate": 1e-4},
            "axes": {
                "training.signal_loss_weight": [0.5, 2],
                "size": {"small": {"training.tokenizer": "./tok"}, "big": {"training.max_steps": 7}},
            },
        },
        base=tmp_path,
    )
    assert [c.id for c in exp.cells] == [
        "signal_loss_weight=0.5,size=small",
        "signal_loss_weight=0.5,size=big",
        "signal_loss_weight=2,size=small",
        "signal_loss_weight=2,size=big",
    ]
    first, last = exp.cells[0].config, exp.cells[-1].config
    assert first.training.signal_loss_weight == 0.5 and first.training.learning_rate == 1e-4
    assert first.training.tokenizer == str(tmp_path / "tok")  # relative to the experiment file
    assert first.training.max_steps == 3 and last.training.max_steps == 7
    assert exp.cells[-1].values == {"training.signal_loss_weight": 2, "size": "big"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"axes": {"training.no_such_key": [1, 2]}}, r"(?s)cell no_such_key=1: .*training.no_such_key: unknown key"),
        ({"axes": {"run.artifacts_dir": ["a", "b"]}}, "share the run settings"),
        ({"axes": {"training.seed": []}}, "has no values"),
        ({"axes": {"training.seed": [0, 0]}}, "lists a value twice"),
        (
            {"axes": {"training.signal_loss_weight": [1, 1.0]}},
            "weight=1 and signal_loss_weight=1.0 have the same config",
        ),
        ({"axes": {"size": {"a": {"training.seed": 1}, "b": {"training.seed": 1}}}}, "size=a and size=b have the same"),
        ({"axes": {}}, "at least one axis"),
        ({"axes": {"training.seed": [0]}, "colour": 1}, "colour: unknown key"),
        ({"axes": {"training.seed": [0]}, "name": "../../elsewhere"}, "name: String should match pattern"),
        ({"axes": {"training.seed": [0]}, "name": "/abs/x"}, "name: String should match pattern"),
        ({"axes": {"training.signal_loss_weight": [-1]}}, "greater than or equal to 0"),
        (
            {"axes": {"training.seed": [0]}, "set": {"evaluation.models": ["scaffolded"]}},
            "reference model 'cot_sft' is not evaluated",
        ),
    ],
)
def test_bad_experiments_are_refused_naming_the_problem(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        expand_experiment({"config": BASE, **raw}, base=tmp_path)


def test_an_unreadable_experiment_file_is_a_config_error(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xb4\x00\xff")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment_file(tmp_path / "binary.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_experiment_file(tmp_path)


def test_experiment_file_config_path_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(yaml.safe_dump({"training": {"max_steps": 9}}))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"config": "sub/base.yaml", "axes": {"training.seed": [1, 2]}}))
    exp = load_experiment_file(path, ["training.learning_rate=0.001"])
    assert exp.name == "grid"
    assert [(c.config.training.max_steps, c.config.training.seed) for c in exp.cells] == [(9, 1), (9, 2)]
    assert exp.cells[0].config.training.learning_rate == 0.001
    assert exp.report_dir() == Path("artifacts").absolute() / "experiments" / "grid"


def test_baselines_do_not_depend_on_the_signal_settings():
    exp = expand_experiment(
        {
            "config": BASE,
            "axes": {
                "training.signal_loss_weight": [0.5, 1.0],
                "training.signal_objective": ["token", "head"],
                "training.seed": [0, 1],
            },
        },
        base=Path("."),
    )
    fps = {
        name: {c.id: student_fingerprint(c.config, "dataset-fp", name) for c in exp.cells}
        for name in ("scaffolded", "cot_sft", "short_cot")
    }
    assert len(set(fps["scaffolded"].values())) == 8
    assert len(set(fps["cot_sft"].values())) == 2  # one per seed
    assert len(set(fps["short_cot"].values())) == 2
    assert not set(fps["cot_sft"].values()) & set(fps["short_cot"].values())
    # the rows a student learns from enter its fingerprint; the students trained alongside it only
    # where they decide those rows (truncation 'drop' leaves out what is too long for any of them)
    cfg = exp.cells[0].config
    only = cfg.model_copy(deep=True)
    only.training.students = ["cot_sft"]
    assert cfg.training.truncation == "drop"
    assert student_fingerprint(only, "dataset-fp", "cot_sft") != student_fingerprint(cfg, "dataset-fp", "cot_sft")
    cfg.training.truncation = only.training.truncation = "truncate_keep_end"
    assert student_fingerprint(only, "dataset-fp", "cot_sft") == student_fingerprint(cfg, "dataset-fp", "cot_sft")
    assert student_fingerprint(cfg, "other-dataset", "cot_sft") != student_fingerprint(cfg, "dataset-fp", "cot_sft")


def test_the_paper_grid_example_expands_to_its_nine_cells():
    exp = load_experiment_file(Path(__file__).resolve().parents[2] / "data" / "examples" / "paper_grid.yaml")
    assert exp.name == "paper-main" and len(exp.cells) == 9
    cfg = exp.cells[-1].config
    assert cfg.training.student == "Qwen/Qwen2.5-14B-Instruct" and cfg.training.seed == 2
    assert cfg.training.lora is not None and cfg.training.num_processes == 2
    assert {b.name for b in cfg.evaluation.benchmarks} == {
        "gsm8k",
        "math500",
        "strategyqa",
        "commonsenseqa",
        "truthfulqa",
    }
    assert {"short_cot", "cot_sft", "scaffolded", "scaffolded-nogate", "scaffolded-noprune"} <= set(
        cfg.evaluation.models
    )
