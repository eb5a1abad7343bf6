"""Cold run vs re-runs of the whole Prefect flow, measured in one process.

Runs the real pipeline flow (all six stages) once cold, then again with nothing changed, then once
per change that must not cost teacher or labeler requests (issue "Never pay twice"): execution
settings, ``teacher.keep``, ``problems.limit_eval``, a comment in a module the teacher imports, a
package upgrade, and a forced recomputation of the teacher. For each it prints the wall time as a
ratio of the cold run's and the LLM requests sent (what reached the model, not the request cache).
A change that alters a later stage's output re-runs that stage (e.g. ``problems.limit_eval``
re-evaluates on the new problems), which its ratio includes. By default a tiny random-init model
(seconds per stage); ``--default`` runs the embedded default config (SmolLM2-135M, minutes).

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


class RequestCounter:
    """Counts the LLM requests that reach a model (sent past the request cache), process-wide."""

    def __init__(self) -> None:
        from rscaffold.llm import cache

        self.sent = 0
        original = cache.CachedBackend.generate
        counter = self

        def counting(backend, requests, sampling, on_result=None):  # noqa: PLR0917 - a method: self first
            before = backend.stats.sent
            try:
                return original(backend, requests, sampling, on_result)
            finally:
                counter.sent += backend.stats.sent - before

        cache.CachedBackend.generate = counting

    def take(self) -> int:
        n, self.sent = self.sent, 0
        return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default", action="store_true", help="use the embedded default config (minutes)")
    ap.add_argument("--artifacts-dir", type=Path, default=None)
    args = ap.parse_args()

    from rscaffold_flows.pipeline import rscaffold_pipeline, rscaffold_stage

    import rscaffold
    from rscaffold.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="rscaffold-rerun-"))
    artifacts = args.artifacts_dir or tmp / "artifacts"
    if args.default:
        cfg = load_config(overrides={"run": {"artifacts_dir": str(artifacts)}})
    else:
        cfg = tiny_config(artifacts)
    counter = RequestCounter()

    def timed(config, **kw) -> tuple[float, int]:
        t0 = time.perf_counter()
        rscaffold_pipeline(config=config, **kw)
        return time.perf_counter() - t0, counter.take()

    cold, cold_requests = timed(cfg)
    rows = [("nothing changed", *timed(cfg))]

    def changed(path: str, value):
        c = cfg.model_copy(deep=True)
        *parents, last = path.split(".")
        target = c
        for p in parents:
            target = getattr(target, p)
        setattr(target, last, value)
        return c

    for path, value in (
        ("teacher.llm.concurrency", 3),
        ("teacher.llm.batch_size", 2),
        ("teacher.shard_size", 5),
        ("teacher.max_failure_rate", 0.25),
        ("problems.limit_eval", (cfg.problems.limit_eval or 20) - 1),
    ):
        rows.append((f"{path} = {value!r}", *timed(changed(path, value))))
    # keep=correct leaves a random-init teacher no trace to train on, so this one runs the stages
    # up to labeling (the one that re-runs: it labels the kept traces)
    keep = "correct" if cfg.teacher.keep == "all" else "all"
    t0 = time.perf_counter()
    rscaffold_stage(config=changed("teacher.keep", keep), stage="labeling")
    rows.append((f"teacher.keep = {keep!r} (up to labeling)", time.perf_counter() - t0, counter.take()))

    # a comment in a module the teacher imports (the file is restored afterwards)
    answers = ROOT / "rscaffold" / "evalsets" / "answers.py"
    original = answers.read_text()
    try:
        answers.write_text(original + "\n# a comment added by benchmarks/pipeline_rerun.py\n")
        from rscaffold import code_version

        code_version.module_digest.cache_clear()
        code_version._tree.cache_clear()
        rows.append(("a comment in rscaffold/evalsets/answers.py", *timed(cfg)))
    finally:
        answers.write_text(original)
    version = rscaffold.__version__
    rscaffold.__version__ = "99.0.0"
    rows.append(("the package upgraded (__version__)", *timed(cfg)))
    rscaffold.__version__ = version
    rows.append(("--refresh teacher (forced recomputation)", *timed(cfg, refresh=["teacher"])))

    # Every number includes the flow's own overhead (Prefect API calls for six task runs); the
    # temporary server was already started by the first run.
    print(f"config: {'embedded default' if args.default else 'tiny random-init model'}; artifacts: {artifacts}")
    print(f"cold run: {cold:.2f} s, {cold_requests} LLM requests sent (teacher + labeler)")
    print(f"{'re-run after':52s} {'wall s':>8s} {'ratio':>7s} {'requests':>9s}")
    for name, seconds, sent in rows:
        print(f"{name:52s} {seconds:8.2f} {seconds / cold:7.3f} {sent:9d}")


if __name__ == "__main__":
    main()
