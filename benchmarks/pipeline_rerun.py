"""Cold run vs fully cached re-run of the whole Prefect flow, measured in one process.

Runs the real pipeline flow (all six stages) twice on the same config and prints both wall times
and their ratio; the second run should hit Prefect's cache for every stage. By default it uses a
tiny random-init model (seconds per stage); ``--default`` runs the embedded default config
instead (SmolLM2-135M, minutes).

    .venv/bin/python benchmarks/pipeline_rerun.py [--default] [--artifacts-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_config(artifacts: Path):
    from rscaffold.config import TinyModelConfig, config_from_dict
    from rscaffold.models import save_tiny_model
    from rscaffold.paths import default_model_dir

    smol = default_model_dir()
    if not (smol / "config.json").exists():
        sys.exit(f"SmolLM2 tokenizer not prepared at {smol}: run `rscaffold models fetch`")
    teacher = save_tiny_model(str(smol), TinyModelConfig(), artifacts.parent / "tiny-teacher")
    data = ROOT / "data" / "problems"
    return config_from_dict(
        {
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
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default", action="store_true", help="use the embedded default config (minutes)")
    ap.add_argument("--artifacts-dir", type=Path, default=None)
    args = ap.parse_args()

    from rscaffold_flows.pipeline import rscaffold_pipeline

    from rscaffold.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="rscaffold-rerun-"))
    artifacts = args.artifacts_dir or tmp / "artifacts"
    if args.default:
        cfg = load_config(overrides={"run": {"artifacts_dir": str(artifacts)}})
    else:
        cfg = tiny_config(artifacts)

    t0 = time.perf_counter()
    rscaffold_pipeline(config=cfg)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    rscaffold_pipeline(config=cfg)
    cached = time.perf_counter() - t0
    # Both numbers include the flow's own overhead (Prefect API calls for six task runs); the
    # temporary server was already started by the first run.
    print(f"config: {'embedded default' if args.default else 'tiny random-init model'}; artifacts: {artifacts}")
    print(f"cold run     {cold:8.2f} s")
    print(f"cached rerun {cached:8.2f} s")
    print(f"ratio cached/cold {cached / cold:.4f}")


if __name__ == "__main__":
    main()
