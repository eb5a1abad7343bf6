from pathlib import Path

import pytest
import yaml

from rscaffold.config import (
    BenchmarkSource,
    ConfigError,
    EvaluationConfig,
    PipelineConfig,
    check_inputs_exist,
    config_from_dict,
    load_config,
)


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_default_config_loads_and_points_at_built_in_data():
    cfg = load_config()
    assert Path(cfg.problems.train).name == "train.jsonl" and Path(cfg.problems.train).exists()
    assert Path(cfg.labeling.taxonomy).exists()
    assert cfg.teacher.llm.backend == "transformers"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"teacher": {"sampling": {"max_new_token": 3}}}))
    assert "teacher.sampling.max_new_token" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"training": {"max_steps": "many"}}))
    assert "training.max_steps" in str(e.value)


def test_unknown_backend_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"teacher": {"llm": {"backend": "ollama"}}}))
    msg = str(e.value)
    assert "teacher.llm.backend" in msg and "transformers" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "teacher: [unclosed"))


def test_a_binary_or_directory_config_is_a_config_error(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xb4\x00\xff")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "binary.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_relative_paths_resolve_against_config_dir(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "t.jsonl").write_text("")
    cfg = load_config(write(tmp_path, {"problems": {"train": "p/t.jsonl"}}))
    assert cfg.problems.train == str((tmp_path / "p" / "t.jsonl").resolve())


def test_missing_input_files_are_reported_before_running(tmp_path):
    cfg = load_config(write(tmp_path, {"problems": {"train": "missing.jsonl"}}))
    with pytest.raises(ConfigError) as e:
        check_inputs_exist(cfg)
    assert "problems.train" in str(e.value) and "missing.jsonl" in str(e.value)


def test_prompt_template_needs_question():
    with pytest.raises(Exception, match="question"):
        PipelineConfig.model_validate({"teacher": {"prompt_template": "solve it"}})


def test_labeler_defaults_to_teacher_backend():
    cfg = PipelineConfig()
    assert cfg.labeler_llm() is cfg.teacher.llm


def test_example_configs_validate():
    examples = Path(__file__).resolve().parents[1] / "data" / "examples"
    files = sorted(examples.glob("*.yaml"))
    assert files
    for f in files:
        if "axes" in yaml.safe_load(f.read_text()):
            continue  # an experiment file (a grid over a config): tests/experiment/test_grid.py loads it
        cfg = load_config(f)
        assert cfg.teacher.llm.backend in ("openai", "vllm", "transformers")


def test_every_field_has_help_and_explain_round_trips():
    """Every config key carries its meaning (shown by `rscaffold show-config --explain`), and the
    commented YAML loads back as the same config."""
    import typing

    import yaml

    from rscaffold.config import PipelineConfig, explain_config, load_config

    missing = []

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            for t in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(t, type) and hasattr(t, "model_fields"):
                    walk(t, f"{prefix}{name}.")
            for t in typing.get_args(field.annotation):  # list[Section]
                for u in typing.get_args(t):
                    if isinstance(u, type) and hasattr(u, "model_fields"):
                        walk(u, f"{prefix}{name}[].")

    walk(PipelineConfig)
    assert missing == []
    cfg = load_config(None)
    text = explain_config(cfg)
    assert "# Optimizer steps per student." in text and "\n  max_steps: 12\n" in text
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_benchmark_sources_config(tmp_path):
    (tmp_path / "bench").mkdir()
    cfg = config_from_dict(
        {
            "evaluation": {
                "benchmarks": [
                    {"name": "gsm8k", "source": "bench", "limit": 3},
                    {"name": "truthfulqa", "source": "hub:truthfulqa/truthful_qa"},
                ]
            }
        },
        base=tmp_path,
    )
    assert cfg.evaluation.benchmarks[0].source == str((tmp_path / "bench").resolve())  # relative to the config file
    assert cfg.evaluation.benchmarks[1].source.startswith("hub:")
    assert EvaluationConfig().benchmarks == [] and EvaluationConfig().prompt == "benchmark"
    with pytest.raises(ValueError, match="repeated"):
        EvaluationConfig(
            benchmarks=[BenchmarkSource(name="gsm8k", source="a"), BenchmarkSource(name="gsm8k", source="b")]
        )
    with pytest.raises(ValueError):
        BenchmarkSource(name="mmlu", source="a")


def test_assignments_are_typed_nested_and_validated(tmp_path, monkeypatch):
    from rscaffold.config import parse_assignments

    over = parse_assignments(
        ["training.max_steps=200", "teacher.sampling.temperature=0.6", "training.lora={r: 8}", "teacher.keep=correct"]
    )
    assert over == {
        "training": {"max_steps": 200, "lora": {"r": 8}},
        "teacher": {"sampling": {"temperature": 0.6}, "keep": "correct"},
    }
    cfg = load_config(None, over)
    assert cfg.training.max_steps == 200 and cfg.teacher.sampling.temperature == 0.6 and cfg.training.lora.r == 8
    # relative paths are the command line's (the working directory), not the config file's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text("")
    assert parse_assignments(["problems.train=mine.jsonl"], base=tmp_path)["problems"]["train"] == str(
        (tmp_path / "mine.jsonl").resolve()
    )
    for bad in ("training.max_steps", "=3", "training..x=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_assignments([bad])
    with pytest.raises(ConfigError, match="also set"):
        parse_assignments(["training=1", "training.max_steps=2"])
    with pytest.raises(ConfigError, match=r"training\.max_steps: Input should be a valid integer"):
        load_config(None, parse_assignments(["training.max_steps=many"]))


def test_training_args_refuse_what_rscaffold_sets_and_execution_keys_leave_the_fingerprint():
    from rscaffold.config import TrainingConfig, fingerprint_view

    with pytest.raises(ConfigError) as e:
        config_from_dict({"training": {"args": {"max_steps": 5, "output_dir": "x"}}})
    msg = str(e.value)
    assert "training.args.max_steps is set by rscaffold itself from training.max_steps: set it there" in msg
    assert "training.args.output_dir is set by rscaffold itself (the pipeline decides it)" in msg
    base = fingerprint_view(TrainingConfig())
    assert fingerprint_view(TrainingConfig(args={"disable_tqdm": False, "run_name": "x"}, report_to=["wandb"])) == base
    assert fingerprint_view(TrainingConfig(args={"optim": "adafactor"})) != base
    # epochs instead of max_steps, and what cannot go together
    assert TrainingConfig(epochs=3).max_steps is None
    for bad, match in (
        ({"epochs": 3, "max_steps": 5}, "exactly one of training.max_steps and training.epochs"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, "warmup_steps or training.warmup_ratio"),
        ({"load_in_4bit": True}, "set training.lora"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainingConfig(**bad)


def test_shard_size_auto_follows_the_backend_and_tiny_engine_shards_warn():
    import warnings

    cpu = PipelineConfig()
    assert (cpu.teacher_shard_size(), cpu.labeling_shard_size()) == (8, 8)
    vllm = {"llm": {"backend": "vllm", "model": "m"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = PipelineConfig(teacher=vllm)
        assert (engine.teacher_shard_size(), engine.labeling_shard_size()) == (512, 512)  # the labeler is the teacher's
        mixed = PipelineConfig(teacher=vllm, labeling={"llm": {"backend": "openai", "model": "m"}, "shard_size": 3})
        assert (mixed.teacher_shard_size(), mixed.labeling_shard_size()) == (512, 3)
    with pytest.warns(UserWarning, match="teacher.shard_size 8 is small for the vllm engine"):
        PipelineConfig(teacher={**vllm, "shard_size": 8})
    with pytest.raises(ValueError):
        PipelineConfig(teacher={"shard_size": 0})
