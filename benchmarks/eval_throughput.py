"""Evaluation decoding throughput: problems per second at batch size 1 vs 8 vs 32, plain and guided.

The student is a tiny random-init Llama (``rscaffold.models.build_tiny_model``) with the SmolLM2
tokenizer and the taxonomy's signal tokens. A tied random-init model greedily emits nothing but
newlines, which would make every answer equally short; its output layer is therefore replaced by
an untied random one (signal, newline and eos rows scaled up, as in ``tests/conftest.py`` (random_student)), so
that answers differ in length and guided decoding commits signals, falls back to free decoding,
ends steps at blank lines and stops at eos, like a real student. ``--tied`` keeps the plain
random-init model.

Each configuration decodes the same questions (the built-in eval problems, repeated as needed);
each mode is warmed up first. The printed ratio is problems/s relative to batch size 1 of
the same mode; ``identical`` says whether every output equals the batch-size-1 output (greedy
decoding: it must).

    .venv/bin/python benchmarks/eval_throughput.py [--questions 32] [--max-new-tokens 64] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rscaffold.config import GuidedInferenceConfig, TinyModelConfig
from rscaffold.inference import generate
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.models import build_tiny_model, resolve_device
from rscaffold.paths import data_dir, default_model_dir
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT
from rscaffold.student import Student
from rscaffold.training.signal_tokens import add_signal_tokens


def tiny_student(tokenizer_dir: str, tied: bool, device: str) -> Student:
    tax = load_taxonomy(data_dir() / "signals.yaml")
    model, tok = build_tiny_model(tokenizer_dir, TinyModelConfig(seed=0))
    ids = add_signal_tokens(tok, model, tax.tokens)
    if not tied:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            vocab, hidden = model.get_input_embeddings().weight.shape
            w = torch.randn(vocab, hidden, generator=g)
            w[ids] *= 2.5
            w[tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])] *= 3.0  # "\n", "\n\n"
            w[tok.eos_token_id] *= 2.5
            model.lm_head.weight = torch.nn.Parameter(w)
            model.config.tie_word_embeddings = False
    model.to(device).eval()
    return Student(
        model=model,
        tokenizer=tok,
        signal_names=tax.names,
        signal_tokens=tax.tokens,
        signal_token_ids=ids,
        scaffolded=True,
        signal_objective="token",
        system_prompt=STUDENT_SYSTEM_PROMPT,
    )


def questions(n: int) -> list[str]:
    rows = [
        json.loads(line)["question"]
        for line in (data_dir() / "problems" / "eval.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return [rows[i % len(rows)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--guided-steps", type=int, default=6)
    ap.add_argument("--guided-step-tokens", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.9, help="guided.confidence_threshold")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median)")
    ap.add_argument("--tokenizer", default=str(default_model_dir()))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tied", action="store_true", help="keep the tied random-init output layer")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    student = tiny_student(args.tokenizer, args.tied, device)
    qs = questions(args.questions)
    guided = GuidedInferenceConfig(
        max_steps=args.guided_steps, max_step_tokens=args.guided_step_tokens, confidence_threshold=args.threshold
    )
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {len(qs)} questions, max_new_tokens {args.max_new_tokens}, "
        f"guided: {args.guided_steps} steps x {args.guided_step_tokens} tokens, threshold {args.threshold}"
    )
    print(f"{'mode':<7} {'batch':>5} {'problems/s':>11} {'vs bs=1':>8} {'tokens/answer':>14}  identical")
    for mode in ("plain", "guided"):
        generate(
            student, questions=qs[:4], mode=mode, max_new_tokens=args.max_new_tokens, batch_size=2, guided=guided
        )  # warm-up
        reference, base_rate = None, None
        for bs in args.batch_sizes:
            times, out = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = generate(
                    student, questions=qs, mode=mode, max_new_tokens=args.max_new_tokens, batch_size=bs, guided=guided
                )
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rate = len(qs) / statistics.median(times)
            keys = [(g.text, g.signals, g.output_tokens) for g in out]
            if reference is None:
                reference, base_rate = keys, rate
            identical = "yes" if keys == reference else f"NO ({sum(a != b for a, b in zip(keys, reference))} differ)"
            mean_tokens = sum(g.output_tokens for g in out) / len(out)
            print(
                f"{mode:<7} {bs:>5} {rate:>11.2f} {rate / base_rate:>7.2f}x {mean_tokens:>14.1f}  {identical}",
                flush=True,
            )


if __name__ == "__main__":
    main()
