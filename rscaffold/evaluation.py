"""Scoring of model outputs: answer checking, consistency checks, signal statistics, metrics.

What one prediction gets (:func:`score_output`):

* the extracted final answer and whether it is correct (multiple choice: the options are read
  back from the question, so an answer given as an option's text counts too);
* a **consistency** flag (:func:`check_consistency`), a cheap heuristic check that the stated final
  answer agrees with the reasoning before it:

  - *math* (GSM8K, MATH-500): only outputs that *state* a final answer (``\\boxed{}``, "the answer
    is", "Answer:", "####") are checked. The reasoning before that statement is searched for
    computations ``a op b = c`` (``+ - * / ^``, ``×``, ``÷``, ``\\times``, ``\\cdot``, "3 x 4"; chains
    ``a + b = c + d = e`` give ``e``). The answer is consistent when it equals the result of the
    last computation, or, when numbers follow that computation before the answer (a result said
    in words: "... so 16 are left"), the last of those numbers. Without any computation the last
    number before the answer statement is compared (``math_last_number``); an answer written
    right after ``=`` is the result of that computation (``math_answer_is_result``). No number
    before the answer: not checked.
  - *yes/no* (StrategyQA): the output is inconsistent when an explicit verdict anywhere in it has
    the opposite polarity of the extracted answer. Verdicts are "the answer is yes/no" (and
    "Answer:"), ``\\boxed{yes}``, a line starting with "Yes," / "No." (followed by punctuation, so
    "No one ..." is not one), and "so / therefore / thus / hence, yes/no" followed by
    punctuation; true/false count as yes/no. Negated sentences ("X is not Y") are not
    interpreted, so the check catches flip-flopping verdicts, not every contradiction.
  - *multiple choice*: not checked (``consistent`` is None).

Per model and benchmark (:func:`compute_metrics`): accuracy with a percentile bootstrap interval,
mean output tokens and steps, the unparseable share, the consistency rate over checked rows, and
for models that generate signals their agreement with the teacher's labeled traces
(:func:`transition_agreement`, from the labeling stage's ``quality.json``).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rscaffold.benchmarks.answers import choice_options, extract_answer, is_correct
from rscaffold.records import MetricRecord, PredictionRecord, ProblemRecord

MODEL_ORDER = ("base", "cot_sft", "scaffolded")


# ---------------------------------------------------------------------------------------------
# evaluation sets


@dataclass
class EvalSuite:
    """The problems of one benchmark, and how its answers look."""

    name: str
    answer_type: str
    prompt_template: str
    problems: list[ProblemRecord]

    def prompts(self, style: str = "benchmark") -> list[str]:
        """The user messages: the benchmark's answer-format prompt, or the bare question."""
        if style == "question":
            return [p.question for p in self.problems]
        return [self.prompt_template.replace("{question}", p.question) for p in self.problems]


def evaluation_suites(ecfg, default_benchmark: str, default_problems: Sequence[ProblemRecord]) -> list[EvalSuite]:
    """What the evaluation stage answers: ``ecfg.benchmarks`` (an :class:`EvaluationConfig`), or
    when it is empty the problems stage's eval split (``default_problems``, the first
    ``ecfg.limit`` of them) as ``default_benchmark``."""
    from rscaffold.benchmarks.loaders import get_benchmark

    if not ecfg.benchmarks:
        bench = get_benchmark(default_benchmark)
        rows = list(default_problems)[: ecfg.limit] if ecfg.limit else list(default_problems)
        return [EvalSuite(bench.name, bench.answer_type, bench.prompt_template, rows)]
    suites = []
    for b in ecfg.benchmarks:
        bench = get_benchmark(b.name)
        rows = bench.load(
            b.source, "eval", b.limit if b.limit is not None else ecfg.limit, b.seed, part=b.part, heldout_fraction=b.heldout_fraction
        )
        suites.append(EvalSuite(bench.name, bench.answer_type, bench.prompt_template, rows))
    return suites


def benchmark_source_digest(source) -> str:
    """What identifies a :class:`~rscaffold.config.BenchmarkSource`'s data in a fingerprint: the
    content digest of the resolved local file, or the hub string. A missing file raises
    :class:`~rscaffold.benchmarks.loaders.BenchmarkNotFoundError`."""
    from rscaffold.benchmarks.loaders import get_benchmark, is_hub_source
    from rscaffold.store import file_digest

    if is_hub_source(source.source):
        return source.source
    return file_digest(get_benchmark(source.name).resolve_path(source.source))


# ---------------------------------------------------------------------------------------------
# consistency


@dataclass(frozen=True)
class Consistency:
    """Outcome of :func:`check_consistency`. ``consistent`` None: not checked (``evidence`` says why)."""

    consistent: bool | None
    check: str | None = None
    evidence: str | None = None


_ANSWER_STATEMENT = re.compile(r"\\(?:boxed|fbox)\s*\{|\banswer\b\s*(?:is\b|:|=)|####", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?![\w])|(?<![\w.])-?\.\d+")
_RESULT = re.compile(r"\s*(-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+)(?![\d,]*\d)")
_FOLLOWED_BY_OPERATOR = re.compile(r"\s*[-+*/^]\s*\(?\s*\.?\d")
_OPERATION = re.compile(r"\d\s*\)?\s*[-+*/^]\s*\(?\s*-?\.?\d")
_ARITH_CHARS = set("0123456789.,+-*/^() \t%")


def _normalise_math_text(text: str) -> str:
    t = text.replace("**", "").replace("\u2212", "-").replace("×", "*").replace("÷", "/").replace("·", "*")
    t = re.sub(r"\\(?:times|cdot|ast)\b", "*", t)
    t = re.sub(r"\\div\b", "/", t)
    t = re.sub(r"\\(?:left|right)\b", "", t)
    t = re.sub(r"\\[()\[\]]", " ", t)
    t = t.replace("\\$", "").replace("$", "").replace("\\,", "").replace("\\!", "")
    t = re.sub(r"(?<=\d)\s*[xX]\s*(?=\d)", " * ", t)
    return t


def _computations(body: str) -> list[tuple[str, str, int]]:
    """``(expression, result, end offset)`` of every ``a op b = c`` in ``body``, in order."""
    out = []
    for m in re.finditer(r"=", body):
        j = m.start()
        while j > 0 and body[j - 1] in _ARITH_CHARS:
            j -= 1
        lhs = re.split(r"[.,]\s+", body[j : m.start()])[-1]  # "20. 20 - 4 =": a sentence ended
        if not _OPERATION.search(lhs):
            continue
        r = _RESULT.match(body, m.end())
        if not r or _FOLLOWED_BY_OPERATOR.match(body, r.end()):
            continue  # "= 3 + 4 = 7": the result is the last link of the chain
        out.append((f"{lhs.strip()} = {r.group(1)}", r.group(1).replace(",", ""), r.end()))
    return out


def _same_number(a: str, b: str) -> bool:
    return is_correct(a, b, "math")


def check_math_consistency(output: str, predicted: str | None) -> Consistency:
    """Does the stated final answer equal the last computed result before it? (module docstring)"""
    if predicted is None:
        return Consistency(None, None, "no answer extracted")
    text = _normalise_math_text(output)
    statements = list(_ANSWER_STATEMENT.finditer(text))
    if not statements:
        return Consistency(None, None, "no stated final answer")
    body = text[: statements[-1].start()]
    if re.search(r"=\s*(?:the\s+)?$", body, re.IGNORECASE):
        line = body.rstrip().rsplit("\n", 1)[-1].strip()
        return Consistency(True, "math_answer_is_result", f"{line} {predicted}".strip())
    comps = _computations(body)
    if comps:
        expr, result, end = comps[-1]
        candidates = [result]
        later = _NUMBER.findall(body[end:])
        if later:
            candidates.append(later[-1].replace(",", ""))
        ok = any(_same_number(predicted, c) for c in candidates)
        evidence = expr if len(candidates) == 1 else f"{expr}; then {candidates[1]}"
        return Consistency(ok, "math_equation", evidence)
    numbers = _NUMBER.findall(body)
    if not numbers:
        return Consistency(None, None, "no number before the answer")
    last = numbers[-1].replace(",", "")
    return Consistency(_same_number(predicted, last), "math_last_number", last)


_POLARITY = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_VERDICTS = (
    re.compile(r"\banswer\b\s*(?:is\b|:|=)\s*:?\s*[\"'“(\[]*\s*(yes|no|true|false)\b", re.IGNORECASE),
    re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{)?\s*(yes|no|true|false)\b", re.IGNORECASE),
    re.compile(r"^[\s\"'“]*(yes|no)\s*[,.!:;]", re.IGNORECASE | re.MULTILINE),
    re.compile(r"\b(?:so|therefore|thus|hence)\s*,?\s*(yes|no)\s*[,.!]", re.IGNORECASE),
)


def yesno_verdicts(output: str) -> list[tuple[int, str, str]]:
    """Explicit yes/no verdicts in an output: ``(offset, polarity, matched text)``, in order."""
    text = output.replace("**", "")
    found: dict[int, tuple[int, str, str]] = {}
    for pattern in _VERDICTS:
        for m in pattern.finditer(text):
            found.setdefault(m.start(1), (m.start(1), _POLARITY[m.group(1).lower()], m.group(0).strip()))
    return sorted(found.values())


def check_polarity_consistency(output: str, predicted: str | None) -> Consistency:
    """No explicit verdict in the output has the opposite polarity of the answer (module docstring)."""
    if predicted not in ("yes", "no"):
        return Consistency(None, None, "no answer extracted")
    against = [v for v in yesno_verdicts(output) if v[1] != predicted]
    if against:
        return Consistency(False, "yesno_polarity", f"{against[0][2]!r} vs answer {predicted}")
    return Consistency(True, "yesno_polarity", None)


def check_consistency(output: str, predicted: str | None, answer_type: str) -> Consistency:
    """The consistency check of an answer type (see the module docstring); choice: not checked."""
    if answer_type == "math":
        return check_math_consistency(output, predicted)
    if answer_type == "yesno":
        return check_polarity_consistency(output, predicted)
    return Consistency(None, None, "not checked for this answer type")


# ---------------------------------------------------------------------------------------------
# scoring


def score_output(
    model: str,
    benchmark: str,
    problem: ProblemRecord,
    output: str,
    answer_type: str,
    output_tokens: int,
    signals: Sequence[str],
    latency_s: float,
    *,
    options: Sequence[str] | None = None,
    decoding: str | None = None,
    n_steps: int | None = None,
) -> PredictionRecord:
    """Extract the answer from one output, check it against the gold answer and for consistency.

    Multiple choice: ``options`` default to the ``"A. ..."`` lines of the question.
    """
    if options is None and answer_type == "choice":
        options = choice_options(problem.question) or None
    predicted = extract_answer(output, answer_type, options=options)
    cons = check_consistency(output, predicted, answer_type)
    return PredictionRecord(
        model=model,
        benchmark=benchmark,
        problem_id=problem.problem_id,
        question=problem.question,
        gold_answer=problem.gold_answer,
        output=output,
        predicted_answer=predicted,
        correct=bool(predicted is not None and is_correct(predicted, problem.gold_answer, answer_type)),
        parsed=predicted is not None,
        output_tokens=output_tokens,
        signals=list(signals),
        latency_s=latency_s,
        decoding=decoding,
        n_steps=n_steps if n_steps is not None else len([s for s in output.split("\n\n") if s.strip()]),
        consistent=cons.consistent,
        consistency_check=cons.check,
        consistency_evidence=cons.evidence,
    )


def bootstrap_ci(correct: Sequence[bool], samples: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct``."""
    n = len(correct)
    if n == 0:
        return 0.0, 0.0
    if samples == 0:
        acc = sum(correct) / n
        return acc, acc
    rng = random.Random(seed)
    values = [int(c) for c in correct]
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    lo = means[int((alpha / 2) * (samples - 1))]
    hi = means[int((1 - alpha / 2) * (samples - 1))]
    return lo, hi


# ---------------------------------------------------------------------------------------------
# signals: distribution and agreement with the teacher's transitions


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
            out["signal_tv"] = _tv([counts[n] / g_total for n in names], [teacher_signal_counts.get(n, 0) / t_total for n in names])
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


def signal_agreement(predictions: Sequence[PredictionRecord], teacher: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """:func:`transition_agreement` per ``model/benchmark`` with generated signals (``teacher``: the
    labeling stage's ``quality.json``, with ``names``, ``transitions`` and ``signal_counts``)."""
    if not teacher or not teacher.get("transitions"):
        return {}
    groups: dict[str, list[list[str]]] = defaultdict(list)
    for p in predictions:
        groups[f"{p.model}/{p.benchmark}"].append(list(p.signals))
    return {
        key: transition_agreement(seqs, teacher["transitions"], teacher["names"], teacher.get("signal_counts"))
        for key, seqs in groups.items()
        if any(seqs)
    }


# ---------------------------------------------------------------------------------------------
# metrics


def compute_metrics(
    predictions: Sequence[PredictionRecord],
    bootstrap_samples: int = 1000,
    seed: int = 0,
    teacher: Mapping[str, Any] | None = None,
) -> list[MetricRecord]:
    """One :class:`MetricRecord` per (model, benchmark); ``teacher``: see :func:`signal_agreement`."""
    groups: dict[tuple[str, str], list[PredictionRecord]] = defaultdict(list)
    for p in predictions:
        groups[(p.model, p.benchmark)].append(p)
    agreement = signal_agreement(predictions, teacher)
    out = []
    for (model, bench), preds in groups.items():
        correct = [p.correct for p in preds]
        lo, hi = bootstrap_ci(correct, bootstrap_samples, seed)
        n = len(preds)
        checked = [p.consistent for p in preds if p.consistent is not None]
        steps = [p.n_steps for p in preds if p.n_steps is not None]
        n_signals = sum(len(p.signals) for p in preds)
        agree = agreement.get(f"{model}/{bench}", {})
        out.append(
            MetricRecord(
                model=model,
                benchmark=bench,
                n=n,
                accuracy=sum(correct) / n,
                ci_low=lo,
                ci_high=hi,
                mean_output_tokens=sum(p.output_tokens for p in preds) / n,
                unparseable_rate=sum(1 for p in preds if not p.parsed) / n,
                consistency_checked=len(checked),
                consistency_rate=(sum(checked) / len(checked)) if checked else None,
                mean_steps=(sum(steps) / len(steps)) if steps else None,
                generated_signals=n_signals,
                signal_tv=agree.get("signal_tv"),
                transition_tv=agree.get("transition_tv"),
                transition_kl=agree.get("transition_kl"),
                transition_coverage=agree.get("transition_coverage"),
            )
        )
    out.sort(key=lambda m: (m.benchmark, _model_rank(m.model), m.model))
    return out


def _model_rank(model: str) -> int:
    return MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 1)


def metrics_table(metrics: Sequence[MetricRecord]) -> list[dict[str, object]]:
    """Rows for a human table (percentages rounded), one per model and benchmark."""
    return [
        {
            "model": m.model,
            "benchmark": m.benchmark,
            "n": m.n,
            "accuracy_%": round(100 * m.accuracy, 1),
            "95%_CI": f"[{100 * m.ci_low:.1f}, {100 * m.ci_high:.1f}]",
            "mean_output_tokens": round(m.mean_output_tokens, 1),
            "unparseable_%": round(100 * m.unparseable_rate, 1),
            "consistent_%": _pct(m.consistency_rate),
            "transition_tv": None if m.transition_tv is None else round(m.transition_tv, 3),
        }
        for m in metrics
    ]


def render_markdown_report(metrics: Sequence[MetricRecord], signals: dict[str, dict[str, int]] | None = None) -> str:
    """A short markdown table of :func:`metrics_table` (the full report: :mod:`rscaffold.report`)."""
    rows = metrics_table(metrics)
    lines = ["# rscaffold evaluation", ""]
    if rows:
        headers = list(rows[0])
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "---|" * len(headers))
        for r in rows:
            lines.append("| " + " | ".join("" if r[h] is None else str(r[h]) for h in headers) + " |")
    if signals:
        lines += ["", "## Generated signals", ""]
        for model, counts in signals.items():
            lines.append(f"- **{model}**: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    return "\n".join(lines) + "\n"
