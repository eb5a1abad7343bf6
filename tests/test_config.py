from pathlib import Path

import pytest
import yaml

from rscaffold.config import ConfigError, PipelineConfig, check_inputs_exist, config_from_dict, load_config


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
        cfg = load_config(f)
        assert cfg.teacher.llm.backend in ("openai", "vllm", "transformers")


def test_teacher_prompt_defaults_to_the_benchmark_family():
    from rscaffold.records import ProblemRecord
    from rscaffold.stages.teacher import build_request, teacher_prompt_config

    p = ProblemRecord(problem_id="x", split="train", source="s", question="Is water wet?", gold_answer="yes")
    yesno = teacher_prompt_config(PipelineConfig.model_validate({"problems": {"format": "strategyqa"}}))
    user = build_request(p, yesno).messages[-1]["content"]
    assert user.startswith("Is water wet?") and "'The answer is yes.' or 'The answer is no.'" in user
    math = teacher_prompt_config(PipelineConfig())
    assert "'The answer is' followed by the final number" in build_request(p, math).messages[-1]["content"]
    own = teacher_prompt_config(PipelineConfig.model_validate({"teacher": {"prompt_template": "Q: {question}"}}))
    assert build_request(p, own).messages[-1]["content"] == "Q: Is water wet?"


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
