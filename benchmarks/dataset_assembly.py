"""Dataset assembly at scale: the row-by-row assembly (rscaffold up to d4881ad) versus polars.

Synthetic teacher traces and labeled steps (30 steps per trace, two samples per problem, 2% failed
traces, a third incorrect; step texts of 60-180 characters) are written as the teacher and
labeling stages write them, at 10^5 and 10^6 labeled-step rows. Each implementation then does the
dataset stage's work: read both Parquet files, filter, group the steps by trace, join, split by
problem, write ``examples.parquet`` (the ExampleRecord schema) and compute the statistics.

Each run is a fresh Python process (same imports for both), so its peak resident memory (the
kernel's high-water mark ``VmHWM``, which unlike ``ru_maxrss`` is not inherited from the parent
across ``exec``) is its own; wall time is measured inside it, after the imports. The two outputs are
compared: the same table, row for row (the row-by-row version uses the same split function, so
only the assembly differs).

    .venv/bin/python benchmarks/dataset_assembly.py [--sizes 100000 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

SIGNALS = [
    "Reasoning and Analysis",
    "Addition and Elaboration",
    "Contrast and Concession",
    "Verification and Reflection",
    "Hypothesis and Exploration",
    "Restatement and Clarification",
    "Conclusion and Summary",
]
STEPS_PER_TRACE = 30
SAMPLES_PER_PROBLEM = 2


# ---------------------------------------------------------------------------------------------
# synthetic inputs


def make_inputs(n_steps: int, folder: Path) -> tuple[Path, Path]:
    """``traces.parquet`` and ``labeled_steps.parquet`` with about ``n_steps`` step rows."""
    import numpy as np
    import polars as pl

    from rscaffold.records import LabeledStepRecord, TraceRecord
    from rscaffold.store import write_table

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_traces = n_steps // STEPS_PER_TRACE
    t = np.arange(n_traces)
    problem = t // SAMPLES_PER_PROBLEM
    status = np.where(rng.random(n_traces) < 0.02, "failed", "ok")
    correct = rng.random(n_traces) < 0.67
    traces = pl.DataFrame(
        {
            "trace_id": [f"p{p:07d}#{s}" for p, s in zip(problem, t % SAMPLES_PER_PROBLEM)],
            "problem_id": [f"p{p:07d}" for p in problem],
            "sample_index": (t % SAMPLES_PER_PROBLEM).astype("int64"),
            "question": [f"Problem {p}: a train leaves at {p % 12} o'clock at {p % 90 + 10} km/h ..." for p in problem],
            "gold_answer": [str(p % 1000) for p in problem],
            "text": ["The answer is 4." for _ in t],
            "predicted_answer": [str(p % 1000) if c else str(p % 7) for p, c in zip(problem, correct)],
            "correct": correct,
            "status": status,
            "backend": "openai",
            "model": "teacher",
        }
    ).with_columns(
        pl.lit(False).alias("truncated"),
        pl.lit("stop").alias("finish_reason"),
        pl.lit(None, dtype=pl.String).alias("reasoning"),
        pl.lit(None, dtype=pl.String).alias("error"),
        pl.lit(300).alias("prompt_tokens"),
        pl.lit(900).alias("completion_tokens"),
        pl.lit(1.5).alias("latency_s"),
    )
    traces_path = write_table(folder / "traces.parquet", traces, TraceRecord)

    ok = t[status == "ok"]
    trace_ids = traces.get_column("trace_id").to_numpy()
    rows = np.repeat(ok, STEPS_PER_TRACE)
    index = np.tile(np.arange(STEPS_PER_TRACE), len(ok))
    lengths = rng.integers(60, 180, len(rows))
    filler = "We compute the distance from the speed and the time, then check the units carefully. " * 3
    signal = rng.integers(0, len(SIGNALS), len(rows))
    steps = pl.DataFrame(
        {
            "trace_id": trace_ids[rows],
            "problem_id": traces.get_column("problem_id").to_numpy()[rows],
            "step_index": index.astype("int64"),
            "text": [f"Step {i}: {filler[:n]}" for i, n in zip(index, lengths)],
            "prelabel": [SIGNALS[s] if s % 3 else None for s in signal],
            "cue": [None] * len(rows),
            "signal": [SIGNALS[s] for s in signal],
            "source": np.where(signal % 3 == 0, "llm", "keyword"),
            "rationale": [None] * len(rows),
        },
        schema_overrides={"cue": pl.String, "rationale": pl.String},
    )
    steps_path = write_table(folder / "labeled_steps.parquet", steps, LabeledStepRecord)
    return traces_path, steps_path


# ---------------------------------------------------------------------------------------------
# the row-by-row assembly of rscaffold up to d4881ad (rscaffold/dataset.py and the dataset stage),
# with the library's split function so that both produce the same rows


def rows_stage(traces_path: Path, steps_path: Path, out: Path, *, cfg, keep: str) -> dict:
    from rscaffold.dataset import select_traces, validation_problems
    from rscaffold.records import ExampleRecord, LabeledStepRecord, Step, TraceRecord
    from rscaffold.store import read_records, write_records

    traces, _ = select_traces(read_records(traces_path, TraceRecord), keep)
    steps = read_records(steps_path, LabeledStepRecord)
    by_trace: dict[str, list[LabeledStepRecord]] = defaultdict(list)
    for s in steps:
        by_trace[s.trace_id].append(s)
    dropped: Counter[str] = Counter()
    rows = []
    for t in traces:
        ts = sorted(by_trace.get(t.trace_id, []), key=lambda s: s.step_index)
        if t.status != "ok":
            dropped["failed"] += 1
        elif cfg.only_correct and not t.correct:
            dropped["incorrect"] += 1
        elif len(ts) < cfg.min_steps:
            dropped["too_few_steps"] += 1
        else:
            rows.append((t, ts))
    validation = validation_problems({t.problem_id for t, _ in rows}, cfg.validation_fraction, cfg.seed)
    examples = [
        ExampleRecord(
            trace_id=t.trace_id,
            problem_id=t.problem_id,
            split="validation" if t.problem_id in validation else "train",
            question=t.question,
            gold_answer=t.gold_answer,
            teacher_answer=t.predicted_answer,
            correct=t.correct,
            steps=[Step(index=s.step_index, signal=s.signal, text=s.text, source=s.source) for s in ts],
            signals=[s.signal for s in ts],
            n_steps=len(ts),
            answer_text=t.text.strip() or None,
        )
        for t, ts in rows
    ]
    examples.sort(key=lambda e: (e.split, e.problem_id, e.trace_id))
    write_records(out, examples, ExampleRecord)
    signals: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for e in examples:
        signals.update(e.signals)
        sources.update(s.source for s in e.steps)
    n = len(examples)
    return {
        "rows": n,
        "splits": dict(sorted(Counter(e.split for e in examples).items())),
        "problems": len({e.problem_id for e in examples}),
        "mean_steps": round(sum(e.n_steps for e in examples) / n, 3) if n else 0.0,
        "signal_counts": {name: signals.get(name, 0) for name in SIGNALS},
        "label_sources": dict(sorted(sources.items())),
        "teacher_accuracy": round(sum(1 for e in examples if e.correct) / n, 4) if n else 0.0,
    }


def polars_stage(traces_path: Path, steps_path: Path, out: Path, *, cfg, keep: str) -> dict:
    from rscaffold.dataset import assemble_examples, dataset_stats
    from rscaffold.records import ExampleRecord
    from rscaffold.store import write_table

    examples, _ = assemble_examples(traces_path, steps_path, cfg, keep=keep)
    write_table(out, examples, ExampleRecord)
    return dataset_stats(examples, SIGNALS)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux: VmHWM; elsewhere ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def worker(impl: str, traces_path: Path, steps_path: Path, *, out: Path) -> None:
    # the same imports for both, before the clock starts
    import polars  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import rscaffold.dataset  # noqa: F401
    import rscaffold.store  # noqa: F401
    from rscaffold.config import DatasetConfig

    base_mb = peak_rss_mb()
    cfg = DatasetConfig(validation_fraction=0.1, seed=0)
    t0 = time.perf_counter()
    stage = rows_stage if impl == "rows" else polars_stage
    stats = stage(traces_path, steps_path, out, cfg=cfg, keep="all")
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "peak_mb": peak_rss_mb(), "imports_mb": base_mb, "stats": stats}))


def run_worker(impl: str, traces_path: Path, steps_path: Path, *, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(traces_path), str(steps_path), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="labeled-step rows")
    p.add_argument("--workdir", type=Path, default=None, help="where the synthetic inputs go (default: a temp dir)")
    p.add_argument("--worker", nargs=4, metavar=("IMPL", "TRACES", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, traces, steps, out = args.worker
        worker(impl, Path(traces), Path(steps), out=Path(out))
        return 0

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = []
        for n in args.sizes:
            folder = Path(tmp) / f"n{n}"
            traces_path, steps_path = make_inputs(n, folder)
            n_rows = pq.read_metadata(steps_path).num_rows
            measured = {
                impl: run_worker(impl, traces_path, steps_path, out=folder / f"{impl}.parquet")
                for impl in ("rows", "polars")
            }
            same = pq.read_table(folder / "rows.parquet").equals(
                pq.read_table(folder / "polars.parquet"), check_metadata=True
            )
            same_stats = measured["rows"]["stats"] == measured["polars"]["stats"]
            results.append((n_rows, measured, same and same_stats))
            print(f"... {n_rows} step rows done", file=sys.stderr, flush=True)

    print(f"{'step rows':>10} {'impl':>7} {'wall s':>8} {'peak MB':>8} {'imports MB':>10} {'examples':>9}")
    for n_rows, measured, _ in results:
        for impl, m in measured.items():
            print(
                f"{n_rows:>10} {impl:>7} {m['wall_s']:>8.2f} {m['peak_mb']:>8.0f} {m['imports_mb']:>10.0f} {m['stats']['rows']:>9}"
            )
    print()
    for n_rows, measured, same in results:
        r, pl_ = measured["rows"], measured["polars"]
        print(
            f"{n_rows} step rows: polars {r['wall_s'] / pl_['wall_s']:.1f}x faster, "
            f"peak memory {pl_['peak_mb'] / r['peak_mb']:.2f}x of row-by-row "
            f"(above imports: {(pl_['peak_mb'] - pl_['imports_mb']) / max(r['peak_mb'] - r['imports_mb'], 1):.2f}x); "
            f"same output: {same}"
        )
    return 0 if all(same for *_, same in results) else 1


if __name__ == "__main__":
    sys.exit(main())
