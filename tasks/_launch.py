"""Training on N processes from the training task: ``accelerate launch`` of the multi-GPU entry
point (``python -m rscaffold_flows.launch``), followed line by line.

The launched processes train into the same content-addressed stage directory as a one-process
run (the stage function is process-aware: every process trains, the main one writes), so the
task returns the same reference. A failed launch fails the task with the launch's last output; a
retried task launches again, and the processes resume from the checkpoints.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rscaffold.config import PipelineConfig
from rscaffold.stages.common import stage_dir
from rscaffold.store import StageRef

log = logging.getLogger("rscaffold.tasks.launch")


class LaunchFailedError(RuntimeError):
    """``accelerate launch`` of the training stage exited with an error."""


def launch_command(config_file: Path, config: PipelineConfig, *, force: bool = False, fresh: bool = False) -> list[str]:
    """The ``accelerate launch`` command line for ``config``'s training stage."""
    t = config.training
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        cmd += ["--config_file", t.accelerate_config]
    elif t.num_processes > 1:
        # Plain data parallelism; without GPUs the processes form a gloo group on the CPU.
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(t.num_processes), "--num_machines", str(t.num_machines)]
    if not t.accelerate_config:
        cmd += ["--main_process_port", "0"]
    cmd += ["-m", "rscaffold_flows.launch", "--config", str(config_file)]
    cmd += ["--artifacts-dir", str(config.run.artifacts_root)]
    return cmd + (["--force"] if force else []) + (["--fresh"] if fresh else [])


def launch_training(
    config: PipelineConfig, fps: dict[str, str], *, force: bool = False, fresh: bool = False
) -> StageRef:
    """Run the training stage under ``accelerate launch`` and return its reference."""
    with tempfile.TemporaryDirectory(prefix="rscaffold-launch-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        cmd = launch_command(config_file, config, force=force, fresh=fresh)
        log.info("training: %s", " ".join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        tail: collections.deque[str] = collections.deque(maxlen=60)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                if line:
                    log.info("launch: %s", line)
            code = proc.wait()
    if code != 0:
        raise LaunchFailedError(f"accelerate launch of the training stage exited with {code}:\n" + "\n".join(tail))
    sd = stage_dir(config, "training", fps)
    if not sd.is_complete():
        raise LaunchFailedError(f"the launch ended but the training stage is not complete at {sd.path}")
    return sd.ref()
