"""Training-step cost of the scaffolded objective versus plain SFT, on the same batch.

Both variants run ``ScaffoldTrainer.training_step`` (forward, loss, backward) plus the optimiser
step on one fixed batch built from the same synthetic examples:

- plain: the CoT-SFT baseline (no signal tokens, lambda = 0), which is TRL's SFT loss;
- scaffolded: signal tokens before every step, L_step + lambda * L_signal (``--objective``).

The scaffolded sequences are longer by one token per step (the signal tokens), so the time ratio
includes that; tokens/s compares throughput. Rounds alternate plain / scaffolded to spread
machine noise over both. Peak memory is ``torch.cuda.max_memory_allocated`` on GPU, peak RSS
(reset between variants through ``/proc/self/clear_refs``) on CPU, each also shown as the rise
above the level before the measured step (activations, gradients, optimiser temporaries). The
process holds both variants' models, so the absolute peaks include both.

    .venv/bin/python benchmarks/train_step.py [--steps 10] [--batch-size 8] [--objective token]
    .venv/bin/python benchmarks/train_step.py --model ~/.cache/rscaffold/models/SmolLM2-135M-Instruct

Target: scaffolded / plain step time <= 1.10.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rscaffold.config import TinyModelConfig, TrainingConfig
from rscaffold.models import build_tiny_model
from rscaffold.paths import default_model_dir
from rscaffold.records import ExampleRecord, Step
from rscaffold.student import SignalHead
from rscaffold.student_format import encode_examples
from rscaffold.training.signal_tokens import add_signal_tokens
from rscaffold.training.trainer import build_trainer

SIGNALS = [
    "Contrast and Concession",
    "Addition and Elaboration",
    "Reasoning and Analysis",
    "Conclusion and Summary",
    "Verification",
    "Restatement",
    "Planning",
]
TOKENS = [f"<sig:{i}>" for i in range(len(SIGNALS))]
WORDS = "the total number of apples pears is we add subtract multiply so then but wait check".split()


def synthetic_examples(n: int, steps: int, words_per_step: int, *, seed: int) -> list[ExampleRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        st = [
            Step(
                index=j,
                signal=rng.choice(SIGNALS),
                text=" ".join(rng.choice(WORDS) for _ in range(words_per_step)) + f" {rng.randint(1, 99)}.",
                source="llm",
            )
            for j in range(steps)
        ]
        out.append(
            ExampleRecord(
                trace_id=str(i),
                problem_id=str(i),
                split="train",
                question=f"Problem {i}: how many apples are left?",
                gold_answer="1",
                steps=st,
                signals=[s.signal for s in st],
                n_steps=steps,
            )
        )
    return out


def load_model(model: str | None, tokenizer_dir: str):
    if model is None:
        return build_tiny_model(tokenizer_dir, TinyModelConfig())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) from /proc; falls back to psutil/resource."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_memory(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes()[1]


class Variant:
    def __init__(self, name, trainer, batch):
        self.name = name
        self.trainer = trainer
        self.model = trainer.model
        self.batch = trainer._prepare_inputs(batch)
        # non-padding tokens (padding-free batches have no attention mask and no padding)
        self.tokens = (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        )
        self.optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
        self.times: list[float] = []
        self.peak = 0
        self.step_extra = 0

    def step(self, device: str) -> float:
        self.model.train()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.trainer.training_step(self.model, dict(self.batch))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="a causal LM directory (default: a tiny random Llama with the SmolLM2 tokenizer)"
    )
    ap.add_argument("--tokenizer", default=str(default_model_dir()), help="tokenizer for the tiny model")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps-per-example", type=int, default=8)
    ap.add_argument("--words-per-step", type=int, default=24)
    ap.add_argument("--objective", choices=["token", "head"], default="token")
    ap.add_argument("--signal-loss-weight", type=float, default=1.0)
    ap.add_argument("--bf16", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--padding-free", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)

    if args.model is None and not (Path(args.tokenizer) / "tokenizer.json").exists():
        print(
            f"tokenizer not found at {args.tokenizer}; run `rscaffold models fetch` or pass --tokenizer",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = {"auto": "auto", "true": True, "false": False}[args.bf16]
    cfg = TrainingConfig(
        student=args.model or args.tokenizer,
        tiny=None if args.model else TinyModelConfig(),
        max_steps=10_000,
        per_device_batch_size=args.batch_size,
        max_length=4096,
        bf16=bf16,
        learning_rate=1e-5,
        gradient_checkpointing=args.gradient_checkpointing,
        padding_free=args.padding_free,
        logging_steps=10_000,
        save_steps=10_000,
        signal_objective=args.objective,
        signal_loss_weight=args.signal_loss_weight,
    )
    examples = synthetic_examples(args.batch_size, args.steps_per_example, args.words_per_step, seed=args.seed)
    base, tok = load_model(args.model, args.tokenizer)

    tmp = Path(tempfile.mkdtemp(prefix="rscaffold-bench-"))
    plain_model, plain_tok = copy.deepcopy(base), copy.deepcopy(tok)
    plain_rows = encode_examples(examples, plain_tok, None, signal_token_ids=(), max_length=cfg.max_length)
    plain_tr = build_trainer(
        plain_model,
        plain_tok,
        plain_rows,
        cfg=cfg,
        checkpoint_dir=tmp / "plain",
        signal_token_ids=[],
        signal_objective="token",
        signal_loss_weight=0.0,
    )
    plain = Variant("plain", plain_tr, plain_tr.data_collator(plain_rows))

    sc_model, sc_tok = base, tok
    ids = add_signal_tokens(sc_tok, sc_model, TOKENS)
    if args.objective == "head":
        sc_model.signal_head = SignalHead(sc_model.config.get_text_config().hidden_size, len(SIGNALS))
    sc_rows = encode_examples(
        examples, sc_tok, dict(zip(SIGNALS, TOKENS)), signal_token_ids=ids, max_length=cfg.max_length
    )
    sc_tr = build_trainer(
        sc_model,
        sc_tok,
        sc_rows,
        cfg=cfg,
        checkpoint_dir=tmp / "scaffolded",
        signal_token_ids=ids,
        signal_objective=args.objective,
        signal_loss_weight=args.signal_loss_weight,
    )
    scaffolded = Variant("scaffolded", sc_tr, sc_tr.data_collator(sc_rows))
    variants = [plain, scaffolded]

    for v in variants:
        for _ in range(args.warmup):
            v.step(device)
    for v in variants:  # peak memory of one step, each variant measured on its own
        reset_peak_memory(device)
        before = torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()[0]
        v.step(device)
        v.peak = peak_memory(device)
        v.step_extra = v.peak - before
    for _ in range(args.steps):  # interleaved rounds
        for v in variants:
            v.times.append(v.step(device))

    name = (
        args.model
        or f"tiny Llama (hidden {TinyModelConfig().hidden_size}, {TinyModelConfig().num_hidden_layers} layers) + SmolLM2 tokenizer"
    )
    print(f"model: {name}")
    print(
        f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"bf16: {sc_tr.args.bf16}, batch {args.batch_size} x {args.steps_per_example} steps/example, objective: {args.objective}, "
        f"lambda {args.signal_loss_weight}, gradient checkpointing: {args.gradient_checkpointing}, padding-free: {args.padding_free}"
    )
    mem_label = "peak CUDA memory" if device == "cuda" else "peak RSS"
    results = {}
    for v in variants:
        med = statistics.median(v.times)
        results[v.name] = {
            "median_step_s": med,
            "mean_step_s": statistics.fmean(v.times),
            "tokens": v.tokens,
            "tokens_per_s": v.tokens / med,
            "peak_memory_bytes": v.peak,
            "step_memory_bytes": v.step_extra,
        }
        print(
            f"{v.name:>11}: step {med * 1000:8.1f} ms (median of {len(v.times)}), {v.tokens} tokens/batch, "
            f"{v.tokens / med:10.0f} tokens/s, {mem_label} {v.peak / 2**20:8.1f} MiB "
            f"(+{v.step_extra / 2**20:.1f} MiB above the pre-step level)"
        )
    ratio = results["scaffolded"]["median_step_s"] / results["plain"]["median_step_s"]
    tok_ratio = results["scaffolded"]["tokens"] / results["plain"]["tokens"]
    per_token = ratio / tok_ratio
    mem_ratio = results["scaffolded"]["peak_memory_bytes"] / max(1, results["plain"]["peak_memory_bytes"])
    print(
        f"ratio scaffolded/plain: step time {ratio:.3f} (target <= 1.10: {'OK' if ratio <= 1.10 else 'ABOVE'}), "
        f"tokens {tok_ratio:.3f}, time per token {per_token:.3f}, peak memory {mem_ratio:.3f}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "device": device,
                    "model": name,
                    "results": results,
                    "ratio": ratio,
                    "tokens_ratio": tok_ratio,
                    "time_per_token_ratio": per_token,
                    "memory_ratio": mem_ratio,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
