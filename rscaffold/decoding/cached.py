"""Guided decoding on a KV cache: the rule of :mod:`rscaffold.decoding.policy`, with the outputs of
the reference decoder (:mod:`rscaffold.decoding.reference`) under greedy decoding, at a cost linear
in the output length.

Each question's keys and values stay in a :class:`~rscaffold.kv_cache.RowCache` and every forward
pass runs one token per row, with no rounds: the rows of the batch move on independently. In each
forward pass a row inside a step feeds its last chosen token (or the signal token that opens the
step) and gets its next token; a row whose step has just ended (or that has just joined the batch)
records the step, re-tokenizes its completion (as the reference sees it; only the text from its
last signal token on is tokenized again, which gives the same ids with a fast tokenizer whose
signal tokens take no whitespace around them), takes back what its cache holds past the common
prefix with that context and feeds the rest (usually the last step's few tokens: re-tokenizing a
step's text can differ from the generated ids near its end), in the same forward pass as the other
rows' single tokens; its last hidden state gives its next-signal distribution (and, with no signal
committed, its first token). A row that finishes hands its place in the batch to the next waiting
question at once. One LM-head call and one argmax serve the whole batch per forward pass, and the
step-boundary check decodes a row's last tokens only when they hold the two newlines a step end
needs. Only models whose every layer attends to the full context use the cache
(:func:`~rscaffold.kv_cache.supports_row_cache`; others fall back to the reference decoder).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rscaffold.decoding.output import Generated
from rscaffold.decoding.plain import device_of
from rscaffold.decoding.policy import STEP_END, GuidedPolicy, GuidedRow, Step, step_text
from rscaffold.decoding.reference import StepBoundaryStop, signal_distribution
from rscaffold.kv_cache import RowCache
from rscaffold.prompts import render_prompt
from rscaffold.student import backbone_of, causal_lm_of, signal_logits


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n, chunk = 0, 256
    end = min(len(a), len(b))
    while n + chunk <= end and a[n : n + chunk] == b[n : n + chunk]:  # whole chunks, compared in C
        n += chunk
    for x, y in zip(a[n:end], b[n:end]):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _StepState(Step):
    """One row's step on the cache, from its signal to its end."""

    body: list[int] = field(default_factory=list)
    newlines: list[int] = field(default_factory=list)  # per body token: the newlines in its text
    stop: str | None = None  # set when the step ended: eos / signal / separator / length / budget
    pending: int | None = None  # the token to feed next (the committed signal, or the last chosen token)


@torch.no_grad()
def generate_guided_cached(
    model, questions, *, tokenizer, policy: GuidedPolicy, head, batch_size: int, system_prompt: str
) -> list[Generated]:
    """The reference decoder's outputs on a :class:`RowCache`, each row on its own schedule.

    Every forward pass feeds each row of the batch what it needs next: a row inside a step feeds
    its last chosen token (or the signal token that opens the step); a row whose step has just
    ended (or that has just joined) feeds its context — the prompt and the completion
    re-tokenized, as the reference decoder sees it — from where it differs from what the cache
    holds (usually the last step's few tokens; one ``extend`` takes a different number of tokens
    per row). The last hidden state of a row that fed its context gives its next-signal
    distribution (and, with no signal committed, its first token); the other rows' give their
    next token. A row that finishes hands its place to the next waiting question at once.
    """
    tok = tokenizer
    dev = device_of(model)
    cache = RowCache(dev)
    backbone = backbone_of(model)
    lm_head = causal_lm_of(model).get_output_embeddings()
    waiting = deque(range(len(questions)))
    out: list[Generated | None] = [None] * len(questions)
    rows: list[GuidedRow] = []
    # per row: its step being decoded; None: the row starts a step (feeds its context) next
    steps: list[_StepState | None] = []
    eos = tok.eos_token_id
    signal_ids = set(policy.ids)
    window = StepBoundaryStop.window
    newlines: dict[int, int] = {}  # token id -> the newlines in its text
    retokenize = _Retokenizer(tok, policy.ids)
    anchors: list[tuple[int, list[int]] | None] = []  # per row: see _Retokenizer
    signal_index = torch.as_tensor(policy.ids, dtype=torch.long, device=dev)

    def admit() -> GuidedRow | None:
        while waiting:
            i = waiting.popleft()
            prompt = render_prompt(questions[i], tok, system_prompt)
            r = GuidedRow(index=i, prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"])
            if not policy.finished(r):
                return r
            out[i] = r.result()  # no budget: no step
        return None

    while True:
        while len(rows) < batch_size:
            r = admit()
            if r is None:
                break
            rows.append(r)
            steps.append(None)
            anchors.append(None)
            cache.add_rows(1)
        if not rows:
            break
        t0 = time.perf_counter()
        new: list[list[int]] = []
        starts: list[int] = []
        for b, r in enumerate(rows):
            st = steps[b]
            if st is not None:
                new.append([st.pending])
                continue
            starts.append(b)
            ids, anchors[b] = retokenize(r.completion, anchors[b])
            ctx = r.prompt_ids + ids
            # keep at least the last token out, to have its hidden state
            n = min(_common_prefix(cache.tokens[b], ctx), len(ctx) - 1)
            cache.truncate(b, n)
            new.append(ctx[n:])
        hidden = cache.extend(backbone, new)
        # every row's next-token logits, in one call (with a signal head, only where needed)
        logits = lm_head(hidden) if head is None else None
        # rows whose next token is chosen from their last hidden state
        choose = [b for b, st in enumerate(steps) if st is not None]
        if starts:
            if logits is None:
                sig_logits = signal_logits(model, hidden[starts], policy.ids, head=head)
            else:  # signal_logits without the head: the LM head's logits at the signal tokens
                sig_logits = logits[starts].index_select(-1, signal_index).float()
            probs = signal_distribution(sig_logits, policy.pruned_idx)
            rows_probs = probs.tolist() if probs is not None else [None] * len(starts)
            for j, b in enumerate(starts):
                st = policy.open_step(rows[b], rows_probs[j], _StepState())
                if st.signal is not None:
                    st.pending = policy.id_of[st.signal]
                steps[b] = st
                if st.budget <= 0:
                    st.stop, st.pending = "budget", None
                elif st.pending is None:
                    choose.append(b)
        if choose:
            # (with the LM head's logits at hand, every row's argmax: no copy of the chosen rows)
            scores = (lm_head(hidden[choose]) if logits is None else logits).float()
            suppress = [policy.suppressed(steps[b]) for b in choose]
            if all(s == suppress[0] for s in suppress):  # the same for every row
                if suppress[0]:
                    scores[:, suppress[0]] = float("-inf")
            else:
                for j, (b, s) in enumerate(zip(choose, suppress)):
                    if s:
                        scores[j if logits is None else b, s] = float("-inf")
            best = scores.argmax(dim=-1).tolist()
            chosen = best if logits is None else [best[b] for b in choose]
            for b, t in zip(choose, chosen):
                st = steps[b]
                st.pending = None
                if t == eos:
                    st.stop = "eos"
                elif t in signal_ids:
                    if policy.free_signal_opens(st, len(st.body)):
                        # free decoding opened the step with a signal of the model's own choosing
                        policy.take_free_signal(rows[b], st, policy.signal_of[t])
                        if st.budget <= 0:
                            st.stop = "budget"
                        else:
                            st.pending = t
                    else:
                        st.stop = "signal"
                else:
                    st.body.append(t)
                    nl = newlines.get(t)
                    if nl is None:
                        nl = newlines[t] = tok.decode([t], skip_special_tokens=True).count("\n")
                    st.newlines.append(nl)
                    # StepBoundaryStop's check on the body's last `window` tokens. A step end holds
                    # two newlines and decoding never makes a newline that no token's own text
                    # holds, so the tail is decoded only when its tokens hold two.
                    if (
                        sum(st.newlines[-window:]) >= 2
                        and STEP_END.search(tok.decode(st.body[-window:], skip_special_tokens=True))
                    ) or len(st.body) >= st.budget:
                        st.stop = (
                            "separator" if STEP_END.search(tok.decode(st.body, skip_special_tokens=True)) else "length"
                        )
                    else:
                        st.pending = t
        for b, r in enumerate(rows):
            st = steps[b]
            if st.stop is None:
                continue
            policy.end_step(
                r,
                st,
                step_text(tok.decode(st.body, skip_special_tokens=True)),
                stop=st.stop,
                tokens=len(st.body) + (1 if st.stop == "eos" else 0),
            )
            steps[b] = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        share = (time.perf_counter() - t0) / len(rows)
        keep: list[int] = []
        for b, r in enumerate(rows):
            r.latency_s += share
            if not r.done:
                keep.append(b)
                continue
            out[r.index] = r.result()
            nxt = admit()
            if nxt is not None:
                # the next question takes this row (the cache keeps what it shares with its
                # context, the system prompt)
                rows[b], steps[b], anchors[b] = nxt, None, None
                keep.append(b)
        if len(keep) < len(rows):
            cache.keep_rows(keep)
            rows = [rows[b] for b in keep]
            steps = [steps[b] for b in keep]
            anchors = [anchors[b] for b in keep]
        if cache.holes() * 4 > cache.rows * cache.width:
            cache.compact()
    return [g for g in out if g is not None]


class _Retokenizer:
    """The token ids of a growing completion, as ``tokenizer(completion)`` gives them, re-tokenizing
    only its text from its last signal token on.

    A signal token is a special token that takes no whitespace around it (no lstrip / rstrip /
    single_word, not normalized): a fast tokenizer splits the text at it before normalizing and
    pre-tokenizing the pieces, so the ids before it do not depend on the text after it, and the
    piece after it is tokenized alike whatever precedes it (that piece starts past the text's
    start either way, as the signal token is kept in the re-tokenized text). Each call returns the
    ids and an anchor for the next call on the same completion grown: (the offset of its last
    signal token, the ids before it). Other tokenizers re-tokenize the whole completion.
    """

    def __init__(self, tokenizer, signal_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.signal_ids = set(signal_token_ids)
        added = getattr(tokenizer, "added_tokens_decoder", {})

        def plain(i: int) -> bool:
            a = added.get(i)
            return a is not None and not any(
                getattr(a, f, True) for f in ("lstrip", "rstrip", "single_word", "normalized")
            )

        self.split = bool(getattr(tokenizer, "is_fast", False)) and all(plain(i) for i in self.signal_ids)

    def __call__(
        self, text: str, anchor: tuple[int, list[int]] | None
    ) -> tuple[list[int], tuple[int, list[int]] | None]:
        if not text:
            return [], None
        if not self.split:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], None
        start, head = anchor if anchor is not None else (0, [])
        enc = self.tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True)
        part = enc["input_ids"]
        if start and not (part and part[0] in self.signal_ids):  # not the anchor (cannot happen)
            return self(text, None)
        for j in range(len(part) - 1, -1, -1):
            if part[j] in self.signal_ids:
                anchor = (start + enc["offset_mapping"][j][0], head + part[:j])
                break
        return head + part, anchor
