"""The student's training text format: a dataset row as (prompt, completion) tokens, and batching
for the dual-objective student. Training and scoring (the gate's calibration, signal accuracy)
both encode examples through it, so a student is scored on exactly the text it was trained on.

One encoded example holds

* ``input_ids``: prompt ids followed by completion ids (tokenized separately, as at inference,
  where the completion is generated after the prompt ids);
* ``labels``: the step targets (L_step): ``-100`` on every prompt token and on every signal token,
  the completion token id elsewhere (step text, the blank lines between steps, the final eos).
  Signal tokens are predicted only by the signal objective;
* ``signal_positions`` / ``signal_labels``: the positions ``p`` whose *next* token
  ``input_ids[p + 1]`` is a signal token, and that signal's class index (its place in the
  taxonomy order). The hidden state at ``p`` is what predicts the signal (L_signal).

An example longer than ``max_length`` is handled by ``truncation``, never silently:

* ``drop``: the example is left out (``encode_example`` returns ``None``);
* ``fail``: :class:`ExampleTooLongError`;
* ``truncate_keep_end``: the whole prompt, the beginning of the completion and its ending (the
  final answer and eos) are kept, the middle of the completion is cut, so the student still learns
  how a completion ends;
* ``truncate_end``: the whole prompt and the beginning of the completion (its ending and eos are
  lost). Not offered for training; kept for teacher-forced scoring under a memory bound.

An example whose prompt alone does not leave room for one completion token is dropped under
every policy but ``fail``. :func:`encode_examples` counts what each policy did
(:class:`LengthCounts`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rscaffold.config import SegmentationConfig
from rscaffold.prompts import example_benchmark, render_example
from rscaffold.records import ExampleRecord
from rscaffold.segment import split_steps

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

Truncation = Literal["drop", "fail", "truncate_keep_end", "truncate_end"]
TRUNCATION_CHOICES: tuple[str, ...] = ("drop", "fail", "truncate_keep_end", "truncate_end")


class ExampleTooLongError(ValueError):
    """An example longer than ``max_length`` under ``truncation="fail"``."""


@dataclass
class LengthCounts:
    """What :func:`encode_examples` did with examples longer than ``max_length``.

    ``lengths``: the full token length (prompt + completion) of every example with a completion,
    before any cut; ``over_max_length``: how many of them exceed ``max_length``; ``dropped`` /
    ``truncated``: how many of those were left out / cut.
    """

    lengths: list[int] = field(default_factory=list)
    over_max_length: int = 0
    dropped: int = 0
    truncated: int = 0


def _cut(completion_ids: list[int], room: int, truncation: str) -> list[int]:
    if truncation == "truncate_end":
        return completion_ids[:room]
    # truncate_keep_end: the first half of the room from the start, the rest from the end.
    head = room // 2
    return completion_ids[:head] + completion_ids[len(completion_ids) - (room - head) :]


def encode_example(
    prompt: str,
    completion: str,
    tokenizer,
    *,
    signal_token_ids: Sequence[int] = (),
    max_length: int | None = None,
    truncation: Truncation = "truncate_end",
) -> dict[str, list[int]] | None:
    """Tokenize one pair into ``input_ids``, ``labels``, ``signal_positions``, ``signal_labels``.

    ``max_length``/``truncation``: what happens to a longer pair (see the module docstring);
    None when it is dropped."""
    if truncation not in TRUNCATION_CHOICES:
        raise ValueError(f"truncation must be one of {TRUNCATION_CHOICES}, got {truncation!r}")
    # The chat template already carries the special tokens; add_special_tokens=False avoids a
    # second BOS (and matches how inference encodes the prompt).
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
        if truncation == "fail":
            raise ExampleTooLongError(
                f"an example of {len(prompt_ids) + len(completion_ids)} tokens is longer than max_length={max_length} "
                "(training.truncation: fail)"
            )
        room = max_length - len(prompt_ids)
        if room < 1 or truncation == "drop":
            return None
        completion_ids = _cut(completion_ids, room, truncation)
    class_of = {tid: k for k, tid in enumerate(signal_token_ids)}
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids)
    signal_positions: list[int] = []
    signal_labels: list[int] = []
    for i, tid in enumerate(completion_ids):
        k = class_of.get(tid)
        if k is None:
            labels.append(tid)
        else:
            labels.append(IGNORE_INDEX)
            signal_positions.append(len(prompt_ids) + i - 1)
            signal_labels.append(k)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "signal_positions": signal_positions,
        "signal_labels": signal_labels,
    }


CompletionTarget = Literal["trace", "answer"]


def completion_steps(
    example: ExampleRecord, target: CompletionTarget = "trace", segmentation: SegmentationConfig | None = None
) -> list[tuple[str, str]]:
    """The ``(signal, text)`` steps a student is trained to write for ``example``.

    ``trace``: the labeled steps of the whole teacher trace (scaffolded and long-thinking
    students). ``answer``: the teacher's final answer text (what follows its reasoning block),
    split into steps by the segmenter the trace went through (``segmentation``, the labeling
    stage's; the short-CoT student; no signals). A teacher without a separate reasoning block wrote
    only answer text, so there both targets are the same steps.
    """
    if target == "trace":
        return [(s.signal, s.text) for s in example.steps]
    if target != "answer":
        raise ValueError(f"target must be 'trace' or 'answer', got {target!r}")
    return [("", text) for text in split_steps(example.answer_text or "", segmentation)]


def family_of(benchmark: str | Mapping[str, str] | None, source: str | None) -> str | None:
    """The prompt family of one example: of ``benchmark`` (a benchmark name or a family), or for a
    mix of benchmarks (a map of each problem source to its family) of the example's ``source``;
    None: the bare question."""
    from rscaffold.evalsets.loaders import prompt_family_of

    name = example_benchmark(benchmark, source)
    return prompt_family_of(name) if name is not None else None


def encode_examples(
    examples: Sequence[ExampleRecord],
    tokenizer,
    signal_tokens: Mapping[str, str] | None,
    *,
    signal_token_ids: Sequence[int] = (),
    max_length: int | None = None,
    truncation: Truncation = "truncate_end",
    benchmark: str | Mapping[str, str] | None = None,
    target: CompletionTarget = "trace",
    segmentation: SegmentationConfig | None = None,
    counts: LengthCounts | None = None,
) -> list[dict[str, list[int]]]:
    """Render and tokenize dataset rows (``signal_tokens=None``: the plain baseline form).

    ``benchmark``: the user message is that benchmark's family prompt (a benchmark name or a
    family, :func:`rscaffold.evalsets.loaders.prompt_family_of`; the builder of
    :func:`rscaffold.prompts.benchmark_prompt`, as at evaluation), or for a mix of benchmarks a
    map of each example's ``source`` to its family; None: the bare question.
    ``target``: what the completion holds (:func:`completion_steps`, with ``segmentation``).
    ``max_length`` / ``truncation``: what happens to longer examples (see the module docstring);
    ``counts`` (filled in when given) says how many there were and what was done with them, and
    a warning says it too. Rows without a completion (``answer`` target without answer text) or
    without any loss target after a cut are dropped, with a warning.
    """
    counts = counts if counts is not None else LengthCounts()
    rows = []
    empty = 0
    for ex in examples:
        steps = completion_steps(ex, target, segmentation)
        if not steps:
            empty += 1
            continue
        prompt, completion = render_example(
            ex.question, steps, tokenizer, signal_tokens=signal_tokens, family=family_of(benchmark, ex.source)
        )
        full = encoded_length(prompt, completion, tokenizer)
        counts.lengths.append(full)
        too_long = max_length is not None and full > max_length
        counts.over_max_length += too_long
        enc = encode_example(
            prompt,
            completion,
            tokenizer,
            signal_token_ids=signal_token_ids if signal_tokens else (),
            max_length=max_length,
            truncation=truncation,
        )
        if enc is None or (all(x == IGNORE_INDEX for x in enc["labels"]) and not enc["signal_labels"]):
            if too_long:
                counts.dropped += 1
            else:
                empty += 1
            continue
        counts.truncated += too_long
        rows.append(enc)
    if empty:
        log.warning("dropped %d of %d examples with no completion (target %s)", empty, len(examples), target)
    if counts.over_max_length:
        log.warning(
            "%d of %d examples (target %s) are longer than max_length=%s: %d dropped, %d truncated (%s)",
            counts.over_max_length,
            len(counts.lengths),
            target,
            max_length,
            counts.dropped,
            counts.truncated,
            truncation,
        )
    return rows


def encoded_length(prompt: str, completion: str, tokenizer) -> int:
    """Tokens of ``prompt`` + ``completion`` as :func:`encode_example` tokenizes them, before any cut."""
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + len(
        tokenizer(completion, add_special_tokens=False)["input_ids"]
    )


def example_lengths(
    examples: Sequence[ExampleRecord],
    tokenizer,
    signal_tokens: Mapping[str, str] | None,
    *,
    benchmark: str | Mapping[str, str] | None = None,
    target: CompletionTarget = "trace",
    segmentation: SegmentationConfig | None = None,
) -> dict[str, int]:
    """``trace_id -> tokens`` of each example as the student is trained on it (prompt and completion
    rendered as :func:`encode_examples` renders them, before any cut); examples without a completion
    for ``target`` are left out."""
    out: dict[str, int] = {}
    for ex in examples:
        steps = completion_steps(ex, target, segmentation)
        if steps:
            prompt, completion = render_example(
                ex.question, steps, tokenizer, signal_tokens=signal_tokens, family=family_of(benchmark, ex.source)
            )
            out[ex.trace_id] = encoded_length(prompt, completion, tokenizer)
    return out


def longest_step_tokens(rows: Sequence[Mapping[str, Sequence[int]]]) -> int | None:
    """Tokens of the longest step in encoded scaffolded rows: from a signal token (excluded) to
    the next signal token (excluded) or the end of the row, i.e. the step text with its ending
    (the blank line, or eos for the last step). None when no row has a signal."""
    longest = 0
    for r in rows:
        ids = r["input_ids"]
        starts = [p + 1 for p in r["signal_positions"]]  # index of each signal token
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(ids)
            longest = max(longest, end - start - 1)
    return longest or None


@dataclass
class ScaffoldCollator:
    """Right-pads a batch of encoded examples (or flattens it, ``padding_free=True``).

    Padded output: ``input_ids``/``labels``/``attention_mask`` of shape (B, T) and
    ``signal_positions``/``signal_labels`` of shape (B, S) (S = most signals in one row;
    missing entries are position 0 / label -100).

    Padding-free output: the rows concatenated into one row (1, N) with ``position_ids``
    restarting at 0 for each example and no attention mask, plus the ``cu_seq_lens_*`` /
    ``max_length_*`` / ``seq_idx`` fields TRL's own padding-free collator emits (flash-attention
    varlen kernels use them; the SDPA/eager paths of transformers >= 5 derive a block-diagonal
    causal mask from the restarting ``position_ids``). Signal positions are offset into the
    flattened row, shape (1, S_total).
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.padding_free:
            return self._flatten(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        S = max(1, max(len(e["signal_positions"]) for e in examples))
        B = len(examples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        sig_pos = torch.zeros((B, S), dtype=torch.long)
        sig_lab = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
        for b, e in enumerate(examples):
            n = lengths[b]
            input_ids[b, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
            attention_mask[b, :n] = 1
            k = len(e["signal_positions"])
            if k:
                sig_pos[b, :k] = torch.as_tensor(e["signal_positions"], dtype=torch.long)
                sig_lab[b, :k] = torch.as_tensor(e["signal_labels"], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "signal_positions": sig_pos,
            "signal_labels": sig_lab,
        }

    def _flatten(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, labels, pos, sig_pos, sig_lab = [], [], [], [], []
        offset = 0
        for e in examples:
            n = len(e["input_ids"])
            ids.extend(e["input_ids"])
            # The first token of each example would otherwise be "predicted" from the previous
            # example's last token; it is a prompt token, so its label is already -100.
            labels.extend([IGNORE_INDEX] + list(e["labels"][1:]))
            pos.extend(range(n))
            sig_pos.extend(p + offset for p in e["signal_positions"])
            sig_lab.extend(e["signal_labels"])
            offset += n
        T = offset
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = T - offset
        ids += [self.pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pad))  # padding forms its own "sequence"
        if not sig_pos:
            sig_pos, sig_lab = [0], [IGNORE_INDEX]
        position_ids = torch.tensor([pos], dtype=torch.long)
        starts = (position_ids[0] == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([T])]).to(torch.int32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": position_ids,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": int(cu.diff().max()),
            "max_length_k": int(cu.diff().max()),
            "seq_idx": torch.repeat_interleave(torch.arange(cu.numel() - 1, dtype=torch.int32), cu.diff())[None],
            "signal_positions": torch.tensor([sig_pos], dtype=torch.long),
            "signal_labels": torch.tensor([sig_lab], dtype=torch.long),
        }
