"""The multi-GPU training path: accelerate configs under deployments/accelerate/ and the
``rscaffold_flows.launch`` entry point started by ``accelerate launch``.

No GPU here: the configs are checked with accelerate's own loader and launch-argument
validation; the launch itself runs under ``accelerate launch --cpu`` (1 process, and 2 processes
with DDP on gloo) on a tiny random-init student.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_upstream_stages, tiny_config_dict
from rscaffold_flows import launch as launch_mod

from rscaffold.config import load_config
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.store import StageDir
from rscaffold.student import STUDENT_META
from rscaffold.vocabulary import TRAINED_STUDENTS

ACCEL = REPO / "deployments" / "accelerate"
CONFIGS = sorted(ACCEL.glob("*.yaml"))


def _launch_args(config_file: Path, *extra: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(
        ["--config_file", str(config_file), *extra, "-m", "rscaffold_flows.launch", "--config", "my.yaml"]
    )
    _validate_launch_command(args)
    return args


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_accelerate_accepts_config(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(path))  # rejects unknown keys and bad enum values
    assert isinstance(cfg, ClusterConfig)
    assert cfg.mixed_precision == "bf16" and cfg.num_machines == 1
    args = _launch_args(path, "--num_processes", "4")
    assert args.num_processes == 4 and args.module and args.mixed_precision == "bf16"
    assert args.training_script == "rscaffold_flows.launch"


def test_fsdp_config_env():
    from accelerate.utils.constants import (
        FSDP_AUTO_WRAP_POLICY,
        FSDP_BACKWARD_PREFETCH,
        FSDP_SHARDING_STRATEGY,
        FSDP_STATE_DICT_TYPE,
    )
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _launch_args(ACCEL / "fsdp.yaml")
    assert args.use_fsdp and not args.use_deepspeed
    env = prepare_multi_gpu_env(args)  # what each process receives
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_SHARDING_STRATEGY"] in FSDP_SHARDING_STRATEGY
    assert env["FSDP_AUTO_WRAP_POLICY"] in FSDP_AUTO_WRAP_POLICY
    assert env["FSDP_BACKWARD_PREFETCH"] in FSDP_BACKWARD_PREFETCH
    assert env["FSDP_STATE_DICT_TYPE"] in FSDP_STATE_DICT_TYPE
    # the placeholder layer class is found in a Llama-style student (tiny / SmolLM2), the way
    # accelerate's transformer-based auto wrap looks it up
    from accelerate.utils.dataclasses import get_module_class_from_name
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            vocab_size=32,
        )
    )
    assert get_module_class_from_name(tiny, env["FSDP_TRANSFORMER_CLS_TO_WRAP"]) is not None


def test_deepspeed_config_args():
    args = _launch_args(ACCEL / "deepspeed_zero2.yaml")
    assert args.use_deepspeed and not args.use_fsdp
    assert int(args.zero_stage) == 2


# ---------------------------------------------------------------------------------------------
# the launch itself


def _write_config(path: Path, tiny_model_dir: Path, smollm2_dir: Path, artifacts: Path) -> Path:
    """The tiny pipeline's config as a YAML file, as the launch tests use it: keyword labels, two eval
    problems, the teacher's eight problems in one batch and one shard; no evaluation settings."""
    raw = tiny_config_dict(tiny_model_dir, smollm2_dir, artifacts)
    raw["problems"]["limit_eval"] = 2
    raw["teacher"]["llm"]["batch_size"] = 8
    del raw["teacher"]["shard_size"]
    raw["labeling"] = {"method": "keyword"}
    del raw["evaluation"]
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def upstream(tiny_model_dir, smollm2_dir, tmp_path_factory):
    """A config whose stages up to `dataset` are complete (produced in-process)."""
    tmp = tmp_path_factory.mktemp("launch")
    config = _write_config(tmp / "my.yaml", tiny_model_dir, smollm2_dir, tmp / "artifacts")
    cfg = load_config(config)
    fps = plan_fingerprints(cfg)
    run_upstream_stages(cfg, fps)
    return config, cfg, fps


def _accelerate_launch(config: Path, num_processes: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        # --cpu runs a single process whatever --num_processes says (multi-CPU needs mpirun);
        # --multi_gpu starts torchrun, whose processes fall back to CPU + gloo without a GPU.
        "--cpu" if num_processes == 1 else "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "rscaffold_flows.launch", "--config", str(config), *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _check_trained(cfg, fps) -> dict:
    sd = StageDir(cfg.run.artifacts_dir, "training", fps["training"])
    assert sd.is_complete(), f"no manifest in {sd.path}"
    manifest = sd.read_manifest()
    for name in TRAINED_STUDENTS:
        model = sd.path / manifest["outputs"][name]
        assert (model / "config.json").exists() and (model / STUDENT_META).exists()
        assert not (sd.path / name / "checkpoints").exists()  # keep_checkpoints is false
        assert json.loads((model / STUDENT_META).read_text())["metrics"]["steps"] == cfg.training.max_steps
    assert set(json.loads((sd.path / "train_metrics.json").read_text())) == set(TRAINED_STUDENTS)
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [1, 2])
def test_accelerate_launch_trains_the_stage(upstream, tmp_path, num_processes):
    config, cfg, _ = upstream
    # its own artifacts dir per run, holding a copy of the upstream stages
    artifacts = tmp_path / "artifacts"
    for stage in ("problems", "teacher", "labeling", "dataset"):
        shutil.copytree(Path(cfg.run.artifacts_dir) / stage, artifacts / stage, dirs_exist_ok=True)
    proc = _accelerate_launch(config, num_processes, "--artifacts-dir", str(artifacts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"training: scaffolded on {num_processes} process(es)" in proc.stderr
    cfg2 = load_config(config, {"run": {"artifacts_dir": str(artifacts)}})
    fps2 = plan_fingerprints(cfg2)
    manifest = _check_trained(cfg2, fps2)
    assert manifest["stage"] == "training" and manifest["inputs"] == {"dataset": fps2["dataset"]}
    # what `rscaffold run` does next: the pipeline's training stage finds the output complete
    from rscaffold.stages.training import run_training

    ref = run_training(cfg2, fps2, StageDir(artifacts, "dataset", fps2["dataset"]).ref())
    assert ref.path == str(StageDir(artifacts, "training", fps2["training"]).path)


def test_launch_requires_the_dataset_stage(tiny_model_dir, smollm2_dir, tmp_path, capsys):
    config = _write_config(tmp_path / "my.yaml", tiny_model_dir, smollm2_dir, tmp_path / "empty")
    assert launch_mod.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dataset stage" in err and "not complete" in err and "rscaffold stage dataset" in err
    assert not (tmp_path / "empty" / "training").exists()


@pytest.mark.slow
def test_the_training_task_launches_n_processes(upstream, tmp_path):
    """training.num_processes: 2 makes the flow's training task run `accelerate launch` itself (two
    CPU processes in a gloo group) and follow it."""
    from prefect.testing.utilities import prefect_test_harness
    from rscaffold_flows.pipeline import rscaffold_stage

    config, cfg, _ = upstream
    artifacts = tmp_path / "artifacts"
    for stage in ("problems", "teacher", "labeling", "dataset"):
        shutil.copytree(Path(cfg.run.artifacts_dir) / stage, artifacts / stage, dirs_exist_ok=True)
    cfg2 = load_config(config, {"run": {"artifacts_dir": str(artifacts)}, "training": {"num_processes": 2}})
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    launch_log = logging.getLogger("rscaffold.tasks.launch")  # (Prefect reconfigures the root logger)
    launch_log.addHandler(handler)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            refs = rscaffold_stage(config=cfg2, stage="training")
    finally:
        launch_log.removeHandler(handler)
    assert any("training: scaffolded on 2 process(es)" in line for line in lines), lines[-20:]
    fps2 = plan_fingerprints(cfg2)
    assert refs["training"]["path"] == str(StageDir(artifacts, "training", fps2["training"]).path)
    _check_trained(cfg2, fps2)


def test_a_failed_launch_fails_the_task_with_its_output(upstream, tmp_path):
    from rscaffold_tasks._launch import LaunchFailedError, launch_training

    _, cfg, fps = upstream
    broken = cfg.model_copy(deep=True)
    broken.run.artifacts_dir = str(tmp_path / "empty")  # the dataset stage is missing there
    broken.training.num_processes = 2
    with pytest.raises(LaunchFailedError, match="dataset stage for this config is not complete"):
        launch_training(broken, fps)
