"""Cold run vs re-runs of the whole pipeline, each through the ``rscaffold`` command line.

Runs ``rscaffold run`` once cold, then again with nothing changed, then once per change that must
not cost teacher or labeler requests: execution settings, ``teacher.keep``, ``problems.limit_eval``,
a comment in a module the teacher imports, a package upgrade, and a forced recomputation of the
teacher. Every run is a new process, as a user runs it, so the wall time includes the start-up
(imports, computing fingerprints, Prefect's temporary server). It also times
``rscaffold fingerprints``.

The LLM requests a run sent (what reached a model, not the request cache) are read from the
request summaries of the teacher and labeling stages it computed (their manifests); a re-run after
a change that must not cost requests and yet sent one fails the benchmark (exit status 1).
A change that alters a later stage's output re-runs that stage (e.g. ``problems.limit_eval``
re-evaluates on the new problems), which its ratio includes. By default a tiny random-init model
(seconds per stage); ``--default`` runs the embedded default config (SmolLM2-135M, minutes).

    .venv/bin/python benchmarks/pipeline_rerun.py [--default] [--artifacts-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The share of a cold run a fully cached re-run may take.
CACHED_GOAL = 0.02


def tiny_config(artifacts: Path) -> dict:
    from rscaffold.config import TinyModelConfig
    from rscaffold.models import save_tiny_model
    from rscaffold.paths import default_model_dir

    smol = default_model_dir()
    if not (smol / "config.json").exists():
        sys.exit(f"SmolLM2 tokenizer not prepared at {smol}: run `rscaffold models fetch`")
    teacher = save_tiny_model(str(smol), TinyModelConfig(), artifacts.parent / "tiny-teacher")
    data = ROOT / "data" / "problems"
    return {
        "run": {"artifacts_dir": str(artifacts), "retries": 0},
        "problems": {
            "train": str(data / "train.jsonl"),
            "eval": str(data / "eval.jsonl"),
            "limit_train": 16,
            "limit_eval": 8,
        },
        "teacher": {
            "llm": {"model": str(teacher), "batch_size": 8},
            "sampling": {"max_new_tokens": 32, "temperature": 1.0, "seed": 1},
        },
        "labeling": {"sampling": {"max_new_tokens": 32}},
        "training": {
            "tiny": {},
            "tokenizer": str(smol),
            "student": str(smol),
            "max_steps": 4,
            "per_device_batch_size": 4,
            "max_length": 192,
        },
        "evaluation": {"max_new_tokens": 16, "guided": {"max_steps": 3, "max_step_tokens": 8}},
    }


def rscaffold_command() -> list[str]:
    """The console script next to this interpreter (as a user runs it), else ``python -m``."""
    script = Path(sys.executable).with_name("rscaffold")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rscaffold_flows.cli"]


def requests_sent(artifacts: Path, since: float) -> int:
    """LLM requests sent by the teacher and labeling stages computed since ``since``, from the
    request summaries in their manifests (the stages run in child processes of the run)."""
    sent = 0
    for stage in ("teacher", "labeling"):
        for manifest in (artifacts / stage).glob("*/manifest.json"):
            m = json.loads(manifest.read_text())
            if m.get("finished_at", 0) >= since:
                sent += ((m.get("summary") or {}).get("requests") or {}).get("sent", 0)
    return sent


def main() -> None:  # noqa: PLR0915 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default", action="store_true", help="use the embedded default config (minutes)")
    ap.add_argument("--artifacts-dir", type=Path, default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rscaffold-rerun-"))
    artifacts = (args.artifacts_dir or tmp / "artifacts").resolve()
    config = tmp / "config.yaml"
    if args.default:
        base = ["--artifacts-dir", str(artifacts)]
        from rscaffold.config import load_config

        cfg = load_config()
        keep_default, limit_eval = cfg.teacher.keep, cfg.problems.limit_eval
    else:
        data = tiny_config(artifacts)
        config.write_text(yaml.safe_dump(data))
        base = ["--config", str(config)]
        keep_default, limit_eval = "all", data["problems"]["limit_eval"]
    cli = rscaffold_command()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def timed(*extra: str, command: str = "run") -> tuple[float, int]:
        t0 = time.time()
        p0 = time.perf_counter()
        proc = subprocess.run([*cli, command, *base, *extra], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - p0
        if proc.returncode:
            sys.exit(f"`rscaffold {command} {' '.join(extra)}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return seconds, requests_sent(artifacts, t0)

    fingerprint_times = [timed(command="fingerprints")[0] for _ in range(3)]
    cold, cold_requests = timed()
    rows = [("nothing changed", *timed())]
    for path, value in (
        ("teacher.llm.concurrency", 3),
        ("teacher.llm.batch_size", 2),
        ("teacher.shard_size", 5),
        ("teacher.max_failure_rate", 0.25),
        ("problems.limit_eval", (limit_eval or 20) - 1),
    ):
        rows.append((f"{path} = {value!r}", *timed("--set", f"{path}={value}")))
    # keep=correct leaves a random-init teacher no trace to train on, so this one runs the stages
    # up to labeling (the one that re-runs: it labels the kept traces)
    keep = "correct" if keep_default == "all" else "all"
    rows.append(
        (
            f"teacher.keep = {keep!r} (up to labeling)",
            *timed("labeling", "--set", f"teacher.keep={keep}", command="stage"),
        )
    )

    # a comment in a module the teacher imports, and a new package version (files restored afterwards)
    answers = ROOT / "rscaffold" / "evalsets" / "answers.py"
    init = ROOT / "rscaffold" / "__init__.py"
    original_answers, original_init = answers.read_text(), init.read_text()
    try:
        answers.write_text(original_answers + "\n# a comment added by benchmarks/pipeline_rerun.py\n")
        rows.append(("a comment in rscaffold/evalsets/answers.py", *timed()))
        answers.write_text(original_answers)
        init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "99.0.0"', original_init))
        rows.append(("the package upgraded (__version__)", *timed()))
    finally:
        answers.write_text(original_answers)
        init.write_text(original_init)
    rows.append(("--refresh teacher (forced recomputation)", *timed("--refresh", "teacher")))

    fp = sorted(fingerprint_times)[1]
    print(f"config: {'embedded default' if args.default else 'tiny random-init model'}; artifacts: {artifacts}")
    print(f"`rscaffold fingerprints`: {fp:.2f} s (median of 3, process start-up included)")
    print(f"cold run: {cold:.2f} s, {cold_requests} LLM requests sent (teacher + labeler)")
    print(f"{'re-run after':52s} {'wall s':>8s} {'ratio':>7s} {'requests':>9s}")
    for name, seconds, sent in rows:
        print(f"{name:52s} {seconds:8.2f} {seconds / cold:7.3f} {sent:9d}")
    cached = rows[0][1] / cold
    print(f"fully cached re-run: {cached:.3f} of the cold run (goal <= {CACHED_GOAL})")
    resent = [name for name, _, sent in rows if sent]
    if resent:
        sys.exit(f"FAIL: requests were sent again after changes that must not cost any: {resent}")


if __name__ == "__main__":
    main()
