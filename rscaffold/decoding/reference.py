"""The reference guided decoder: re-encodes each question's whole context at every step.

Batched like plain decoding: up to ``batch_size`` questions are decoded together, each with its
own :class:`~rscaffold.decoding.policy.GuidedRow`. Every round does one step for every active
question: one forward pass over the left-padded contexts scores the next signal of all of them
(the gate, :meth:`~rscaffold.decoding.policy.GuidedPolicy.open_step`), then one batched
``generate`` call decodes all their step bodies, each row stopping on its own (eos, signal token,
step boundary, its own token budget) with its own suppressed tokens. A question that finishes
leaves the batch and the next waiting question takes its place (continuous batching). Where each
row stopped is recomputed from its tokens with the same stopping rules ``generate`` applies (the
rows of a finished sequence are padded), so under greedy decoding every question gets exactly
what it gets when decoded alone (``batch_size=1``), up to floating-point differences from padding.

The running completion is kept as text in the training format (``<sig>step\\n\\n<sig>step...``)
and re-tokenized at each step, so the context the student sees is tokenized exactly as in
training. Its cost grows with the square of the output length; :mod:`rscaffold.decoding.cached`
gives the same outputs on a KV cache.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from rscaffold.decoding.output import Generated
from rscaffold.decoding.plain import device_of, greedy_kwargs
from rscaffold.decoding.policy import STEP_END, GuidedPolicy, GuidedRow, Step, step_text
from rscaffold.prompts import render_prompt
from rscaffold.student import backbone_of, signal_logits


def left_pad(ctxs: Sequence[Sequence[int]], pad_id: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of token lists."""
    width = max(len(c) for c in ctxs)
    ids = torch.full((len(ctxs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ctxs), width), dtype=torch.long)
    for b, c in enumerate(ctxs):
        if c:
            ids[b, width - len(c) :] = torch.as_tensor(list(c), dtype=torch.long)
            mask[b, width - len(c) :] = 1
    return ids.to(dev), mask.to(dev)


def signal_distribution(logits: torch.Tensor, pruned: Sequence[int]) -> torch.Tensor | None:
    """The next-signal distribution ``(B, K)`` from the signal logits ``(B, K)`` (float32; changed
    in place): the pruned signals get 0, the others are renormalised; None when every signal is
    pruned."""
    if pruned:
        logits[:, list(pruned)] = float("-inf")
        if torch.isinf(logits).all():
            return None
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def next_signal_distributions(
    model, ctxs: Sequence[Sequence[int]], signal_token_ids, *, head=None, pruned: Sequence[int] = (), pad_id: int = 0
) -> torch.Tensor | None:
    """Probabilities over the K signals for the next step of each context, ``(B, K)`` float32.

    The contexts are left-padded into one forward pass (positions counted from each row's first
    real token, as in ``generate``). Pruned indices get probability 0; returns None when every
    signal is pruned.
    """
    dev = device_of(model)
    input_ids, mask = left_pad(ctxs, pad_id, dev)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone_of(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state[
        :, -1
    ]
    return signal_distribution(signal_logits(model, hidden, list(signal_token_ids), head=head), pruned)


@torch.no_grad()
def next_signal_distribution(
    model, input_ids: torch.Tensor, signal_token_ids, *, head=None, pruned: Sequence[int] = ()
) -> torch.Tensor | None:
    """Probabilities over the K signals for the next step of ``input_ids`` (1, L); pruned indices get 0.

    Returns None when every signal is pruned.
    """
    probs = next_signal_distributions(model, [input_ids[0].tolist()], signal_token_ids, head=head, pruned=pruned)
    return None if probs is None else probs[0]


class StepBoundaryStop:
    """A ``generate`` stopping criterion: a row stops once its generated text (the tokens after
    position ``start``) ends a step: some text, then a step boundary
    (:data:`~rscaffold.decoding.policy.STEP_END`). Whitespace before the step's first text does not
    end it, as no training step is empty (otherwise a student that answers a forced signal with a
    blank line would spend its budget on empty steps).

    Only the last ``window`` generated tokens are decoded at each check (a step end is a character
    and a few whitespace characters, and a row stops at its first one), so a check costs the same
    at any step length. It is a pure function of the sequence, so where a row stopped can be found
    again by applying it to each prefix.
    """

    window = 8

    def __init__(self, tokenizer, start: int):
        self.tokenizer = tokenizer
        self.start = start

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        lo = max(self.start, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, lo:].tolist(), skip_special_tokens=True)
        return torch.tensor([bool(STEP_END.search(t)) for t in tails], device=input_ids.device)


class RowSuppress:
    """A ``generate`` logits processor: row ``b`` never produces the tokens ``ids[b]``."""

    def __init__(self, ids: Sequence[Sequence[int]]):
        self.ids = [list(i) for i in ids]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for b, ids in enumerate(self.ids):
            if ids:
                scores[b, ids] = float("-inf")
        return scores


@torch.no_grad()
def generate_guided_reference(
    model, questions, *, tokenizer, policy: GuidedPolicy, head, batch_size: int, system_prompt: str
) -> list[Generated]:
    dev = device_of(model)
    waiting = deque(range(len(questions)))
    active: list[GuidedRow] = []
    out: list[Generated | None] = [None] * len(questions)
    while waiting or active:
        while waiting and len(active) < batch_size:
            i = waiting.popleft()
            prompt = render_prompt(questions[i], tokenizer, system_prompt)
            active.append(GuidedRow(index=i, prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        t0 = time.perf_counter()
        _round(model, active, tokenizer=tokenizer, policy=policy, head=head, dev=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        share = (time.perf_counter() - t0) / len(active)
        for row in active:
            row.latency_s += share
            if row.done:
                out[row.index] = row.result()
        active = [r for r in active if not r.done]
    return [g for g in out if g is not None]


def _round(model, rows: list[GuidedRow], *, tokenizer, policy: GuidedPolicy, head, dev) -> None:
    """One step for every row: predict (and gate) its signal, then generate the step under it."""
    tok = tokenizer
    for r in rows:
        if policy.finished(r):
            r.done = True
    live = [r for r in rows if not r.done]
    if not live:
        return
    ctxs = [
        list(r.prompt_ids) + (tok(r.completion, add_special_tokens=False)["input_ids"] if r.completion else [])
        for r in live
    ]
    probs = next_signal_distributions(
        model, ctxs, policy.ids, head=head, pruned=policy.pruned_idx, pad_id=tok.pad_token_id
    )
    rows_probs = probs.tolist() if probs is not None else [None] * len(live)
    steps: list[Step] = []
    for b, r in enumerate(live):
        step = policy.open_step(r, rows_probs[b])
        if step.signal is not None:
            ctxs[b].append(policy.id_of[step.signal])
        steps.append(step)
    results = _generate_steps(model, ctxs, steps, tokenizer=tok, policy=policy, dev=dev)
    # Free decoding that opened the step with a signal of the model's own choosing (where the
    # policy lets it): keep that signal and generate the step under it.
    again = [
        b
        for b, (body, stop, _) in enumerate(results)
        if stop == "signal" and policy.free_signal_opens(steps[b], len(body))
    ]
    for b in again:
        stop_id = results[b][2]
        policy.take_free_signal(live[b], steps[b], policy.signal_of[stop_id])
        ctxs[b].append(stop_id)
    if again:
        redone = _generate_steps(
            model, [ctxs[b] for b in again], [steps[b] for b in again], tokenizer=tok, policy=policy, dev=dev
        )
        for b, res in zip(again, redone):
            results[b] = res
    for b, r in enumerate(live):
        body, stop, _ = results[b]
        policy.end_step(
            r,
            steps[b],
            step_text(tok.decode(body, skip_special_tokens=True)),
            stop=stop,
            tokens=len(body) + (1 if stop == "eos" else 0),
        )


def _generate_steps(
    model, ctxs: list[list[int]], steps: list[Step], *, tokenizer, policy: GuidedPolicy, dev
) -> list[tuple[list[int], str, int | None]]:
    """Greedy-decode one step body after each context, all rows in one ``generate`` call.

    Returns per row (body ids, why it stopped, stop token). Why: ``"eos"``, ``"signal"`` (a signal
    token began the next step; it is not in the body and is returned as the stop token),
    ``"separator"`` (the step boundary that ends a step), ``"length"`` (the row's token budget:
    the rest of the total budget or the per-step cap), ``"budget"`` (no tokens left).

    ``generate`` runs to the largest budget and pads rows that finished; each row's own stop is
    found again by applying, token by token, the rules ``generate`` applied (eos/signal ids, the
    step boundary in the generated text, the row's budget), so a row's result does not depend on
    the other rows.
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    tok = tokenizer
    budgets = [s.budget for s in steps]
    results: list[tuple[list[int], str, int | None]] = [([], "budget", None) for _ in ctxs]
    todo = [b for b, n in enumerate(budgets) if n > 0]
    if not todo:
        return results
    eos = tok.eos_token_id
    input_ids, mask = left_pad([ctxs[b] for b in todo], tok.pad_token_id, dev)
    width = input_ids.shape[1]
    longest = max(budgets[b] for b in todo)
    boundary = StepBoundaryStop(tok, start=width)
    suppress = [policy.suppressed(steps[b]) for b in todo]
    if all(s == suppress[0] for s in suppress):  # the same for every row
        suppressing: dict[str, Any] = {"suppress_tokens": list(suppress[0]) or None}
    else:
        suppressing = {"logits_processor": LogitsProcessorList([RowSuppress(suppress)])}
    gen = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=longest,
        eos_token_id=[eos, *policy.ids],
        stopping_criteria=StoppingCriteriaList([boundary]),
        **suppressing,
        **greedy_kwargs(tok),
    )
    new = gen[:, width:].tolist()
    n_new = gen.shape[1] - width
    # fired[b][t]: the generated text of row b holds a step boundary once new token t is in
    fired = [[False] * n_new for _ in todo]
    for t in range(n_new):
        hit = boundary(gen[:, : width + t + 1]).tolist()
        for j in range(len(todo)):
            fired[j][t] = bool(hit[j])
    sig = set(policy.ids)
    for j, b in enumerate(todo):
        row = new[j]
        body: list[int] | None = None
        for t in range(min(len(row), budgets[b])):
            tid = row[t]
            if tid == eos:
                results[b] = (row[:t], "eos", tid)
                break
            if tid in sig:
                results[b] = (row[:t], "signal", tid)
                break
            if fired[j][t] or t + 1 == budgets[b]:
                body = row[: t + 1]
                break
        else:
            body = row[: budgets[b]]
        if body is not None:
            stop = "separator" if STEP_END.search(tok.decode(body, skip_special_tokens=True)) else "length"
            results[b] = (body, stop, None)
    return results
