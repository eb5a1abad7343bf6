"""The trained student as saved on disk: writing its directory (:func:`write_student`, the model
card), reading it (:func:`load_student`), and how it scores the next signal.

Kept apart from :mod:`rscaffold.training` so that inference and evaluation do not import TRL. A student directory holds

* the model and tokenizer (``save_pretrained``), with the signal tokens in the tokenizer;
* ``rscaffold_student.json``: signal names/tokens (taxonomy order = class index) and which are
  essential, objective, scaffolded flag, the system prompt and the benchmark whose family prompt
  it was trained with, the longest training step in tokens (the guided decoder's step cap);
* ``signal_head.pt`` + ``signal_head.json`` for the ``head`` objective;
* ``README.md``: the model card.

A directory without ``rscaffold_student.json`` (a plain base model) loads as an unscaffolded
student.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rscaffold.config import TrainingConfig
from rscaffold.store import follow_umask
from rscaffold.vocabulary import STUDENT_KINDS, StudentKind

STUDENT_META = "rscaffold_student.json"
MODEL_CARD = "README.md"
HEAD_WEIGHTS = "signal_head.pt"
HEAD_META = "signal_head.json"


class SignalHead(nn.Module):
    """Linear classifier over the K signals, read from the hidden state at a step boundary."""

    def __init__(self, hidden_size: int, num_signals: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_signals = num_signals
        self.proj = nn.Linear(hidden_size, num_signals)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype))

    def save(self, directory: Path, signal_names: list[str]) -> None:
        directory = Path(directory)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in self.state_dict().items()}
        torch.save(state, directory / HEAD_WEIGHTS)
        meta = {"hidden_size": self.hidden_size, "num_signals": self.num_signals, "signal_names": list(signal_names)}
        (directory / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> SignalHead:
        directory = Path(directory)
        meta = json.loads((directory / HEAD_META).read_text())
        head = cls(meta["hidden_size"], meta["num_signals"])
        head.load_state_dict(torch.load(directory / HEAD_WEIGHTS, map_location="cpu", weights_only=True))
        return head


def causal_lm_of(model: Any) -> Any:
    """The underlying ``*ForCausalLM`` (through DDP/accelerate wrappers and PEFT)."""
    m = model
    while hasattr(m, "module") and isinstance(m.module, nn.Module) and not hasattr(m, "config"):
        m = m.module
    if hasattr(m, "get_base_model") and hasattr(m, "peft_config"):
        m = m.get_base_model()
    return m


def backbone_of(model: Any) -> nn.Module:
    """The decoder stack whose ``last_hidden_state`` feeds the LM head (``model.model`` for Llama)."""
    lm = causal_lm_of(model)
    return lm.base_model


def signal_logits(
    model: Any,
    hidden: torch.Tensor,
    signal_token_ids: list[int],
    *,
    head: nn.Module | None = None,
) -> torch.Tensor:
    """Logits over the K signals for hidden states ``(..., H)``, as float32 ``(..., K)``.

    ``head`` given: the signal head. Otherwise the LM head's logits restricted to the signal
    token ids (the LM head module is called, so PEFT wrappers on it are respected; it is applied
    only to the few boundary positions, so the full-vocabulary cost is negligible).
    """
    if head is not None:
        return head(hidden).float()
    lm_head = causal_lm_of(model).get_output_embeddings()
    ids = torch.as_tensor(signal_token_ids, device=hidden.device)
    return lm_head(hidden).index_select(-1, ids).float()


@dataclass
class Student:
    """A loaded student: model + tokenizer + what it knows about signals."""

    model: Any
    tokenizer: Any
    signal_names: list[str] = field(default_factory=list)
    signal_tokens: list[str] = field(default_factory=list)
    signal_token_ids: list[int] = field(default_factory=list)
    head: SignalHead | None = None
    scaffolded: bool = False
    signal_objective: str | None = None
    system_prompt: str | None = None
    model_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def nonessential_signals(self) -> list[str]:
        """The signals the taxonomy marks non-essential (``essential: false``): pruned by default."""
        flags = self.meta.get("signal_essential") or [True] * len(self.signal_names)
        return [n for n, essential in zip(self.signal_names, flags) if not essential]

    @property
    def longest_step_tokens(self) -> int | None:
        """Tokens of the longest step in the student's training data (signal token excluded, the
        step's end, blank line or eos, included); None when not recorded."""
        value = self.meta.get("longest_step_tokens")
        return int(value) if value else None

    @property
    def prompt_benchmark(self) -> str | dict[str, str] | None:
        """The benchmark whose family prompt the student was trained with (None: bare questions),
        or for a mix of benchmarks the family of each problem source."""
        return self.meta.get("prompt_benchmark")


def load_student(model_dir: str | Path, device: str = "auto", dtype: str = "auto", *, weights: bool = True) -> Student:
    """Load a student directory written by ``train_student`` (or any plain causal LM directory).

    ``weights=False``: the tokenizer and what the student knows about signals only (``model`` is
    None), for a student that a server hosts (:mod:`rscaffold.decoding.served`).
    """
    from rscaffold.models import load_causal_lm, resolve_device
    from rscaffold.prompts import STUDENT_SYSTEM_PROMPT

    model_dir = Path(model_dir)
    meta_path = model_dir / STUDENT_META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    dev = resolve_device(device)
    if weights:
        model, tokenizer = load_causal_lm(str(model_dir), device=dev, dtype=dtype)
    else:
        from transformers import AutoTokenizer

        model, tokenizer = None, AutoTokenizer.from_pretrained(str(model_dir))
    scaffolded = bool(meta.get("scaffolded", False))
    names = list(meta.get("signal_names", []))
    tokens = list(meta.get("signal_tokens", []))
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)] if tokens else []
    if scaffolded and meta.get("signal_token_ids") and ids != list(meta["signal_token_ids"]):
        raise ValueError(
            f"{model_dir}: tokenizer ids of the signal tokens {ids} differ from the saved ones {meta['signal_token_ids']}"
        )
    head = None
    if weights and (model_dir / HEAD_WEIGHTS).exists():
        head = SignalHead.load(model_dir).to(dev, dtype=next(model.parameters()).dtype).eval()
    return Student(
        model=model,
        tokenizer=tokenizer,
        signal_names=names,
        signal_tokens=tokens,
        signal_token_ids=ids,
        head=head,
        scaffolded=scaffolded,
        signal_objective=meta.get("signal_objective"),
        system_prompt=meta.get("system_prompt", STUDENT_SYSTEM_PROMPT),
        model_dir=model_dir,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# writing a student directory


def write_student(
    model_dir: str | Path, *, save_weights: Callable[[Path], None], tokenizer: Any, meta: dict[str, Any], card: str
) -> None:
    """Write a student directory atomically: built under ``<model_dir>.partial`` (``save_weights``
    writes the model and its signal head there, then the tokenizer, :data:`STUDENT_META` and the
    model card), then renamed into place."""
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(model_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / STUDENT_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (tmp / MODEL_CARD).write_text(card)
    follow_umask(tmp)  # the saving library writes weights 0600; every output follows the umask
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)


def copy_student(src: str | Path, dst: str | Path, *, meta_update: dict[str, Any], note: str) -> None:
    """Copy a student directory (atomically) to ``dst``, updating its metadata with ``meta_update``
    and adding ``note`` to its model card."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    meta = json.loads((tmp / STUDENT_META).read_text())
    meta.update(meta_update)
    (tmp / STUDENT_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (tmp / MODEL_CARD).write_text((tmp / MODEL_CARD).read_text() + note)
    follow_umask(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _kind_of(meta: dict[str, Any]) -> StudentKind:
    """The kind of a trained student, from its metadata (scaffolded or not, and its target)."""
    scaffolded, target = bool(meta["scaffolded"]), meta.get("target") or "trace"
    for kind in STUDENT_KINDS.values():
        if kind.target is not None and kind.scaffolded == scaffolded and kind.target == target:
            return kind
    raise ValueError(f"no student kind is trained with target {target!r} (scaffolded: {scaffolded})")


def _hub_id(name: str) -> str | None:
    """``name`` if it reads as a Hugging Face hub id (``owner/model``), not a local directory."""
    if name.startswith(("/", ".", "~", "tiny:")) or Path(name).expanduser().exists():
        return None
    return name if name.count("/") == 1 else None


def model_card(meta: dict[str, Any], cfg: TrainingConfig) -> str:
    """The model card (README.md): a YAML header (``base_model`` when the student came from the hub,
    library, pipeline, tags) and what the student was trained on and how (the dataset fingerprint,
    the taxonomy with its tokens, every training setting, the training metrics)."""
    from huggingface_hub import ModelCard, ModelCardData

    m = meta["metrics"]
    info = meta["model_card_info"]
    kind = _kind_of(meta).title
    base = meta["base_model"]
    data = ModelCardData(
        base_model=_hub_id(base),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["rscaffold", "reasoning-scaffolding", "sft", "trl"] + (["lora"] if cfg.lora else []),
    )
    steps = f"max_steps {cfg.max_steps}" if cfg.max_steps is not None else f"{cfg.epochs} epochs"
    warmup = f"{cfg.warmup_steps} steps" if cfg.warmup_steps is not None else f"ratio {cfg.warmup_ratio}"
    lines = [
        f"# rscaffold student: {kind}",
        "",
        "Distilled with rscaffold (Reasoning Scaffolding, arXiv 2509.23619).",
        "",
        "## Provenance",
        "",
        "| key | value |",
        "|---|---|",
        f"| base model | `{base if _hub_id(base) else Path(base.removeprefix('tiny:')).name + ' (local)'}` |",
    ]
    for k, v in sorted(info.items()):
        lines.append(f"| {k} | `{v}` |")
    lines += [
        "",
        "## Objective",
        "",
        f"- scaffolded: {meta['scaffolded']}",
        f"- signal objective: {meta['signal_objective']}",
        f"- lambda (signal loss weight): {meta['signal_loss_weight']}",
        "",
    ]
    if meta["signal_names"]:
        lines += ["## Taxonomy", "", "| signal | token | token id |", "|---|---|---|"]
        lines += [
            f"| {n} | `{t}` | {i} |"
            for n, t, i in zip(meta["signal_names"], meta["signal_tokens"], meta["signal_token_ids"])
        ]
        lines.append("")
    lines += [
        "## Training",
        "",
        f"- {steps}, lr {cfg.learning_rate} ({cfg.lr_scheduler}, warm-up {warmup}), weight decay {cfg.weight_decay}, "
        f"batch {cfg.per_device_batch_size} x accumulation {cfg.gradient_accumulation_steps}, "
        f"max_length {cfg.max_length}, seed {cfg.seed}",
        _length_line(meta["metrics"].get("lengths") or {}, cfg),
        f"- weights {cfg.student_dtype}, bf16 mixed precision {cfg.bf16}, attention {cfg.attn_implementation or 'default'}, "
        f"gradient checkpointing {cfg.gradient_checkpointing}, "
        f"LoRA {cfg.lora.model_dump() if cfg.lora else 'no'}{' on a 4-bit base (QLoRA)' if cfg.load_in_4bit else ''}",
    ]
    if cfg.args:
        lines.append(f"- other trainer arguments: `{json.dumps(cfg.args, sort_keys=True, default=str)}`")
    lines += [
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k in ("train_loss", "step_loss", "signal_loss", "signal_accuracy", "steps", "runtime_s", "tokens_per_s"):
        lines.append(f"| {k} | {m.get(k)} |")
    for k, v in sorted(m.get("eval_metrics", {}).items()):
        lines.append(f"| {k} | {v} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from rscaffold.student import load_student",
        "from rscaffold.decoding.in_process import generate",
        "student = load_student('<this directory>')",
        "out = generate(student, questions=['...'], mode='guided' if student.scaffolded else 'plain')",
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


@torch.no_grad()
def boundary_signal_logits(
    student: Student,
    examples: Sequence[Any],
    *,
    benchmark: str | Mapping[str, str] | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
) -> tuple[torch.Tensor, list[int]]:
    """Teacher-forced next-signal logits at every gold step boundary of ``examples``
    (ExampleRecords, rendered in the training format): ``(N, K)`` float32 logits and the N gold
    signal indices. The gate's calibration and the trainer's signal accuracy both read them."""
    from rscaffold.student_format import IGNORE_INDEX, ScaffoldCollator, encode_examples

    if not student.scaffolded or not student.signal_token_ids:
        raise ValueError("boundary signal logits need a scaffolded student")
    tok = student.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = encode_examples(
        examples,
        tok,
        dict(zip(student.signal_names, student.signal_tokens)),
        signal_token_ids=student.signal_token_ids,
        max_length=max_length,
        benchmark=benchmark,
    )
    collate = ScaffoldCollator(pad_token_id=tok.pad_token_id)
    model, dev = student.model, student.device
    logits: list[torch.Tensor] = []
    gold: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size])
            hidden = backbone_of(model)(
                input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
            ).last_hidden_state
            lab = batch["signal_labels"].to(dev)
            valid = lab != IGNORE_INDEX
            rows_idx = torch.arange(lab.shape[0], device=dev)[:, None].expand_as(lab)[valid]
            h = hidden[rows_idx, batch["signal_positions"].to(dev)[valid]]
            logits.append(signal_logits(model, h, student.signal_token_ids, head=student.head).cpu())
            gold.extend(int(x) for x in lab[valid].tolist())
    finally:
        model.train(was_training)
    k = len(student.signal_token_ids)
    return (torch.cat(logits) if logits else torch.zeros((0, k))), gold


def _length_line(info: dict[str, Any], cfg: TrainingConfig) -> str:
    """The model card's line on the training examples' lengths and what max_length did to them."""
    dist = ", ".join(f"{k} {info.get(k)}" for k in ("mean", "p50", "p90", "p99", "max"))
    return (
        f"- training examples: {info.get('count')}, tokens {dist}; {info.get('over_max_length', 0)} longer than "
        f"max_length {cfg.max_length}: {info.get('dropped', 0)} dropped, {info.get('truncated', 0)} truncated "
        f"(truncation: {cfg.truncation})"
    )
