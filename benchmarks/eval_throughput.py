"""Evaluation decoding throughput: problems per second at batch size 1 vs 8 vs 32, plain and guided;
and tokens per second of guided vs plain decoding at long outputs, for the KV-cached guided decoder
and the re-encoding reference decoder.

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

**Long outputs** (``--lengths 256 1024 2048``): a variant of the student whose eos row is scaled
down, so that every answer uses its whole budget, decodes ``--length-questions`` questions at
batch size ``--length-batch`` with exactly N output tokens: plain decoding, guided decoding on the
KV cache and guided decoding re-encoding the context at each step (the reference; skipped above
``--reference-max`` tokens, where its quadratic cost would dominate the run). Printed: output
tokens/s of each, and guided/plain for each guided decoder (the goal: >= 0.7 at 2048 tokens with
the cache); ``same`` says whether both guided decoders gave identical outputs. The decoders run
interleaved, ``--length-repeats`` rounds of all of them, and medians with their spread are printed;
a guided/plain ratio above 1.05 (guided decoding does more work per token than plain) is the
machine's load changing between runs and is printed as invalid, not as a ratio.

**Through a server** (``--served-questions 16``): the same tiny student saved to a temporary
directory and hosted by a real local ``transformers serve`` (started and stopped by
:class:`rscaffold.serving.StudentServer`); plain decoding of the questions at concurrency 1 and 16
through :func:`rscaffold.decoding.served.generate_served`, vs in-process plain decoding at batch size 8.
(Guided decoding through a server needs vLLM's completions dialect, which no server here speaks.)

    .venv/bin/python benchmarks/eval_throughput.py [--questions 32] [--max-new-tokens 64] [--repeats 1]
        [--lengths 256 1024 2048] [--skip-batches] [--served-questions 16] [--served-tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from rscaffold.config import GuidedInferenceConfig, TinyModelConfig
from rscaffold.decoding.in_process import generate
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.models import build_tiny_model, resolve_device
from rscaffold.paths import data_dir, default_model_dir
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT
from rscaffold.student import Student
from rscaffold.training.signal_tokens import add_signal_tokens


def tiny_student(
    tokenizer_dir: str,
    tied: bool,
    device: str,
    *,
    eos_scale: float = 2.5,
    newline_scale: float = 3.0,
    signal_scale: float = 2.5,
) -> Student:
    tax = load_taxonomy(data_dir() / "signals.yaml")
    model, tok = build_tiny_model(tokenizer_dir, TinyModelConfig(seed=0, max_position_embeddings=4096))
    ids = add_signal_tokens(tok, model, tax.tokens)
    if not tied:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            vocab, hidden = model.get_input_embeddings().weight.shape
            w = torch.randn(vocab, hidden, generator=g)
            w[ids] *= signal_scale
            w[tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])] *= newline_scale  # "\n", "\n\n"
            w[tok.eos_token_id] *= eos_scale
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
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 2048], help="output tokens (long outputs)")
    ap.add_argument("--length-questions", type=int, default=8)
    ap.add_argument("--length-batch", type=int, default=8)
    ap.add_argument(
        "--length-repeats", type=int, default=3, help="long outputs: rounds of plain and guided, interleaved"
    )
    ap.add_argument("--reference-max", type=int, default=2048, help="longest output the reference decoder runs")
    ap.add_argument(
        "--newline-scale", type=float, default=2.2, help="long outputs: how often steps end (about 35 tokens a step)"
    )
    ap.add_argument("--skip-batches", action="store_true", help="only the long-output measurements")
    ap.add_argument("--served-questions", type=int, default=16, help="questions through the server (0: skip)")
    ap.add_argument("--served-tokens", type=int, default=64, help="output tokens per answer through the server")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if not args.skip_batches:
        batch_sizes(args, device)
    if args.lengths:
        long_outputs(args, device)
    if args.served_questions:
        served(args)


def served(args) -> None:
    import sys
    import tempfile
    from pathlib import Path

    from rscaffold.config import BackendConfig
    from rscaffold.decoding.served import generate_served
    from rscaffold.llm import create_backend
    from rscaffold.serving import StudentServer

    # as a plain (CoT-SFT) student: transformers serve drops special tokens from the text, so the
    # signal tokens this random model emits are not told to the decoder on either side
    scaffolded = tiny_student(args.tokenizer, False, "cpu")
    student = dataclasses.replace(scaffolded, signal_names=[], signal_tokens=[], signal_token_ids=[], scaffolded=False)
    qs = questions(args.served_questions)
    n = args.served_tokens
    print(f"\nthrough a server: transformers serve on cpu, {len(qs)} questions, plain decoding, up to {n} tokens")
    print(f"{'decoder':>28} {'tok/s':>8} {'vs in-process':>14}  same")
    t0 = time.perf_counter()
    local = generate(student, questions=qs, mode="plain", max_new_tokens=n, batch_size=8)
    local_rate = sum(g.output_tokens for g in local) / (time.perf_counter() - t0)
    print(f"{'in-process, batch 8':>28} {local_rate:>8.1f} {1.0:>13.2f}x  -", flush=True)
    cmd = (
        f"{sys.executable} -c 'from transformers.cli.transformers import app; app()' serve {{model_dir}} "
        "--host {host} --port {port} --device cpu"
    )
    with tempfile.TemporaryDirectory() as d:
        student.model.save_pretrained(d)
        student.tokenizer.save_pretrained(d)
        env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
        with StudentServer(cmd, model_dir=d, model=d, log_path=Path(d) / "server.log", env=env) as server:
            for conc in (1, 16):
                cfg = BackendConfig(backend="openai", model=d, base_url=server.base_url, concurrency=conc)
                backend = create_backend(cfg)
                generate_served(backend, student, qs[:2], max_new_tokens=8)  # warm-up
                t0 = time.perf_counter()
                out = generate_served(backend, student, qs, max_new_tokens=n)
                rate = sum(g.output_tokens for g in out) / (time.perf_counter() - t0)
                same = "yes" if [g.text for g in out] == [g.text for g in local] else "NO"
                label = f"server, concurrency {conc}"
                print(f"{label:>28} {rate:>8.1f} {rate / local_rate:>13.2f}x  {same}", flush=True)


# Guided decoding does all the work of plain decoding and more per token: a guided/plain ratio
# above 1 by more than this is the machine's load changing between the runs, not a measurement.
IMPOSSIBLE_RATIO = 1.05


def _spread(values: list[float]) -> str:
    """(max - min) / median, in percent: how much the repeats disagree."""
    med = statistics.median(values)
    return f"{100 * (max(values) - min(values)) / med:.0f}%" if med else "-"


def _ratio(guided: list[float], plain: list[float]) -> str:
    """Median of the per-round guided/plain ratios (each round ran both back to back), or a
    refusal when it cannot be right."""
    ratios = [g / p for g, p in zip(guided, plain)]
    med = statistics.median(ratios)
    if med > IMPOSSIBLE_RATIO:
        return f"{'(invalid)':>9}"
    return f"{med:>8.2f}x"


def long_outputs(args, device: str) -> None:
    # steps of some tens of tokens, as a real student writes them
    student = tiny_student(
        args.tokenizer, False, device, eos_scale=0.0, newline_scale=args.newline_scale, signal_scale=1.0
    )
    qs = questions(args.length_questions)
    guided = GuidedInferenceConfig(confidence_threshold=0.5, max_step_tokens=64)
    rounds = max(1, args.length_repeats)
    print(
        f"\nlong outputs: device {device}, {len(qs)} questions at batch size {args.length_batch}, "
        f"every answer runs to its budget; tokens/s = output tokens / wall time, median of {rounds} rounds "
        "(each round runs plain, guided kv and guided ref back to back), spread = (max - min) / median; "
        f"a guided/plain ratio above {IMPOSSIBLE_RATIO} cannot be right (the load changed): printed as invalid"
    )
    print(
        f"{'tokens':>6} {'plain tok/s':>12} {'spread':>6} {'guided kv':>10} {'spread':>6} {'kv/plain':>9}"
        f" {'guided ref':>11} {'ref/plain':>10} {'steps/answer':>13}  same"
    )

    def timed(**kw):
        t0 = time.perf_counter()
        out = generate(student, questions=qs, batch_size=args.length_batch, guided=guided, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, sum(g.output_tokens for g in out) / (time.perf_counter() - t0)

    generate(student, questions=qs[:2], mode="guided", max_new_tokens=32, batch_size=2, guided=guided)  # warm-up
    invalid = False
    for n in args.lengths:
        plain, kv, ref = [], [], []
        same = "-"
        for _ in range(rounds):
            plain.append(timed(mode="plain", max_new_tokens=n)[1])
            kv_out, rate = timed(mode="guided", max_new_tokens=n, kv_cache=True)
            kv.append(rate)
            if n <= args.reference_max:
                ref_out, rate = timed(mode="guided", max_new_tokens=n, kv_cache=False)
                ref.append(rate)
                same = (
                    "yes"
                    if [(g.text, g.signals, g.output_tokens) for g in ref_out]
                    == [(g.text, g.signals, g.output_tokens) for g in kv_out]
                    else "NO"
                )
        steps = sum(len(g.steps) for g in kv_out) / len(kv_out)
        kv_ratio = _ratio(kv, plain)
        if ref:
            ref_ratio = _ratio(ref, plain)
            ref_cols = f"{statistics.median(ref):>11.1f} {ref_ratio:>10}"
        else:
            ref_ratio, ref_cols = "", f"{'skipped':>11} {'':>10}"
        invalid |= "invalid" in kv_ratio + ref_ratio
        print(
            f"{n:>6} {statistics.median(plain):>12.1f} {_spread(plain):>6} {statistics.median(kv):>10.1f} "
            f"{_spread(kv):>6} {kv_ratio:>9} {ref_cols} {steps:>13.1f}  {same}",
            flush=True,
        )
    if invalid:
        print("invalid ratios: guided decoding measured faster than plain, so the load changed; run on a quiet machine")


def batch_sizes(args, device: str) -> None:
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
