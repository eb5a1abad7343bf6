"""The signals students generate: their distribution, and how their transitions compare with the
teacher's labeled traces (the labeling stage's ``quality.json``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from rscaffold.records import PredictionRecord


def transition_counts(sequences: Sequence[Sequence[str]], names: Sequence[str]) -> list[list[int]]:
    """``m[i][j]``: how often ``names[j]`` directly follows ``names[i]``; unknown signals break a
    sequence (no transition into or out of them is counted)."""
    pos = {n: i for i, n in enumerate(names)}
    m = [[0] * len(names) for _ in names]
    for seq in sequences:
        for a, b in zip(seq, seq[1:]):
            if a in pos and b in pos:
                m[pos[a]][pos[b]] += 1
    return m


def _tv(p: Sequence[float], q: Sequence[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def transition_agreement(
    generated: Sequence[Sequence[str]],
    teacher_transitions: Sequence[Sequence[int]],
    names: Sequence[str],
    *,
    teacher_signal_counts: Mapping[str, int] | None = None,
    smoothing: float = 0.5,
) -> dict[str, Any]:
    """How the signals a student generated compare with the teacher's labeled traces.

    Rows of both transition matrices are normalised to next-signal distributions P(next | signal).
    Only rows where both sides have at least one transition are compared, weighted by the
    teacher's transitions out of that signal:

    * ``transition_tv``: weighted mean total-variation distance (0: same, 1: disjoint);
    * ``transition_kl``: weighted mean KL(teacher || student) in nats, the student's rows smoothed
      with ``smoothing`` pseudo-counts per cell so that it stays finite;
    * ``transition_coverage``: the teacher's transition mass in the compared rows (low: the
      student rarely reaches signals the teacher moves on from);
    * ``signal_tv``: total-variation distance of the two signal distributions (shares of steps
      per signal; needs ``teacher_signal_counts``).

    Values are None where there is nothing to compare.
    """
    names = list(names)
    k = len(names)
    gen = transition_counts(generated, names)
    out: dict[str, Any] = {
        "generated_transitions": sum(map(sum, gen)),
        "teacher_transitions": int(sum(map(sum, teacher_transitions))),
        "transition_matrix": gen,
        "rows_compared": 0,
        "transition_tv": None,
        "transition_kl": None,
        "transition_coverage": None,
        "signal_tv": None,
    }
    if teacher_signal_counts:
        counts = Counter(s for seq in generated for s in seq if s in names)
        g_total, t_total = sum(counts[n] for n in names), sum(teacher_signal_counts.get(n, 0) for n in names)
        if g_total and t_total:
            out["signal_tv"] = _tv(
                [counts[n] / g_total for n in names], [teacher_signal_counts.get(n, 0) / t_total for n in names]
            )
    rows = [i for i in range(k) if sum(teacher_transitions[i]) > 0 and sum(gen[i]) > 0]
    t_all = out["teacher_transitions"]
    if not rows or not t_all:
        return out
    weight = sum(sum(teacher_transitions[i]) for i in rows)
    tv = kl = 0.0
    for i in range(k):
        if i not in rows:
            continue
        t_row, g_row = teacher_transitions[i], gen[i]
        t_n, g_n = sum(t_row), sum(g_row)
        p = [c / t_n for c in t_row]
        q = [c / g_n for c in g_row]
        q_smooth = [(c + smoothing) / (g_n + smoothing * k) for c in g_row]
        w = t_n / weight
        tv += w * _tv(p, q)
        kl += w * sum(a * math.log(a / b) for a, b in zip(p, q_smooth) if a > 0)
    out.update(rows_compared=len(rows), transition_tv=tv, transition_kl=kl, transition_coverage=weight / t_all)
    return out


def signal_distribution(predictions: Sequence[PredictionRecord]) -> dict[str, dict[str, int]]:
    """Counts of generated signals per model (scaffolded outputs only carry signals)."""
    dist: dict[str, Counter[str]] = defaultdict(Counter)
    for p in predictions:
        dist[p.model].update(p.signals)
    return {m: dict(c.most_common()) for m, c in dist.items() if c}


def signal_agreement(
    predictions: Sequence[PredictionRecord], teacher: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """:func:`transition_agreement` per ``model/benchmark`` with generated signals (``teacher``: the
    labeling stage's ``quality.json``, with ``names``, ``transitions`` and ``signal_counts``)."""
    if not teacher or not teacher.get("transitions"):
        return {}
    groups: dict[str, list[list[str]]] = defaultdict(list)
    for p in predictions:
        groups[f"{p.model}/{p.benchmark}"].append(list(p.signals))
    return {
        key: transition_agreement(
            seqs, teacher["transitions"], teacher["names"], teacher_signal_counts=teacher.get("signal_counts")
        )
        for key, seqs in groups.items()
        if any(seqs)
    }
