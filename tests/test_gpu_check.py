"""benchmarks/gpu_check.py, the GPU check a user runs on a GPU, at tiny shapes on CPU, so that it
cannot rot: every part runs, prints its figures and passes (vLLM's part skips without vLLM)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_every_part_at_tiny_shapes(smollm2_dir):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--tokenizer", str(smollm2_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    status = {part: s for s, part in re.findall(r"^\[(PASS|FAIL|SKIP)\] (\w)\.", out, flags=re.M)}
    assert status == {"a": "PASS", "b": "PASS", "c": "PASS", "d": "PASS", "e": "SKIP"} or (
        status.keys() == set("abcde") and status["e"] == "PASS"
    ), out
    for figure in ("scaffolded/plain step time", "signal rows changed", "guided/plain tokens/s", "child peak GiB"):
        assert figure in out, out
