"""Human-readable views of the labeling stage's quality report.

Both functions take the dict :func:`rscaffold.labeling.quality.label_quality_report` returns (or the same
dict read back from ``quality.json``) and the taxonomy it was computed with:

- :func:`render_quality_markdown`: a markdown report (summary numbers, signal distribution,
  LLM-vs-keyword agreement, the transition matrix with short signal names), e.g. for a Prefect
  markdown artifact or the README of a run;
- :func:`plot_transition_heatmap`: a PNG heatmap of the transitions between consecutive signals,
  row-normalised, with the counts written in the cells.

The matrix is read in ``report["names"]`` order (the order it was computed in); the taxonomy only
supplies the short names (from the signal tokens, ``<sig:contrast>`` -> ``contrast``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rscaffold.labeling.taxonomy import Taxonomy
from rscaffold.markdown import cell, number, percent, table

# Reference numbers the paper reports for its two-stage labeling (section 3.1).
PAPER_KEYWORD_COVERAGE = 0.74
PAPER_PRELABEL_AGREEMENT = 0.87


# ---------------------------------------------------------------------------------------------
# names


def _short_from_token(token: str) -> str:
    core = token.strip().strip("<>").strip()
    if ":" in core:
        core = core.split(":", 1)[1]
    return core.strip() or token


def short_signal_names(names: Sequence[str], tax: Taxonomy) -> dict[str, str]:
    """Short, unique display name of each signal: the token's core (``<sig:verify>`` -> ``verify``).

    Names the taxonomy does not know keep their full name; should two short names collide, both
    signals fall back to their full token.
    """
    by_name = tax.by_name
    short = {n: (_short_from_token(by_name[n].token) if n in by_name else n) for n in names}
    seen: dict[str, int] = {}
    for v in short.values():
        seen[v] = seen.get(v, 0) + 1
    return {n: (by_name[n].token if n in by_name and seen[v] > 1 else v) for n, v in short.items()}


# ---------------------------------------------------------------------------------------------
# markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    return table(header, rows, align or ["l"] + ["r"] * (len(header) - 1))


def _percent(x: float | None) -> str:
    return percent(x, missing="n/a", suffix="%")


def _number(x: float | None, digits: int = 3) -> str:
    return number(x, digits=digits, missing="n/a")


def render_quality_markdown(report: dict[str, Any], tax: Taxonomy) -> str:
    """A markdown report of one labeling run's quality (see the module docstring)."""
    names: list[str] = list(report.get("names") or tax.names)
    short = short_signal_names(names, tax)
    steps = int(report.get("steps", 0))
    traces = int(report.get("traces", 0))
    sources: dict[str, int] = dict(report.get("source_counts") or {})
    fallback = sources.get("fallback", 0)
    fallback_rate = (fallback / steps) if steps else None
    counts: dict[str, int] = dict(report.get("signal_counts") or {})
    first: dict[str, int] = dict(report.get("first_signal_counts") or {})
    mean_chars: dict[str, float] = dict(report.get("mean_chars_per_signal") or {})
    checked = int(report.get("prelabel_checked") or 0)
    agreement = report.get("prelabel_agreement")
    kappa = report.get("prelabel_kappa")

    lines: list[str] = ["# Labeling quality", ""]
    gate = report.get("quality_gate") or {}
    if gate.get("degenerate"):
        lines += [
            "> **WARNING: the labeling looks degenerate.** The labels are well formed (the fallback rate "
            "does not show this) but do not describe the steps:",
            ">",
            *[f"> - {cell(r)}" for r in gate.get("reasons", [])],
            ">",
            "> A student trained on these signals learns the labeler's pattern, not the teacher's flow of "
            "thought. Use a stronger labeler (`labeling.llm`), or set `labeling.min_kappa`, "
            "`labeling.max_order_share` or `labeling.max_index_lambda` to fail the stage instead.",
            "",
        ]
    digest = report.get("taxonomy_digest")
    if digest and digest != tax.digest():
        lines += [
            f"> **Warning**: this report was computed with taxonomy `{digest}`, "
            f"not the one given here (`{tax.digest()}`); short names may not match.",
            "",
        ]

    lines += ["## Summary", ""]
    lines += _table(
        ["metric", "value"],
        [
            ["traces", traces],
            ["steps", steps],
            ["steps per trace (mean)", _number(report.get("steps_per_trace", 0.0), 2)],
            [
                "keyword coverage (steps with a cue pre-label)",
                f"{_percent(report.get('keyword_coverage') if steps else None)} (paper: ~{PAPER_KEYWORD_COVERAGE:.0%})",
            ],
            ["fallback rate (steps with a fallback label)", f"{_percent(fallback_rate)} ({fallback} of {steps})"],
            ["taxonomy", f"`{digest or tax.digest()}` (version {tax.version})"],
        ],
    )
    lines.append("")
    if sources:
        lines += ["Label sources:", ""]
        lines += _table(
            ["source", "steps", "share"],
            [[k, v, _percent(v / steps if steps else None)] for k, v in sorted(sources.items(), key=lambda kv: -kv[1])],
        )
        lines.append("")
    lines += [
        "`llm`: label given or confirmed by the labeler LLM; `keyword`: the cue pre-label "
        "(method `keyword`); `fallback`: the pre-label, else the default signal "
        f"(`{tax.default_signal}`), for every step of a trace (or window of a long trace) the LLM failed on (method `llm`) "
        "or a step without a cue (method `keyword`).",
        "",
    ]

    by_length = list(report.get("fallback_by_length") or [])
    if by_length:
        lines += ["## Fallback by trace length", ""]
        lines += _table(
            ["steps per trace", "traces", "traces with a fallback", "steps with a fallback", "label requests (mean)"],
            [
                [
                    r["steps"],
                    r["traces"],
                    f"{_percent(r['fallback_trace_rate'])} ({r['fallback_traces']})",
                    _percent(r["fallback_step_rate"]),
                    _number(r["mean_windows"], 2),
                ]
                for r in by_length
            ],
        )
        lines += [
            "",
            "A trace longer than one request holds (`labeling.context_tokens`, `labeling.max_window_steps`) "
            "is labeled in windows of consecutive steps, each step shown whole; a window the labeler fails "
            "falls back alone.",
            "",
        ]

    lines += ["## LLM vs keyword pre-labels", ""]
    if checked:
        lines += _table(
            ["metric", "value"],
            [
                ["LLM-labeled steps with a pre-label", checked],
                [
                    "agreement (LLM kept the pre-label)",
                    f"{_percent(agreement)} (paper: ~{PAPER_PRELABEL_AGREEMENT:.0%})",
                ],
                ["Cohen's kappa", _number(kappa)],
            ],
        )
    else:
        lines.append("No LLM-labeled step had a keyword pre-label: agreement and Cohen's kappa are n/a.")
    lines.append("")

    lines += ["## Quality gate", ""]
    order = report.get("taxonomy_order_share")
    lines += _table(
        ["metric", "value"],
        [
            ["LLM-labeled steps", int(report.get("llm_steps") or 0)],
            ["Cohen's kappa vs keyword pre-labels", _number(kappa)],
            [
                "step-index lambda (label predicted from the step's position)",
                f"{_number(report.get('index_lambda'))} ({int(report.get('index_lambda_steps') or 0)} steps)",
            ],
            ["labels equal to the taxonomy's signal at that position", _percent(order)],
            [
                "verdict",
                "degenerate"
                if gate.get("degenerate")
                else ("ok" if gate.get("judged") else "not judged (too few steps)"),
            ],
        ],
    )
    lines.append("")

    lines += ["## Signal distribution", ""]
    rows = []
    for n in names:
        c = counts.get(n, 0)
        mc = mean_chars.get(n)
        rows.append(
            [
                n,
                f"`{short[n]}`",
                c,
                _percent(c / steps if steps else None),
                first.get(n, 0),
                "n/a" if mc is None else f"{mc:.0f}",
            ]
        )
    lines += _table(
        ["signal", "short", "steps", "share", "first step of a trace", "mean chars"],
        rows,
        ["l", "l", "r", "r", "r", "r"],
    )
    unknown = report.get("unknown_signals") or []
    if unknown:
        lines += ["", "Signals not in the taxonomy: " + ", ".join(f"`{cell(u)}`" for u in unknown)]
    lines.append("")

    matrix: list[list[int]] = [list(map(int, r)) for r in (report.get("transitions") or [])]
    lines += ["## Transitions between consecutive signals", ""]
    if len(matrix) != len(names) or any(len(r) != len(names) for r in matrix):
        lines.append("No transition matrix in this report.")
    else:
        total = sum(map(sum, matrix))
        lines += [
            f"Counts of `row` -> `column` over {total} consecutive step pairs "
            "(rows: from, columns: to; `total`: transitions out of the row signal).",
            "",
        ]
        header = ["from \\ to"] + [short[n] for n in names] + ["total"]
        rows = [[f"**{short[n]}**", *matrix[i], sum(matrix[i])] for i, n in enumerate(names)]
        rows.append(["**total**", *[sum(r[j] for r in matrix) for j in range(len(names))], total])
        lines += _table(header, rows)
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# heatmap


def plot_transition_heatmap(report: dict[str, Any], tax: Taxonomy, path: Path) -> Path:
    """Write a PNG heatmap of ``report["transitions"]`` to ``path`` and return ``path``.

    Cell colour: the share of the row signal's transitions that go to the column signal (rows
    sum to 1; a signal never followed by another has a grey row); cell text: the count (a dot for 0).
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names: list[str] = list(report.get("names") or tax.names)
    short = short_signal_names(names, tax)
    k = len(names)
    matrix = [list(map(int, r)) for r in (report.get("transitions") or [[0] * k for _ in names])]
    if len(matrix) != k or any(len(r) != k for r in matrix):
        raise ValueError(f"transitions must be a {k}x{k} matrix (one row and column per name)")
    row_tot = [sum(r) for r in matrix]
    share = [[(c / t if t else float("nan")) for c in r] for r, t in zip(matrix, row_tot)]

    size = 1.0 + 0.95 * k
    fig = Figure(figsize=(size + 2.4, size + 0.6), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = mpl.colormaps["Blues"].with_extremes(bad="#eeeeee")  # grey: a row with no transitions
    im = ax.imshow(share, cmap=cmap, vmin=0.0, vmax=1.0, aspect="equal")
    for i in range(k):
        for j in range(k):
            c = matrix[i][j]
            s = share[i][j]
            dark = s == s and s > 0.55  # s == s: not NaN
            ax.text(
                j,
                i,
                str(c) if c else "·",
                ha="center",
                va="center",
                fontsize=10 if c else 9,
                color="white" if dark else ("#222222" if c else "#999999"),
            )
    ax.set_xticks(range(k), [short[n] for n in names], rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), [f"{short[n]} (n={t})" for n, t in zip(names, row_tot)])
    ax.set_xlabel("next signal (step t+1)")
    ax.set_ylabel("signal at step t  (n = transitions out)")
    ax.set_xticks([x - 0.5 for x in range(1, k)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, k)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    total = sum(row_tot)
    ax.set_title(
        f"Signal transitions: {report.get('traces', 0)} traces, {total} step pairs\n"
        "colour: row-normalised share; text: count",
        fontsize=10,
    )
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("share of the row's transitions")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
