"""A GPU check: what a first GPU run exercises, in minutes, without downloading weights.

Every model is random-init, built from a config with a real model's shapes; the tokenizer is the
embedded default model's (``rscaffold models fetch``), its vocabulary padded to the real model's.
The library is called directly (no Prefect), so this runs where torch, transformers, peft and TRL
are. Each part prints its figures and PASS / FAIL (a part that cannot run here says SKIP):

a. **training**: a Qwen2.5-0.5B-shaped student (tied embeddings, 151,936 rows) trains in bf16 for
   ``--steps`` steps at sequence length 4096, with the scaffolded objective and with plain SFT on
   the same examples; tokens/s, model FLOPs utilisation (MFU) against the GPU's bf16 peak, peak
   memory, and the scaffolded/plain step-time ratio. Targets: MFU >= 40%, ratio <= 1.05.
b. **LoRA**: a Qwen2.5-7B-shaped student (untied embeddings, padded vocabulary) cut to
   ``--lora-layers`` layers trains LoRA adapters; the signal rows of both embedding matrices must
   change.
c. **decoding**: KV-cached signal-guided decoding vs plain generation of the same student at 2048
   new tokens and batch 32: the guided/plain tokens/s ratio. Target >= 0.7.
d. **isolation**: a model stage in a spawned child process (the pipeline's ``run_in_child``); the
   GPU's free memory is back to what it was once the child exits (within 64 MiB).
e. **vLLM**: where vLLM is installed, the in-process engine backend generates, and a ``vllm
   serve`` student answers guided decoding end to end (SKIP without vLLM).

    .venv/bin/python benchmarks/gpu_check.py                 # on a GPU (about 5 minutes on an H100)
    .venv/bin/python benchmarks/gpu_check.py --tiny          # tiny shapes on CPU (a test runs this)
    .venv/bin/python benchmarks/gpu_check.py --parts a c --peak-tflops 989

The targets apply on a GPU; with ``--tiny`` (or on CPU) a part passes when it runs and its
functional check holds (finite losses, the signal rows change, outputs made, the child's memory
returned), its figures printed for the record. Exit status: 0 when every part run passed.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rscaffold.config import LoraSettings, TrainingConfig
from rscaffold.paths import default_model_dir
from rscaffold.student_format import encode_examples
from rscaffold.training.signal_tokens import add_signal_tokens
from rscaffold.training.trainer import build_trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import SIGNALS, TOKENS, Variant, peak_memory, reset_peak_memory, synthetic_examples  # noqa: E402

# bf16 dense peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name()
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
    "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
    "RTX 6000 Ada": 364.0, "A6000": 155.0,
}  # fmt: skip
# Qwen2.5 config.json values (hub, model card); the vocabulary is padded past the tokenizer's
QWEN25_05B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
)  # fmt: skip
QWEN25_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
)  # fmt: skip
MEMORY_SLACK = 64 * 2**20


@dataclass
class Result:
    part: str
    status: str = "PASS"  # PASS, FAIL, SKIP
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.notes.append(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.status = "FAIL"


@dataclass
class Setup:
    device: str
    tiny: bool
    tokenizer_dir: str
    steps: int
    seq_len: int
    lora_layers: int
    new_tokens: int
    batch: int
    peak_flops: float | None
    work: Path


def qwen2(setup: Setup, shape: dict[str, Any], *, layers: int | None = None, dtype=torch.float32):
    """A random-init Qwen2ForCausalLM with ``shape`` and the embedded tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(setup.tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    shape = dict(shape)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    shape.setdefault("vocab_size", len(tok) + 64)
    shape["vocab_size"] = max(shape["vocab_size"], len(tok) + len(TOKENS))
    config = Qwen2Config(
        **shape,
        max_position_embeddings=max(4096, setup.seq_len + setup.new_tokens + 512),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model, tok


def sync(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def training_config(setup: Setup, **extra: Any) -> TrainingConfig:
    return TrainingConfig(
        student=setup.tokenizer_dir,
        max_steps=10_000,
        per_device_batch_size=extra.pop("batch", 1 if not setup.tiny else 2),
        max_length=setup.seq_len,
        bf16=setup.device == "cuda",
        learning_rate=extra.pop("learning_rate", 1e-5),
        gradient_checkpointing=extra.pop("gradient_checkpointing", False),
        logging_steps=10_000,
        save_steps=10_000,
        **extra,
    )


def examples_for(setup: Setup, n: int):
    """Examples longer than ``seq_len`` tokens (cut to it: every row is exactly ``seq_len``)."""
    words = 45 if not setup.tiny else 12
    steps = setup.seq_len // words + 2
    return synthetic_examples(n, steps, words, seed=0)


def train_flops_per_token(model, seq_len: int) -> float:
    """6 x the matmul parameters (the input embedding is a lookup; the LM head a matmul, tied or
    not) + the attention's 12 x layers x hidden x sequence (PaLM's estimate, no causal discount)."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        params += model.get_input_embeddings().weight.numel()
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# ---------------------------------------------------------------------------------------------
# a. training: scaffolded vs plain, bf16, sequence length 4096


def part_a(setup: Setup) -> Result:
    r = Result("a. training, scaffolded vs plain SFT")
    dtype = torch.bfloat16 if setup.device == "cuda" else torch.float32
    shape = TINY if setup.tiny else QWEN25_05B
    cfg = training_config(setup, batch=2 if setup.tiny else 4)
    examples = examples_for(setup, cfg.per_device_batch_size)
    variants = []
    for name in ("plain", "scaffolded"):
        model, tok = qwen2(setup, shape, dtype=dtype)
        ids = add_signal_tokens(tok, model, TOKENS) if name == "scaffolded" else []
        mapping = dict(zip(SIGNALS, TOKENS)) if ids else None
        rows = encode_examples(examples, tok, mapping, signal_token_ids=ids, max_length=setup.seq_len)
        trainer = build_trainer(
            model,
            tok,
            rows,
            cfg=cfg,
            checkpoint_dir=setup.work / name,
            signal_token_ids=ids,
            signal_objective="token",
            signal_loss_weight=1.0 if ids else 0.0,
        )
        variants.append(Variant(name, trainer, trainer.data_collator(rows)))
    flops = train_flops_per_token(variants[0].model, setup.seq_len)
    for v in variants:
        v.step(setup.device)  # warm-up (kernels, allocator)
        reset_peak_memory(setup.device)
        v.step(setup.device)
        v.peak = peak_memory(setup.device)
    losses = []
    for _ in range(setup.steps):  # interleaved, so that machine noise falls on both
        for v in variants:
            v.times.append(v.step(setup.device))
    for v in variants:
        v.model.eval()
        with torch.no_grad():
            batch = {k: t for k, t in v.batch.items() if k in ("input_ids", "attention_mask", "labels")}
            losses.append(float(v.model(**batch).loss))
    for v in variants:
        med = statistics.median(v.times)
        tps = v.tokens / med
        r.figures[f"{v.name} tokens/s"] = round(tps)
        r.figures[f"{v.name} step s"] = round(med, 4)
        r.figures[f"{v.name} peak memory GiB"] = round(v.peak / 2**30, 2)
        if setup.peak_flops:
            r.figures[f"{v.name} MFU"] = round(tps * flops / setup.peak_flops, 3)
    ratio = statistics.median(variants[1].times) / statistics.median(variants[0].times)
    r.figures["tokens per batch (plain, scaffolded)"] = (variants[0].tokens, variants[1].tokens)
    r.figures["scaffolded/plain step time"] = round(ratio, 3)
    r.check(all(math.isfinite(x) for x in losses), f"finite losses after training ({losses})")
    if not setup.tiny and setup.device == "cuda":
        if setup.peak_flops:
            r.check(r.figures["scaffolded MFU"] >= 0.40, "MFU >= 40% (scaffolded)")
        else:
            r.notes.append("MFU not computed: unknown GPU (pass --peak-tflops)")
        r.check(ratio <= 1.05, "scaffolded/plain step time <= 1.05")
    else:
        r.notes.append("targets (MFU >= 40%, ratio <= 1.05) apply at full shapes on a GPU")
    return r


# ---------------------------------------------------------------------------------------------
# b. LoRA on a 7B-shaped student cut to a few layers


def part_b(setup: Setup) -> Result:
    r = Result("b. LoRA, 7B-shaped (untied, padded vocabulary)")
    from rscaffold.student import causal_lm_of

    dtype = torch.bfloat16 if setup.device == "cuda" else torch.float32
    shape = dict(TINY, tie_word_embeddings=False) if setup.tiny else QWEN25_7B
    model, tok = qwen2(setup, shape, layers=setup.lora_layers, dtype=dtype)
    r.figures["embedding rows / tokenizer entries"] = (model.get_input_embeddings().weight.shape[0], len(tok))
    ids = add_signal_tokens(tok, model, TOKENS)
    before_in = model.get_input_embeddings().weight[ids].detach().float().clone()
    before_out = model.get_output_embeddings().weight[ids].detach().float().clone()
    cfg = training_config(
        setup,
        batch=2,
        learning_rate=1e-3,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        gradient_checkpointing=not setup.tiny,
    )
    rows = encode_examples(
        examples_for(setup, 8), tok, dict(zip(SIGNALS, TOKENS)), signal_token_ids=ids, max_length=setup.seq_len
    )
    trainer = build_trainer(
        model, tok, rows, cfg=cfg, checkpoint_dir=setup.work / "lora", signal_token_ids=ids, signal_objective="token"
    )
    trainer.args.max_steps = max(2, setup.steps // 2)
    reset_peak_memory(setup.device)
    t0 = time.perf_counter()
    trainer.train()
    sync(setup)
    r.figures["steps"] = trainer.args.max_steps
    r.figures["s/step"] = round((time.perf_counter() - t0) / trainer.args.max_steps, 3)
    r.figures["peak memory GiB"] = round(peak_memory(setup.device) / 2**30, 2)
    merged = causal_lm_of(trainer.model.merge_and_unload())
    after_in = merged.get_input_embeddings().weight[ids].detach().float()
    after_out = merged.get_output_embeddings().weight[ids].detach().float()
    r.figures["signal rows changed (input, output)"] = (
        float((after_in - before_in).abs().max()),
        float((after_out - before_out).abs().max()),
    )
    r.check(float((after_in - before_in).abs().max()) > 0, "the signal rows of the input embedding changed")
    r.check(float((after_out - before_out).abs().max()) > 0, "the signal rows of the output embedding changed")
    return r


# ---------------------------------------------------------------------------------------------
# c. KV-cached guided decoding vs plain generation


def part_c(setup: Setup) -> Result:
    r = Result(f"c. guided (KV-cached) vs plain decoding, {setup.new_tokens} new tokens, batch {setup.batch}")
    from rscaffold.decoding.in_process import generate
    from rscaffold.decoding.policy import GuidedSettings
    from rscaffold.student import Student

    dtype = torch.bfloat16 if setup.device == "cuda" else torch.float32
    model, tok = qwen2(setup, TINY if setup.tiny else QWEN25_05B, dtype=dtype)
    ids = add_signal_tokens(tok, model, TOKENS)
    student = Student(
        model=model.eval(),
        tokenizer=tok,
        signal_names=list(SIGNALS),
        signal_tokens=list(TOKENS),
        signal_token_ids=ids,
        scaffolded=True,
        signal_objective="token",
    )
    questions = [
        f"Problem {i}: a farmer has {i + 3} sheep and buys {2 * i + 1} more. How many?" for i in range(setup.batch)
    ]
    rates = {}
    for mode in ("plain", "guided"):
        generate(student, questions[:2], mode=mode, max_new_tokens=8, batch_size=2)  # warm-up
        sync(setup)
        t0 = time.perf_counter()
        out = generate(
            student,
            questions,
            mode=mode,
            max_new_tokens=setup.new_tokens,
            batch_size=setup.batch,
            guided=GuidedSettings() if mode == "guided" else None,
        )
        sync(setup)
        seconds = time.perf_counter() - t0
        tokens = sum(g.output_tokens for g in out)
        rates[mode] = tokens / seconds
        r.figures[f"{mode} tokens/s"] = round(rates[mode], 1)
        r.figures[f"{mode} output tokens"] = tokens
        r.check(len(out) == len(questions) and tokens > 0, f"{mode}: an answer per question")
    ratio = rates["guided"] / rates["plain"]
    r.figures["guided/plain tokens/s"] = round(ratio, 3)
    if not setup.tiny and setup.device == "cuda":
        r.check(ratio >= 0.7, "guided/plain tokens/s >= 0.7")
    else:
        r.notes.append("target (guided/plain >= 0.7 at 2048 tokens) applies at full shapes on a GPU")
    return r


# ---------------------------------------------------------------------------------------------
# d. a model stage in its child process; memory back after it exits


def child_stage(tokenizer_dir: str, tiny: bool, device: str) -> dict[str, float]:
    """The stage run in the child: load a model on the device, train a step, report its memory."""
    if tiny:
        torch.set_num_threads(1)
    setup = Setup(device, tiny, tokenizer_dir, 1, 64 if tiny else 2048, 2, 0, 1, None, Path(tempfile.mkdtemp()))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = qwen2(setup, TINY if tiny else QWEN25_05B, dtype=dtype)
    batch = tok(["a farmer has sheep " * (setup.seq_len // 5)], return_tensors="pt").to(device)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    sync(setup)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    shutil.rmtree(setup.work, ignore_errors=True)
    return {"child peak GiB": peak / 2**30, "child pid": os.getpid()}


def free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def part_d(setup: Setup) -> Result:
    r = Result("d. a model stage in a child process, memory returned")
    from rscaffold_tasks._child import run_in_child  # no Prefect: the pipeline's child runner

    from rscaffold.models import free_accelerator_memory

    free_accelerator_memory()
    before = free_gpu_bytes() if setup.device == "cuda" else None
    got = run_in_child(
        "gpu_check:child_stage", {"tokenizer_dir": setup.tokenizer_dir, "tiny": setup.tiny, "device": setup.device}
    )
    r.figures["child peak GiB"] = round(got["child peak GiB"], 2)
    r.check(got["child pid"] != os.getpid(), "the stage ran in another process")
    if before is not None:
        time.sleep(1.0)
        after = free_gpu_bytes()
        r.figures["free GPU memory before / after (GiB)"] = (round(before / 2**30, 2), round(after / 2**30, 2))
        r.check(after >= before - MEMORY_SLACK, "GPU memory back to its level before the stage (within 64 MiB)")
    else:
        r.notes.append("GPU memory not measured (no GPU)")
    return r


# ---------------------------------------------------------------------------------------------
# e. vLLM: the engine backend and a served student


def part_e(setup: Setup) -> Result:
    r = Result("e. vLLM engine backend and vllm serve")
    try:
        import vllm
    except ImportError:
        r.status = "SKIP"
        r.notes.append("vLLM is not installed (pip install 'rscaffold[vllm]')")
        return r
    if setup.device != "cuda":
        r.status = "SKIP"
        r.notes.append("vLLM needs a GPU here")
        return r
    from rscaffold.config import BackendConfig, SamplingConfig
    from rscaffold.decoding.policy import GuidedSettings
    from rscaffold.decoding.served import generate_served
    from rscaffold.llm import create_backend
    from rscaffold.llm.base import ChatRequest
    from rscaffold.llm.vllm_engine import VLLMBackend
    from rscaffold.serving import StudentServer
    from rscaffold.student import load_student

    r.figures["vllm"] = vllm.__version__
    model, tok = qwen2(setup, QWEN25_05B, dtype=torch.bfloat16)
    add_signal_tokens(tok, model, TOKENS)
    model_dir = setup.work / "student"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    from rscaffold.models import free_accelerator_memory

    free_accelerator_memory()
    backend = VLLMBackend(BackendConfig(backend="vllm", model=str(model_dir), gpu_memory_utilization=0.5))
    msgs = [{"role": "user", "content": "How many sheep?"}]
    out = backend.generate(
        [ChatRequest("plain", msgs), ChatRequest("json", msgs, json_schema={"type": "object"})],
        SamplingConfig(max_new_tokens=32),
    )
    backend.close()
    r.check(all(c.ok for c in out), f"engine backend answered ({[c.error for c in out if not c.ok]})")
    command = f"{shutil.which('vllm') or 'vllm'} serve {{model_dir}} --port {{port}} --served-model-name {{model}} --logprobs-mode processed_logprobs --gpu-memory-utilization 0.5"
    student = load_student(model_dir, weights=False)
    student.signal_names, student.signal_tokens = list(SIGNALS), list(TOKENS)
    student.signal_token_ids = tok.convert_tokens_to_ids(TOKENS)
    student.scaffolded, student.signal_objective = True, "token"
    with StudentServer(
        command, model_dir=model_dir, model="student", log_path=setup.work / "serve.log", startup_timeout_s=300
    ) as server:
        served = create_backend(BackendConfig(backend="openai", model="student", base_url=server.base_url))
        t0 = time.perf_counter()
        answers = generate_served(
            served, student, ["How many sheep?"] * 4, mode="guided", max_new_tokens=64, guided=GuidedSettings()
        )
        r.figures["served guided s"] = round(time.perf_counter() - t0, 2)
    r.check(len(answers) == 4, "vllm serve answered guided decoding")
    return r


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds; what the tests run)")
    ap.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 30; tiny 1)")
    ap.add_argument("--seq-len", type=int, default=None, help="training sequence length (default 4096; tiny 64)")
    ap.add_argument("--lora-layers", type=int, default=4, help="layers of the 7B-shaped LoRA student")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoding budget (default 2048; tiny 8)")
    ap.add_argument("--batch", type=int, default=None, help="decoding batch (default 32; tiny 2)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak, for MFU")
    ap.add_argument("--tokenizer", default=str(default_model_dir()), help="tokenizer directory")
    args = ap.parse_args(argv)
    if not (Path(args.tokenizer) / "tokenizer.json").exists():
        print(f"no tokenizer at {args.tokenizer}: run `rscaffold models fetch` or pass --tokenizer", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        torch.set_num_threads(1)  # tiny matrices: threads only contend
    peak = args.peak_tflops
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if device == "cuda" and peak is None:
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    work = Path(tempfile.mkdtemp(prefix="rscaffold-gpu-check-"))
    setup = Setup(
        device=device,
        tiny=args.tiny,
        tokenizer_dir=args.tokenizer,
        steps=args.steps or (1 if args.tiny else 30),
        seq_len=args.seq_len or (64 if args.tiny else 4096),
        lora_layers=args.lora_layers if not args.tiny else 2,
        new_tokens=args.new_tokens or (8 if args.tiny else 2048),
        batch=args.batch or (2 if args.tiny else 32),
        peak_flops=peak * 1e12 if peak else None,
        work=work,
    )
    print(
        f"device: {name}; bf16 peak {peak or 'unknown'} TFLOP/s; torch {torch.__version__}; {'tiny' if args.tiny else 'full'} shapes"
    )
    results = []
    t_all = time.perf_counter()
    try:
        for key in args.parts:
            t0 = time.perf_counter()
            try:
                res = PARTS[key](setup)
            except Exception:  # a part that crashes fails; the others still run
                res = Result(f"{key}. (crashed)", status="FAIL", notes=[traceback.format_exc()])
            res.figures["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(res)
            print(f"\n[{res.status}] {res.part}")
            for k, v in res.figures.items():
                print(f"    {k}: {v}")
            for note in res.notes:
                print(f"    {note}")
            from rscaffold.models import free_accelerator_memory

            free_accelerator_memory()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\ntotal {time.perf_counter() - t_all:.0f} s: "
        + ", ".join(f"{r.part.split('.')[0]} {r.status}" for r in results)
    )
    return 0 if all(r.status in ("PASS", "SKIP") for r in results) else 1


if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    sys.exit(main())
