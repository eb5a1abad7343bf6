"""What the evaluation stage answers: one :class:`EvalSuite` per benchmark (its problems, answer
type and prompt template).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rscaffold.evalsets.loaders import benchmark_source_digest  # noqa: F401 - re-exported
from rscaffold.prompts import fill_prompt
from rscaffold.records import ProblemRecord


@dataclass
class EvalSuite:
    """The problems of one benchmark, and how its answers look (``numeric``: the answer is a
    number, so extraction only accepts numbers)."""

    name: str
    answer_type: str
    prompt_template: str
    problems: list[ProblemRecord]
    numeric: bool = False
    removed_overlap: int = 0  # problems left out because they are also training problems

    def prompts(self, style: str = "benchmark") -> list[str]:
        """The user messages: the benchmark family's prompt (the builder the teacher and the
        students' training data use), or the bare question."""
        if style == "question":
            return [p.question for p in self.problems]
        return [fill_prompt(self.prompt_template, p.question) for p in self.problems]


def evaluation_suites(
    ecfg,
    default_benchmark,
    default_problems: Sequence[ProblemRecord],
    *,
    exclude: Mapping[str, Sequence[str]] | None = None,
) -> list[EvalSuite]:
    """What the evaluation stage answers: ``ecfg.benchmarks`` (an :class:`EvaluationConfig`), or
    when it is empty the problems stage's eval split (``default_problems``, the first
    ``ecfg.limit`` of them) as ``default_benchmark`` (a benchmark name, or a
    :class:`~rscaffold.evalsets.loaders.Benchmark` such as a custom format's; a list of them for
    a mix of benchmarks: one suite each, of the problems whose ``source`` it is). ``exclude``: per
    benchmark name, problem ids left out of a loaded benchmark (trained on)."""
    from rscaffold.evalsets.loaders import Benchmark, benchmark_for, get_benchmark

    if not ecfg.benchmarks:
        if isinstance(default_benchmark, (list, tuple)):  # a mix: one suite per benchmark, its own problems
            return [
                s
                for b in default_benchmark
                for s in evaluation_suites(ecfg, b, [p for p in default_problems if p.source == b.name])
                if s.problems
            ]
        bench = default_benchmark if isinstance(default_benchmark, Benchmark) else get_benchmark(default_benchmark)
        rows = list(default_problems)[: ecfg.limit] if ecfg.limit else list(default_problems)
        return [EvalSuite(bench.name, bench.answer_type, bench.prompt_template, rows, bench.numeric_answer)]
    suites = []
    for b in ecfg.benchmarks:
        bench = benchmark_for(b.name, b.custom)
        rows = bench.load(
            b.source,
            "eval",
            b.limit if b.limit is not None else ecfg.limit,
            seed=b.seed,
            part=b.part,
            heldout_fraction=b.heldout_fraction,
        )
        drop = set((exclude or {}).get(bench.name, ()))
        kept = [r for r in rows if r.problem_id not in drop]
        suites.append(
            EvalSuite(
                bench.name, bench.answer_type, bench.prompt_template, kept, bench.numeric_answer, len(rows) - len(kept)
            )
        )
    return suites
