"""Plain decoding in-process: batched greedy generation with left padding, from the student prompt
(:func:`rscaffold.prompts.render_prompt`) to eos or ``max_new_tokens``."""

from __future__ import annotations

import time
from typing import Any

import torch

from rscaffold.decoding.output import Generated, free_sources, split_output
from rscaffold.prompts import render_prompt
from rscaffold.vocabulary import STEP_SEPARATOR


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def greedy_kwargs(tokenizer) -> dict[str, Any]:
    """``generate`` arguments for greedy decoding (overriding the sampling settings a saved
    generation_config may carry)."""
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def generate_plain(model, tokenizer, questions, *, max_new_tokens, batch_size, signal_of, system_prompt):
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    dev = device_of(model)
    out: list[Generated] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(questions), batch_size):
            chunk = questions[i : i + batch_size]
            prompts = [render_prompt(q, tokenizer, system_prompt) for q in chunk]
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(dev)
            t0 = time.perf_counter()
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos, **greedy_kwargs(tokenizer))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_q = (time.perf_counter() - t0) / len(chunk)
            new = gen[:, enc["input_ids"].shape[1] :].tolist()
            for row in new:
                n = len(row)
                if eos in row:
                    n = row.index(eos) + 1
                elif pad != eos:
                    while n and row[n - 1] == pad:
                        n -= 1
                body = [t for t in row[:n] if t != eos]
                steps, step_signals = split_output(body, tokenizer, signal_of)
                out.append(
                    Generated(
                        text=STEP_SEPARATOR.join(steps),
                        signals=[s for s in step_signals if s is not None],
                        output_tokens=n,
                        latency_s=per_q,
                        steps=steps,
                        step_signals=step_signals,
                        confidences=[None] * len(steps),
                        signal_sources=free_sources(step_signals),
                    )
                )
    finally:
        tokenizer.padding_side = old_side
    return out
