"""The evaluation report: a models x benchmarks table, a markdown report and an accuracy chart.

Everything here is computed from the evaluation stage's two Parquet files (``predictions.parquet``,
``metrics.parquet``), so a report can be regenerated from an evaluation directory alone
(``rscaffold report RUN_DIR``, :func:`write_report`) without the models, the config or the
upstream stages.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from rscaffold.markdown import number, percent
from rscaffold.markdown import table as md_table
from rscaffold.records import MetricRecord, PredictionRecord
from rscaffold.vocabulary import ALL_EVAL_MODELS, BENCHMARK_NAMES

REPORT_FILE = "report.md"
CHART_FILE = "accuracy.png"
PREDICTIONS_FILE = "predictions.parquet"
METRICS_FILE = "metrics.parquet"


def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def models_of(metrics: Sequence[MetricRecord]) -> list[str]:
    return sorted({m.model for m in metrics}, key=lambda x: _rank(x, ALL_EVAL_MODELS))


def benchmarks_of(metrics: Sequence[MetricRecord]) -> list[str]:
    return sorted({m.benchmark for m in metrics}, key=lambda x: _rank(x, BENCHMARK_NAMES))


def _cell(m: MetricRecord | None) -> str:
    if m is None:
        return "–"
    return f"{100 * m.accuracy:.1f} [{100 * m.ci_low:.1f}, {100 * m.ci_high:.1f}]"


def accuracy_table(metrics: Sequence[MetricRecord]) -> list[dict[str, str]]:
    """One row per model, one column per benchmark: ``"accuracy % [95% CI]"`` (a table artifact)."""
    by = {(m.model, m.benchmark): m for m in metrics}
    benches = benchmarks_of(metrics)
    return [{"model": model, **{b: _cell(by.get((model, b))) for b in benches}} for model in models_of(metrics)]


def render_report(
    metrics: Sequence[MetricRecord],
    predictions: Sequence[PredictionRecord],
    chart: str | None = CHART_FILE,
    *,
    source: str | None = None,
) -> str:
    """The markdown report (``chart``: the PNG's file name next to the report, None for none)."""
    models, benches = models_of(metrics), benchmarks_of(metrics)
    by = {(m.model, m.benchmark): m for m in metrics}
    groups: dict[tuple[str, str], list[PredictionRecord]] = defaultdict(list)
    for p in predictions:
        groups[(p.model, p.benchmark)].append(p)

    lines = ["# rscaffold evaluation", ""]
    if source:
        lines += [f"Generated from `{source}` ({len(predictions)} predictions, {len(metrics)} metric rows).", ""]
    lines += ["## Accuracy", "", "Accuracy in %, with the 95% percentile bootstrap interval over problems.", ""]
    table = accuracy_table(metrics)
    lines += md_table(["model", *benches], [[r["model"], *(r[b] for b in benches)] for r in table])
    if chart:
        lines += ["", f"![accuracy per model and benchmark]({chart})"]

    lines += ["", "## Details", ""]
    rows = []
    for b in benches:
        for model in models:
            m = by.get((model, b))
            if m is None:
                continue
            decoding = next((p.decoding for p in groups[(model, b)] if p.decoding), "–")
            checked = "–" if not m.consistency_checked else f"{percent(m.consistency_rate)} ({m.consistency_checked})"
            rows.append(
                [
                    b,
                    model,
                    decoding,
                    m.n,
                    percent(m.accuracy),
                    f"[{percent(m.ci_low)}, {percent(m.ci_high)}]",
                    f"{m.mean_output_tokens:.1f}",
                    number(m.mean_steps, digits=1),
                    percent(m.unparseable_rate),
                    checked,
                ]
            )
    lines += md_table(
        [
            "benchmark",
            "model",
            "decoding",
            "n",
            "accuracy %",
            "95% CI",
            "mean output tokens",
            "mean steps",
            "unparseable %",
            "consistent % (checked)",
        ],
        rows,
    )

    lines += ["", "## Consistency", ""]
    lines += [
        "Heuristic checks that the stated final answer agrees with the reasoning "
        "(`rscaffold.evaluation`): math, the answer equals the last computed result "
        "(`a op b = c`, or a number stated after it) or, without computations, the last number "
        "before the answer statement; yes/no, no explicit verdict in the output has the opposite "
        "polarity of the answer; multiple choice is not checked.",
        "",
    ]
    check_rows = []
    examples: list[str] = []
    for b in benches:
        for model in models:
            preds = groups.get((model, b), [])
            kinds = Counter(p.consistency_check for p in preds if p.consistency_check)
            for kind, n in sorted(kinds.items()):
                ok = sum(1 for p in preds if p.consistency_check == kind and p.consistent)
                check_rows.append([b, model, kind, n, ok, n - ok])
            bad = [p for p in preds if p.consistent is False][:2]
            examples += [
                f"- {model} / {b} / `{p.problem_id}`: {p.consistency_evidence} (answer {p.predicted_answer})"
                for p in bad
            ]
    if check_rows:
        lines += md_table(["benchmark", "model", "check", "checked", "consistent", "inconsistent"], check_rows)
    else:
        lines.append("No prediction could be checked.")
    if examples:
        lines += ["", "Inconsistent examples:", "", *examples]

    lines += ["", "## Signal sources", ""]
    source_rows = signal_source_rows(predictions, models, benches)
    if source_rows:
        lines += [
            "Where each step's signal came from, as a share of the steps of each model's answers: "
            "`gate` (committed by the adaptive gate), `free` (emitted by the model's own decoding: "
            "plain decoding, or free decoding after an uncommitted gate where it may emit a signal) "
            "and `none` (a step without a signal).",
            "",
        ]
        lines += md_table(["model", "benchmark", "steps", "gate %", "free %", "none %"], source_rows)
    else:
        lines.append("No prediction recorded its signal sources.")

    lines += ["", "## Generated signals", ""]
    sig_rows = []
    dists = []
    for b in benches:
        for model in models:
            m = by.get((model, b))
            preds = groups.get((model, b), [])
            counts = Counter(s for p in preds for s in p.signals)
            if not counts or m is None:
                continue
            total = sum(counts.values())
            sig_rows.append(
                [
                    model,
                    b,
                    total,
                    number(total / max(1, len(preds)), digits=2),
                    number(m.signal_tv),
                    number(m.transition_tv),
                    number(m.transition_kl),
                    percent(m.transition_coverage),
                ]
            )
            dists.append(
                f"- **{model} / {b}**: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counts.most_common())
            )
    if sig_rows:
        lines += [
            "Agreement with the teacher's labeled traces: `signal TV` compares the shares of "
            "signals, `transition TV` / `KL` the next-signal distributions P(next | signal) "
            "row by row (weighted by the teacher's transitions; KL(teacher || student), "
            "smoothed), over the rows both sides reach (`coverage`: the teacher's share of "
            "transitions in those rows). 0 is perfect agreement; – where nothing can be compared.",
            "",
        ]
        lines += md_table(
            [
                "model",
                "benchmark",
                "signals",
                "signals / answer",
                "signal TV",
                "transition TV",
                "transition KL",
                "coverage %",
            ],
            sig_rows,
        )
        lines += ["", *dists]
    else:
        lines.append("No model generated signals.")
    return "\n".join(lines) + "\n"


SIGNAL_SOURCES = ("gate", "free", "none")
"""Where a step's signal came from (:attr:`rscaffold.records.PredictionRecord.signal_sources`)."""


def signal_source_shares(predictions: Sequence[PredictionRecord]) -> dict[str, float] | None:
    """The share of steps whose signal came from each source, over ``predictions`` (None when no
    prediction recorded its sources, or none has a step)."""
    counts = Counter(src for p in predictions for src in (p.signal_sources or []))
    total = sum(counts.values())
    if not total:
        return None
    return {src: counts.get(src, 0) / total for src in SIGNAL_SOURCES}


def signal_source_rows(
    predictions: Sequence[PredictionRecord], models: Sequence[str], benches: Sequence[str]
) -> list[list[object]]:
    """Report rows: model, benchmark, steps, and the share of each signal source in %."""
    groups: dict[tuple[str, str], list[PredictionRecord]] = defaultdict(list)
    for p in predictions:
        groups[(p.model, p.benchmark)].append(p)
    rows: list[list[object]] = []
    for b in benches:
        for model in models:
            preds = groups.get((model, b), [])
            shares = signal_source_shares(preds)
            if shares is None:
                continue
            steps = sum(len(p.signal_sources or []) for p in preds)
            rows.append([model, b, steps, *(percent(shares[src]) for src in SIGNAL_SOURCES)])
    return rows


def plot_accuracy(metrics: Sequence[MetricRecord], path: str | Path) -> Path:
    """A PNG bar chart: accuracy per benchmark (groups) and model (bars), 95% CI error bars.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models, benches = models_of(metrics), benchmarks_of(metrics)
    by = {(m.model, m.benchmark): m for m in metrics}
    width = 0.8 / max(1, len(models))
    fig = Figure(figsize=(max(5.0, 2.2 + 0.8 * len(benches) * max(1, len(models))), 3.8), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = mpl.colormaps["tab10"]
    for i, model in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for j, b in enumerate(benches):
            m = by.get((model, b))
            if m is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(100 * m.accuracy)
            lo.append(max(0.0, 100 * (m.accuracy - m.ci_low)))
            hi.append(max(0.0, 100 * (m.ci_high - m.accuracy)))
        bars = ax.bar(
            xs,
            ys,
            width * 0.92,
            yerr=[lo, hi],
            capsize=3,
            label=model,
            color=colors(i % 10),
            error_kw={"elinewidth": 1, "ecolor": "#333333"},
        )
        for bar, y, h in zip(bars, ys, hi):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                min(y + h + 1.5, 101),
                f"{y:.0f}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(
        range(len(benches)),
        [f"{b}\n(n={max((by[(m, b)].n for m in models if (m, b) in by), default=0)})" for b in benches],
    )
    ax.set_ylim(0, 112)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per benchmark, 95% bootstrap interval", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if models:
        ax.legend(
            fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="model", title_fontsize=8
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def read_evaluation(eval_dir: str | Path) -> tuple[list[MetricRecord], list[PredictionRecord]]:
    from rscaffold.store import read_records

    eval_dir = Path(eval_dir)
    return read_records(eval_dir / METRICS_FILE, MetricRecord), read_records(
        eval_dir / PREDICTIONS_FILE, PredictionRecord
    )


OVERLAP_FILE = "overlap.json"  # per benchmark, problems left out because they are also training problems


def overlap_section(path: Path) -> str:
    """The report's note on evaluation problems left out because they were trained on (none: '')."""
    removed = json.loads(path.read_text()) if path.is_file() else {}
    if not any(removed.values()):
        return ""
    rows = [[b, str(n)] for b, n in removed.items() if n]
    note = (
        "Evaluation problems whose question is also a training question were left out "
        "(problems.on_overlap: remove); the accuracies above are over the rest."
    )
    return "\n".join(["", "## Left out: trained on", "", note, "", *md_table(["benchmark", "left out"], rows)]) + "\n"


def write_report(
    eval_dir: str | Path, out_dir: str | Path | None = None, *, published: str | Path | None = None
) -> tuple[Path, Path]:
    """(Re)write ``report.md`` and ``accuracy.png`` in ``out_dir`` (default: ``eval_dir``) from the
    Parquet files of ``eval_dir`` alone (which may then be read-only).
    ``published``: where ``eval_dir`` will live once published (the report names that directory,
    not a work directory that is gone by the time it is read)."""
    eval_dir = Path(eval_dir)
    out = Path(out_dir) if out_dir is not None else eval_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics, predictions = read_evaluation(eval_dir)
    chart = plot_accuracy(metrics, out / CHART_FILE)
    report = out / REPORT_FILE
    tmp = report.with_suffix(".md.tmp")
    text = render_report(metrics, predictions, chart.name, source=str(published or eval_dir))
    text += overlap_section(eval_dir / OVERLAP_FILE)
    tmp.write_text(text)
    tmp.replace(report)
    return report, chart


def _finished_at(d: Path) -> tuple[int, float]:
    manifest = d / "manifest.json"
    if manifest.is_file():
        try:
            return 1, float(json.loads(manifest.read_text()).get("finished_at") or manifest.stat().st_mtime)
        except (ValueError, OSError):
            pass
    return 0, (d / METRICS_FILE).stat().st_mtime


def find_evaluation_dir(path: str | Path) -> Path:
    """The evaluation directory ``path`` means.

    ``path`` holding ``metrics.parquet`` is one. Otherwise ``path`` is an ``evaluation/`` folder or
    the artifacts root above it, and the newest evaluation directory in it that has both Parquet
    files is returned (complete ones, with a manifest, first; then by finishing time).
    """
    path = Path(path).expanduser().resolve()
    if (path / METRICS_FILE).is_file():
        if not (path / PREDICTIONS_FILE).is_file():
            raise FileNotFoundError(f"{path} has {METRICS_FILE} but no {PREDICTIONS_FILE}")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such directory: {path}")
    for base in (path, path / "evaluation"):
        if not base.is_dir():
            continue
        found = [
            d
            for d in base.iterdir()
            if d.is_dir() and (d / METRICS_FILE).is_file() and (d / PREDICTIONS_FILE).is_file()
        ]
        if found:
            return max(found, key=_finished_at)
    raise FileNotFoundError(
        f"{path}: not an evaluation directory (no {METRICS_FILE}), and no evaluation directories under it "
        f"or under {path / 'evaluation'}"
    )
