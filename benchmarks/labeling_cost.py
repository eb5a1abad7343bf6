"""Labeling cost: one request per trace (the Labeler's batching) versus one request per step.

For N synthetic R1/QwQ-style traces (templates below, numbers drawn from a seeded RNG), segmented
as the pipeline does (``split_steps(trace_body(...))`` with the default segmentation), this builds

- per-trace batching: the requests the :class:`rscaffold.labeling.labeler.Labeler` sends, built with
  :func:`rscaffold.labeling.prompts.build_label_request` (keyword pre-labels, answer format chosen by
  :func:`rscaffold.labeling.prompts.answer_format_for` as the Labeler does);
- one request per step: a minimal single-step prompt written here for comparison (the same
  taxonomy definitions, the question, the one step and its pre-label, "answer with the name");

and counts, per labeled step, the requests and the prompt tokens (the SmolLM2-135M-Instruct
tokenizer through ``apply_chat_template``; a whitespace count when the model dir is missing).
Counts come from the requests actually built, not from a formula. No model is run: the
"ideal answer" tokens are the length of a correct answer in each request's format.

    .venv/bin/python benchmarks/labeling_cost.py [--n-traces 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rscaffold.config import LabelingConfig
from rscaffold.labeling.keywords import keyword_prelabel
from rscaffold.labeling.prompts import (
    PROMPT_QUESTION_CHARS,
    PROMPT_STEP_CHARS,
    answer_format_for,
    build_label_request,
)
from rscaffold.labeling.taxonomy import Taxonomy, load_taxonomy
from rscaffold.llm.base import ChatRequest
from rscaffold.paths import data_dir, default_model_dir
from rscaffold.segment import split_steps, trace_body

# ---------------------------------------------------------------------------------------------
# synthetic traces (DeepSeek-R1 / QwQ style; the first two are the texts of tests/helpers.py)

NAMES = ["Natalia", "Tom", "Aisha", "Marco", "Lena", "Kenji", "Sofia", "Omar"]


def _clips(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    april = 2 * rng.randint(10, 60)
    may = april // 2
    q = (
        f"{name} sold clips to {april} of her friends in April, and then she sold half as many clips in May. "
        f"How many clips did {name} sell altogether in April and May?"
    )
    t = f"""<think>
Okay, so the problem says {name} sold clips to {april} of her friends in April, and then in May she sold half as many. I need to find the total for April and May together.

First, let me figure out how many she sold in May. Half as many as {april} is {april} divided by 2, which is {may}.

Wait, does "half as many clips" mean half as many clips or half as many friends? The question says she sold clips to {april} friends, so I'll assume one clip per friend, which means {april} clips in April.

Hmm, that assumption matters. If each friend bought more than one clip the numbers would change, but nothing in the problem suggests that.

So in May she sold {may} clips. Adding April and May: {april} + {may} = {april + may}.

Let me check that again. {april} / 2 = {may}, and {april} + {may} = {april + may}. Yes, that's right.

Alternatively, I could think of it as 1.5 times {april}, which is also {april + may}. Same answer.

Therefore, {name} sold {april + may} clips altogether.
</think>

{name} sold {april} clips in April and {april} / 2 = {may} clips in May.

The answer is {april + may}."""
    return q, t


def _path(rng: random.Random) -> tuple[str, str]:
    a, b, w = rng.randint(6, 20), rng.randint(4, 12), rng.randint(1, 3)
    oa, ob = a + 2 * w, b + 2 * w
    outer, inner = oa * ob, a * b
    strips, corners = 2 * (a * w) + 2 * (b * w), 4 * w * w
    q = f"What is the area of a {w} m wide path around a {a} m by {b} m garden?"
    t = f"""Alright, so the problem asks for the area of a {w} m wide path around the {a} m by {b} m garden.

**Step 1:** The outer rectangle is ({a} + {2 * w}) by ({b} + {2 * w}), that is {oa} by {ob}, so {outer} square meters.

- Moreover, the garden itself is {a} * {b} = {inner} square meters.

Hmm... so the path is {outer} - {inner} = {outer - inner} square meters.

Let\u2019s verify: the four strips are 2*({a}*{w}) + 2*({b}*{w}) = {strips}, plus four {w}x{w} corners = {corners}, total {strips + corners}.

So the answer is {outer - inner}."""
    return q, t


def _tank(rng: random.Random) -> tuple[str, str]:
    fill, drain = rng.randint(8, 20), rng.randint(2, 6)
    net = fill - drain
    minutes = rng.randint(5, 30)
    cap = net * minutes
    q = (
        f"A tank holds {cap} liters. A pipe fills it at {fill} liters per minute while a leak drains "
        f"{drain} liters per minute. Starting empty, how many minutes until the tank is full?"
    )
    wrong = cap / fill
    t = f"""<think>
Okay, so I need to figure out how long it takes to fill a {cap}-liter tank when water comes in at {fill} liters per minute and leaks out at {drain} liters per minute.

Let me start simple. If there were no leak, the time would be {cap} / {fill}, which is about {wrong:.2f} minutes.

But wait, that ignores the leak. The leak removes {drain} liters every minute, so the tank gains less than {fill} liters per minute.

So the net rate is {fill} - {drain} = {net} liters per minute.

Then the time is {cap} / {net} = {minutes} minutes.

Hmm, should I worry about the leak depending on the water level? The problem gives a constant {drain} liters per minute, so I'll treat it as constant.

Let me verify with a quick table. After 1 minute: {net} liters. After 2 minutes: {2 * net} liters. After {minutes} minutes: {net} * {minutes} = {cap} liters. That matches the capacity.

Also, the answer has to be more than the no-leak time of {wrong:.2f} minutes, and {minutes} is more, so the direction of the correction is right.

Alternatively, I could set up an equation: {fill}t - {drain}t = {cap}, so {net}t = {cap} and t = {minutes}.

Both methods agree.

In other words, the leak just lowers the effective filling rate from {fill} to {net} liters per minute.

Therefore, the tank is full after {minutes} minutes.
</think>

The tank gains {fill} - {drain} = {net} liters per minute, so it takes {cap} / {net} = {minutes} minutes to fill.

The answer is {minutes}."""
    return q, t


_ANIMALS = [("llama", 11.5), ("horse", 11), ("cow", 9), ("donkey", 12)]  # gestation, months


def _strategy(rng: random.Random) -> tuple[str, str]:
    animal, months = rng.choice(_ANIMALS)
    q = f"Could a {animal} birth twice during the War in Vietnam (1955-1975)?"
    t = f"""<think>
Okay, so the question is whether a {animal} could give birth twice during the Vietnam War, which ran from 1955 to 1975.

First, how long did the war last? From 1955 to 1975 is about 20 years, so 240 months.

Next, I need the gestation period of a {animal}. I recall it is roughly {months} months.

So two pregnancies back to back would take about 2 * {months} = {2 * months:g} months, roughly {2 * months / 12:.1f} years.

But a {animal} also has to reach breeding age first and recover between births. Even adding a year or two for that, the total stays far below 20 years.

Wait, does the question mean twins? "Birth twice" reads as two separate births, not twins, so I'll go with two births.

Also, the war's start date is debated; some count from 1964 or 1965. Even then the war lasted about 10 years, which is still much longer than {2 * months:g} months.

Let me double-check the gestation figure. {animal.capitalize()} pregnancies are commonly given as about {months} months, so the estimate holds.

Therefore, yes, a {animal} could give birth twice during the war.
</think>

The war lasted about 20 years and a {animal}'s gestation is about {months} months, so two births fit easily.

The answer is yes."""
    return q, t


def _quadratic(rng: random.Random) -> tuple[str, str]:
    r1, r2 = rng.sample([x for x in range(-9, 10) if x != 0], 2)
    s, p = r1 + r2, r1 * r2
    disc = s * s - 4 * p
    q = f"Find the sum of the roots of x^2 {'-' if s >= 0 else '+'} {abs(s)}x {'+' if p >= 0 else '-'} {abs(p)} = 0."
    t = f"""<think>
Alright, so the problem asks for the sum of the roots of x^2 {"-" if s >= 0 else "+"} {abs(s)}x {"+" if p >= 0 else "-"} {abs(p)} = 0.

I remember Vieta's formulas: for x^2 + bx + c = 0 the roots add up to -b and multiply to c.

Here b = {-s} and c = {p}, so the sum should be {s} and the product {p}.

Wait, I should make sure the roots are real, or at least that the question makes sense. The discriminant is b^2 - 4c = {s * s} - ({4 * p}) = {disc}.

Since {disc} is {"positive" if disc > 0 else "zero"}, there are real roots, so nothing strange is going on.

Maybe I can just factor it. I need two numbers that multiply to {p} and add to {s}: {r1} and {r2} work.

So the equation is (x - {r1})(x - {r2}) = 0 and the roots are {r1} and {r2}.

Let me check: {r1} + {r2} = {s} and {r1} * {r2} = {p}. Both match.

Alternatively, with the quadratic formula: x = ({s} \u00b1 sqrt({disc})) / 2. Adding the two roots cancels the square roots: ({s} + {s}) / 2 = {s}.

Hmm, that's the same as Vieta again, which is reassuring.

Putting it all together, every method gives a sum of {s}.
</think>

By Vieta's formulas, the sum of the roots is {s}.

The answer is {s}."""
    return q, t


TEMPLATES: list[tuple[str, Callable[[random.Random], tuple[str, str]]]] = [
    ("r1_clips", _clips),
    ("qwq_path", _path),
    ("r1_tank", _tank),
    ("r1_strategyqa", _strategy),
    ("r1_quadratic", _quadratic),
]


@dataclass
class Trace:
    trace_id: str
    question: str
    steps: list[str]


def make_traces(n: int, seed: int) -> list[Trace]:
    rng = random.Random(seed)
    cfg = LabelingConfig()
    out = []
    for i in range(n):
        kind, make = TEMPLATES[i % len(TEMPLATES)]
        question, text = make(rng)
        out.append(Trace(f"{kind}-{i:05d}", question, split_steps(trace_body(None, text), cfg.segmentation)))
    return out


# ---------------------------------------------------------------------------------------------
# the one-request-per-step comparison prompt

_STEP_SYSTEM = "You label one step of a reasoning trace with a semantic signal. Answer with the signal name only."
_MARK = " [...]"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - len(_MARK)].rstrip() + _MARK


def build_single_step_request(
    trace_id: str, index: int, question: str, *, step: str, prelabel: str | None, tax: Taxonomy
) -> ChatRequest:
    """A minimal prompt for one step: taxonomy, question, the step and its pre-label, no other steps."""
    signals = "\n".join(f"- {s.name}: {s.definition}" for s in tax.signals)
    user = (
        f"Signals:\n{signals}\n\n"
        f"Question: {_clip(question, PROMPT_QUESTION_CHARS)}\n\n"
        f"Step (pre-label: {prelabel or 'none'}): {_clip(step, PROMPT_STEP_CHARS)}\n\n"
        "Give the step one signal from the list: keep the pre-label if it fits, else correct it.\n"
        "Answer with the signal name only."
    )
    return ChatRequest(
        request_id=f"{trace_id}:label:{index}",
        messages=[{"role": "system", "content": _STEP_SYSTEM}, {"role": "user", "content": user}],
        json_schema={"type": "string", "enum": tax.names},
    )


# ---------------------------------------------------------------------------------------------
# token counting


class TokenCounter:
    def __init__(self, model_dir: Path) -> None:
        self.tok = None
        self.how = "whitespace words (tokenizer dir missing)"
        if (model_dir / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(str(model_dir))
            self.how = f"SmolLM2 tokenizer + chat template ({model_dir})"

    def prompt(self, req: ChatRequest) -> int:
        if self.tok is None:
            return sum(len(m["content"].split()) for m in req.messages)
        ids = self.tok.apply_chat_template(req.messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in recent transformers
            ids = ids["input_ids"]
        return len(ids)

    def text(self, text: str) -> int:
        if self.tok is None:
            return len(text.split())
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def _ideal_batched_answer(labels: list[str], fmt: str) -> str:
    if fmt == "lines":
        return "\n".join(f"{i}: {s}" for i, s in enumerate(labels, 1))
    return json.dumps({"labels": [{"step": i, "signal": s} for i, s in enumerate(labels, 1)]})


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-traces", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=default_model_dir())
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=LabelingConfig().sampling.max_new_tokens,
        help="labeler sampling.max_new_tokens (picks the batched answer format, as the Labeler does)",
    )
    args = ap.parse_args(argv)

    tax = load_taxonomy(data_dir() / "signals.yaml")
    counter = TokenCounter(args.model_dir)
    traces = make_traces(args.n_traces, args.seed)

    batched_req = batched_tok = batched_ans = 0
    step_req = step_tok = step_ans = 0
    n_steps = 0
    formats: Counter[str] = Counter()
    trunc_batched = trunc_step = 0
    for t in traces:
        if not t.steps:
            continue
        pre = [keyword_prelabel(s, tax)[0] for s in t.steps]
        labels = [p or tax.default_signal for p in pre]
        n_steps += len(t.steps)
        # what the Labeler sends: one request for the whole trace
        fmt = answer_format_for(len(t.steps), args.max_new_tokens, False)
        formats[fmt] += 1
        req = build_label_request(
            t.trace_id, t.question, t.steps, prelabels=pre, tax=tax, with_rationale=False, answer_format=fmt
        )
        batched_req += 1
        batched_tok += counter.prompt(req)
        batched_ans += counter.text(_ideal_batched_answer(labels, fmt))
        # build_label_request shows every step whole: trunc_batched stays 0
        # the comparison: one request per step
        for i, (step, p, lab) in enumerate(zip(t.steps, pre, labels)):
            r = build_single_step_request(t.trace_id, i, t.question, step=step, prelabel=p, tax=tax)
            step_req += 1
            step_tok += counter.prompt(r)
            step_ans += counter.text(lab)
            trunc_step += len(" ".join(step.split())) > PROMPT_STEP_CHARS

    if not n_steps:
        print("no steps: nothing to measure")
        return 1
    per_trace = [len(t.steps) for t in traces if t.steps]
    mean_steps = n_steps / len(per_trace)
    kinds = Counter(t.trace_id.rsplit("-", 1)[0] for t in traces)

    print("Labeling cost: one request per trace (Labeler) vs one request per step")
    print(f"  traces: {len(per_trace)} ({', '.join(f'{k} x{v}' for k, v in kinds.items())}), seed {args.seed}")
    print(
        f"  labeled steps: {n_steps}; steps per trace: mean {mean_steps:.2f}, median "
        f"{statistics.median(per_trace):g}, min {min(per_trace)}, max {max(per_trace)}"
    )
    print(f"  tokens: {counter.how}")
    print(
        f"  batched answer format (max_new_tokens={args.max_new_tokens}): "
        + ", ".join(f"{k} x{v}" for k, v in sorted(formats.items()))
    )
    print(f"  steps shortened in the prompt: batched {trunc_batched}, per-step {trunc_step}")
    print()
    rows = [
        ("per-trace batching", batched_req, batched_tok, batched_ans),
        ("one request per step", step_req, step_tok, step_ans),
    ]
    print(
        f"  {'':22s} {'requests':>9s} {'req/step':>9s} {'prompt tok':>11s} {'prompt tok/step':>16s}"
        f" {'ideal answer tok/step':>22s}"
    )
    for name, r, p, a in rows:
        print(f"  {name:22s} {r:9d} {r / n_steps:9.4f} {p:11d} {p / n_steps:16.1f} {a / n_steps:22.1f}")
    print()
    req_ratio = batched_req / step_req
    tok_ratio = batched_tok / step_tok
    target = 1.0 / mean_steps
    met = req_ratio <= target + 1e-12
    print(f"  requests ratio (batched / per-step):      {req_ratio:.4f}  (1/{step_req / batched_req:.2f})")
    print(f"  target: <= 1 / mean steps per trace =    {target:.4f}  -> {'MET' if met else 'NOT MET'}")
    print(f"  prompt tokens ratio (batched / per-step): {tok_ratio:.4f}  ({1 / tok_ratio:.2f}x fewer prompt tokens)")
    print(f"  ideal answer tokens ratio:                {batched_ans / step_ans:.4f}")
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())
