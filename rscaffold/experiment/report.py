"""The experiment's report, from the cells' evaluation outputs: a tidy Parquet table, a table in the
shape of a paper's main table (rows: models and ablations; columns: benchmarks), the paired tests
per seed, a Markdown report and a plot.

A row of the main table is a *model variant*: an evaluated model apart from its seed. Cells that
differ only in settings a model does not depend on (a baseline across values of the signal-loss
weight) evaluate the same variant; it is shown once, labeled by the axes it does depend on.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from rscaffold.config import PipelineConfig, fingerprint_view
from rscaffold.experiment.grid import Cell, Experiment, axis_label
from rscaffold.experiment.stats import aggregate_seeds, compare_to_reference
from rscaffold.markdown import table as md_table
from rscaffold.store import fingerprint, write_text
from rscaffold.vocabulary import BENCHMARK_NAMES, EVAL_MODELS, student_of

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.parquet"
REPORT_FILE = "report.md"
PLOT_FILE = "accuracy.png"


def model_variant(cfg: PipelineConfig, model: str) -> str:
    """The identity of an evaluated model apart from its training seed: what its student depends
    on (:func:`rscaffold.stages.training.student_fingerprint` with the seed left out) and how it is
    evaluated (a plain model's without the guided-decoding settings it does not use)."""
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.training import student_fingerprint

    unseeded = cfg.model_copy(deep=True)
    unseeded.training.seed = 0
    fps = plan_fingerprints(unseeded)
    student = student_of(model)
    if student == "base":
        t = unseeded.training
        student_key = fingerprint("base", t.student, t.student_gguf_file, t.tokenizer, t.tiny)
    else:
        student_key = student_fingerprint(unseeded, fps["dataset"], student)
    evaluation = fingerprint_view(cfg.evaluation)
    if student != "scaffolded":
        evaluation.pop("guided")
    return fingerprint("variant", model, student_key, evaluation, fps["problems"])


def seed_axes(experiment: Experiment) -> list[str]:
    """The axes that only set ``training.seed``."""
    out = []
    for name, values in experiment.spec.axes.items():
        keys = {k for s in values.values() for k in s} if isinstance(values, dict) else {name}
        if keys == {"training.seed"}:
            out.append(name)
    return out


def variant_labels(
    experiment: Experiment, cells: list[Cell], models: list[str]
) -> dict[tuple[str, str], tuple[str, str]]:
    """(cell id, model) -> (variant key, row label): the model's name and the values of the axes
    its variant depends on (an axis it depends on: two cells that differ only in it evaluate
    different variants)."""
    axes = experiment.axes
    keys = {(c.id, m): model_variant(c.config, m) for c in cells for m in models if m in c.config.evaluation.models}
    relevant: dict[str, list[str]] = {}
    for m in models:
        rel = []
        for a in axes:
            for c1 in cells:
                for c2 in cells:
                    if (c1.id, m) not in keys or (c2.id, m) not in keys or c1.values[a] == c2.values[a]:
                        continue
                    if (
                        all(c1.values[o] == c2.values[o] for o in axes if o != a)
                        and keys[(c1.id, m)] != keys[(c2.id, m)]
                    ):
                        rel.append(a)
                        break
                if a in rel:
                    break
        relevant[m] = rel
    out = {}
    for c in cells:
        for m in models:
            if (c.id, m) not in keys:
                continue
            shown = ", ".join(f"{axis_label(a, axes)}={_text(c.values[a])}" for a in relevant[m])
            out[(c.id, m)] = (keys[(c.id, m)], f"{m} ({shown})" if shown else m)
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _axis_columns(experiment: Experiment, cells: list[Cell]) -> pl.DataFrame:
    data: dict[str, list[Any]] = {"cell": [c.id for c in cells]}
    for a in experiment.axes:
        values = [c.values[a] for c in cells]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and all(isinstance(v, int) for v in values):
            data[a] = [int(v) for v in values]  # seeds and other integer axes stay integers
        else:
            data[a] = [float(v) for v in values] if numeric else [_text(v) for v in values]
    return pl.DataFrame(data)


def collect_predictions(
    experiment: Experiment, evaluations: Mapping[str, str | Path]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every prediction of the cells whose evaluation directory is given (cell id -> directory),
    with cell, seed, group (the model variant) and label columns; and the per-model metrics."""
    cells = [c for c in experiment.cells if c.id in evaluations]
    models = [m for m in EVAL_MODELS if any(m in c.config.evaluation.models for c in cells)]
    labels = variant_labels(experiment, cells, models)
    preds, metrics = [], []
    for c in cells:
        d = Path(evaluations[c.id])
        p = pl.read_parquet(d / "predictions.parquet").select("model", "benchmark", "problem_id", "correct")
        m = pl.read_parquet(d / "metrics.parquet").select("model", "benchmark", "ci_low", "ci_high")
        extra = [pl.lit(c.id).alias("cell"), pl.lit(int(c.config.training.seed)).alias("seed")]
        mine = [(model, key, label) for (cell, model), (key, label) in labels.items() if cell == c.id]
        groups = pl.DataFrame(mine, schema=["model", "group", "label"], orient="row")
        preds.append(p.with_columns(extra).join(groups, on="model", how="left"))
        metrics.append(m.with_columns(pl.lit(c.id).alias("cell"), pl.lit(str(d)).alias("evaluation_dir")))
    return pl.concat(preds), pl.concat(metrics)


def _order(df: pl.DataFrame) -> pl.DataFrame:
    model_rank = {m: i for i, m in enumerate(EVAL_MODELS)}
    bench_rank = {b: i for i, b in enumerate(BENCHMARK_NAMES)}
    return df.with_columns(
        _m=pl.col("model").replace_strict(model_rank, default=len(model_rank)),
        _b=pl.col("benchmark").replace_strict(bench_rank, default=len(bench_rank)),
    )


def build_results(experiment: Experiment, evaluations: Mapping[str, str | Path]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the tidy table: one row per cell x model x benchmark x seed; the seed summary: one row per
    model variant x benchmark)."""
    spec = experiment.spec
    preds, metrics = collect_predictions(experiment, evaluations)
    stats = dict(samples=spec.bootstrap_samples, seed=spec.bootstrap_seed, confidence=spec.confidence)
    cmp = compare_to_reference(preds, spec.reference, **stats)
    labels = preds.select("cell", "model", "label").unique()
    cells = [c for c in experiment.cells if c.id in evaluations]
    results = (
        cmp.join(labels, on=["cell", "model"], how="left")
        .join(metrics, on=["cell", "model", "benchmark"], how="left")
        .join(_axis_columns(experiment, cells), on="cell", how="left")
        .with_columns(pl.lit(experiment.name).alias("experiment"))
    )
    cell_rank = {c.id: i for i, c in enumerate(experiment.cells)}
    results = (
        _order(results)
        .with_columns(_c=pl.col("cell").replace_strict(cell_rank))
        .sort("_c", "_m", "_b")
        .drop("_c", "_m", "_b")
    )
    first = ["experiment", "cell", *experiment.axes, "seed", "label", "model", "benchmark"]
    results = results.select(*first, *[c for c in results.columns if c not in first])
    summary = aggregate_seeds(preds, cmp, **stats)
    group_label = preds.select("group", "label").unique(subset="group", keep="first")
    summary = summary.join(group_label, on="group", how="left")
    first_cell = results.group_by("label", maintain_order=True).agg(pl.col("cell").first())
    summary = (
        _order(summary.join(first_cell, on="label", how="left"))
        .with_columns(_c=pl.col("cell").replace_strict(cell_rank))
        .sort("_m", "_c", "_b")
        .drop("_c", "_m", "_b", "cell")
    )
    return results, summary


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def main_table(summary: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The paper-shaped table: one row per model variant, one column per benchmark, each cell
    ``accuracy ± sd (Δ to the reference [interval])`` in %."""
    benches = sorted(summary["benchmark"].unique().to_list(), key=lambda b: (b not in BENCHMARK_NAMES, b))
    rows: list[list[str]] = []
    by = {(r["label"], r["benchmark"]): r for r in summary.iter_rows(named=True)}
    for label in summary["label"].unique(maintain_order=True).to_list():
        line = [label]
        for b in benches:
            r = by.get((label, b))
            if r is None:
                line.append("–")
                continue
            acc = _pct(r["accuracy_mean"]) + (f" ± {_pct(r['accuracy_sd'])}" if r["accuracy_sd"] is not None else "")
            if r["diff_mean"] is None:
                line.append(f"{acc} (reference)")
            else:
                ci = f"[{_pct(r['diff_ci_low'], True)}, {_pct(r['diff_ci_high'], True)}]"
                line.append(f"{acc} ({_pct(r['diff_mean'], True)} {ci})")
        rows.append(line)
    return ["model", *benches], rows


def render_markdown(experiment: Experiment, results: pl.DataFrame, summary: pl.DataFrame, *, plot: str | None) -> str:
    spec = experiment.spec
    n_cmp = results["n_comparisons"].drop_nulls()
    m = int(n_cmp[0]) if len(n_cmp) else 0
    seeds = sorted(results["seed"].unique().to_list())
    level = f"{100 * spec.confidence:g}%"
    lines = [
        f"# Experiment {experiment.name}",
        "",
        f"{results['cell'].n_unique()} cell(s) over the axes {', '.join(f'`{a}`' for a in experiment.axes)}; "
        f"seeds {seeds}. Reference model: `{spec.reference}`.",
        "",
        "## Accuracy",
        "",
        f"Accuracy in % (mean ± standard deviation over seeds), and in parentheses the difference to "
        f"`{spec.reference}` in points with its {level} paired bootstrap interval (problems resampled, "
        f"{spec.bootstrap_samples} resamples, the difference averaged over seeds).",
        "",
    ]
    headers, rows = main_table(summary)
    lines += md_table(headers, rows)
    if plot:
        lines += ["", f"![accuracy by setting]({plot})"]
    lines += [
        "",
        "## Paired tests per seed",
        "",
        f"Exact McNemar test of each model against `{spec.reference}` in the same cell (b: only the model "
        f"right, c: only the reference right); p (Holm): Holm's correction over all {m} comparisons.",
        "",
    ]
    tests = results.filter(pl.col("p_mcnemar").is_not_null()).unique(
        subset=["label", "seed", "benchmark"], keep="first", maintain_order=True
    )
    lines += md_table(
        ["model", "benchmark", "seed", "n", "Δ", "interval", "b", "c", "p", "p (Holm)"],
        [
            [
                r["label"],
                r["benchmark"],
                str(r["seed"]),
                str(r["n"]),
                _pct(r["diff"], True),
                f"[{_pct(r['diff_ci_low'], True)}, {_pct(r['diff_ci_high'], True)}]",
                str(r["b"]),
                str(r["c"]),
                f"{r['p_mcnemar']:.3g}",
                f"{r['p_holm']:.3g}",
            ]
            for r in tests.iter_rows(named=True)
        ],
    )
    lines += ["", "## Cells", ""]
    lines += md_table(
        ["cell", "seed", "evaluation"],
        [
            [r["cell"], str(r["seed"]), f"`{r['evaluation_dir']}`"]
            for r in results.unique(subset="cell", keep="first", maintain_order=True).iter_rows(named=True)
        ],
    )
    return "\n".join(lines) + "\n"


def plot_accuracy(experiment: Experiment, results: pl.DataFrame, path: str | Path) -> Path:
    """Accuracy by setting (the cells' axis values other than the seed), one panel per benchmark,
    one line per model: the mean over seeds with the standard deviation as error bar (with one seed,
    the model's bootstrap interval). Matplotlib's Agg canvas, as the evaluation's chart."""
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    seeds = set(seed_axes(experiment))
    shown = [a for a in experiment.axes if a not in seeds]
    setting = (
        pl.concat_str(
            [pl.lit(f"{axis_label(a, experiment.axes)}=") + pl.col(a).cast(pl.String) for a in shown], separator="\n"
        )
        if shown
        else pl.lit("all")
    )
    df = results.with_columns(setting.alias("_setting"))
    settings = df["_setting"].unique(maintain_order=True).to_list()
    benches = sorted(df["benchmark"].unique().to_list(), key=lambda b: (b not in BENCHMARK_NAMES, b))
    models = [m for m in EVAL_MODELS if m in set(df["model"].to_list())]
    agg = df.group_by("_setting", "model", "benchmark").agg(
        pl.col("accuracy").mean().alias("mean"),
        pl.col("accuracy").std().alias("sd"),
        pl.col("ci_low").mean().alias("lo"),
        pl.col("ci_high").mean().alias("hi"),
    )
    by = {(r["_setting"], r["model"], r["benchmark"]): r for r in agg.iter_rows(named=True)}
    fig = Figure(figsize=(max(4.5, 1.2 + 1.1 * len(settings)) * len(benches), 3.8), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    colors = mpl.colormaps["tab10"]
    axes = fig.subplots(1, len(benches), squeeze=False)[0]
    for ax, b in zip(axes, benches, strict=True):
        for i, model in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for j, s in enumerate(settings):
                r = by.get((s, model, b))
                if r is None:
                    continue
                xs.append(j)
                ys.append(100 * r["mean"])
                if r["sd"] is not None:
                    lo.append(100 * r["sd"])
                    hi.append(100 * r["sd"])
                else:
                    lo.append(max(0.0, 100 * (r["mean"] - (r["lo"] if r["lo"] is not None else r["mean"]))))
                    hi.append(max(0.0, 100 * ((r["hi"] if r["hi"] is not None else r["mean"]) - r["mean"])))
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=model, color=colors(i % 10))
        ax.set_xticks(range(len(settings)), settings, fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_title(b, fontsize=10)
        ax.set_ylabel("accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        df.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_experiment_report(
    experiment: Experiment, evaluations: Mapping[str, str | Path], out_dir: str | Path | None = None
) -> dict[str, Path]:
    """Write results.parquet (tidy), summary.parquet (seeds aggregated), report.md and accuracy.png
    into ``out_dir`` (default: the experiment's report directory); each file atomically."""
    out = Path(out_dir) if out_dir is not None else experiment.report_dir()
    out.mkdir(parents=True, exist_ok=True)
    results, summary = build_results(experiment, evaluations)
    _write_parquet(results, out / RESULTS_FILE)
    _write_parquet(summary, out / SUMMARY_FILE)
    tmp_plot = out / f".{PLOT_FILE}.{uuid.uuid4().hex[:12]}.png"
    plot_accuracy(experiment, results, tmp_plot)
    os.replace(tmp_plot, out / PLOT_FILE)
    write_text(out / REPORT_FILE, render_markdown(experiment, results, summary, plot=PLOT_FILE))
    return {
        "results": out / RESULTS_FILE,
        "summary": out / SUMMARY_FILE,
        "report": out / REPORT_FILE,
        "plot": out / PLOT_FILE,
    }
