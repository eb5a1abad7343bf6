"""Dual-objective student training on TRL: L = L_step + lambda * L_signal.

The student sees the question and the steps so far and is trained jointly to (a) predict the next
signal and (b) generate the next step conditioned on the gold signal (Reasoning Scaffolding,
arXiv 2509.23619, section "dual-objective training"). :class:`ScaffoldTrainer` is an
``trl.SFTTrainer`` that only overrides ``compute_loss``: the training loop, optimiser,
scheduler, mixed precision, gradient checkpointing, LoRA, checkpointing and resumption are
TRL/transformers'.

* L_step is exactly TRL's SFT loss (its fused, chunked LM head: per-token NLL over the
  non-ignored labels, normalised by the number of label tokens in the accumulated batch). The
  collator sets the labels to ``-100`` on the prompt and on the signal tokens.
* L_signal is a cross entropy over the K signals at the positions whose next token is a signal.
  It reads the last hidden state of the backbone, captured by a forward hook during the one
  forward pass TRL already makes, so the scaffolded objective costs no extra forward pass.

The baseline (CoT-SFT) is the same trainer with no signal tokens and lambda = 0, which reduces
to TRL's plain SFT loss (tested numerically).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from rscaffold.config import TRAINER_ARGS_SET_BY_RSCAFFOLD, LoraSettings, SegmentationConfig, TrainingConfig
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT
from rscaffold.records import ExampleRecord
from rscaffold.student import (
    SignalHead,
    Student,
    backbone_of,
    boundary_signal_logits,
    causal_lm_of,
    model_card,
    signal_logits,
    write_student,
)
from rscaffold.student_format import (
    IGNORE_INDEX,
    CompletionTarget,
    LengthCounts,
    ScaffoldCollator,
    encode_examples,
    longest_step_tokens,
)
from rscaffold.training.signal_tokens import add_signal_tokens

log = logging.getLogger(__name__)

__all__ = [
    "ScaffoldTrainer",
    "TrainResult",
    "build_trainer",
    "check_training_settings",
    "evaluate_signal_accuracy",
    "load_student_base",
    "make_sft_config",
    "train_student",
]

CHECKPOINTS_DIRNAME = "checkpoints"
MODEL_DIRNAME = "model"
SAVE_TOTAL_LIMIT = 2


class ScaffoldTrainer(SFTTrainer):
    """``SFTTrainer`` with the joint objective ``L_step + signal_loss_weight * L_signal``.

    ``signal_objective``:

    * ``"token"`` (default): the signal logits are the LM head's logits restricted to the K
      signal token ids, and L_signal is the cross entropy of that K-way softmax. Why the default:
      it adds no parameters, so the student stays a plain causal LM that any transformers/vLLM
      stack can load and serve, and the signal token's row of the (usually tied) embedding
      matrix is both what the model reads before a step (conditioning on the gold signal) and
      what it scores when predicting the next signal, so the two objectives shape one
      representation of each signal instead of two. Restricting to the K signal ids (rather than
      a full-vocabulary LM loss on the signal token) makes L_signal the paper's pure "which
      signal next" classification, comparable with the head objective, and leaves the
      vocabulary logits at step boundaries to L_step. Consequence: the signal tokens are only
      trained against each other, not against ordinary text, so free decoding rarely emits them;
      signal-guided decoding (:mod:`rscaffold.decoding`) places them.
    * ``"head"``: a :class:`SignalHead` (``nn.Linear(hidden, K)``) on the hidden state at the
      boundary. It is a submodule of the causal LM (``model.signal_head``), so the optimiser
      sees it and checkpoints hold it (with LoRA it is in ``modules_to_save``).

    Both read the hidden state at position ``p`` where ``input_ids[p + 1]`` is the gold signal.
    The batch must carry ``signal_positions`` / ``signal_labels`` (see :mod:`rscaffold.student_format`).

    Logged every logging step (through SFTTrainer's metric buffer, which ``log()`` averages over
    the window): ``step_loss``, ``signal_loss``, ``signal_accuracy`` next to TRL's ``loss``,
    ``mean_token_accuracy``, ``entropy``, ``num_tokens``.
    """

    def __init__(
        self,
        *args: Any,
        signal_token_ids: list[int] | tuple[int, ...] = (),
        signal_loss_weight: float = 1.0,
        signal_objective: str = "token",
        **kwargs: Any,
    ):
        if signal_objective not in ("token", "head"):
            raise ValueError(f"signal_objective must be 'token' or 'head', got {signal_objective!r}")
        self.signal_token_ids = [int(i) for i in signal_token_ids]
        self.signal_loss_weight = float(signal_loss_weight)
        self.signal_objective = signal_objective
        self._capture_hidden = False
        self._captured_hidden: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        if self.signal_token_ids and signal_objective == "head" and self._signal_head() is None:
            raise ValueError("signal_objective='head' needs a SignalHead attached as model.signal_head")
        _expose_output_bias(self.model)
        self._hidden_hook = backbone_of(self.model).register_forward_hook(self._hidden_hook_fn)

    # -- helpers ---------------------------------------------------------------------------------

    def _hidden_hook_fn(self, module, args, output) -> None:
        if self._capture_hidden:
            self._captured_hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _signal_head(self):
        return getattr(causal_lm_of(self.accelerator.unwrap_model(self.model)), "signal_head", None)

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: when True the Trainer does not divide the returned loss
        # by the number of accumulation steps (the step loss is already normalised over the whole
        # accumulated batch), so the per-micro-batch signal mean must be divided here.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    # -- the loss --------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: PLR0917 - Trainer API
        mode = "train" if self.model.training else "eval"
        sig_pos = inputs.pop("signal_positions", None)
        sig_lab = inputs.pop("signal_labels", None)
        want_signal = bool(self.signal_token_ids) and sig_lab is not None

        self._captured_hidden = None
        self._capture_hidden = want_signal
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            self._capture_hidden = False
        step_loss, outputs = result if return_outputs else (result, None)

        # Undo the normalisation TRL applies for gradient accumulation, so the logged step_loss is
        # this micro-batch's mean token loss (averaged over the logging window it equals TRL's
        # logged `loss` when lambda = 0). Under data parallelism TRL's compute_loss has already
        # scaled its token-count normalisation back by the number of processes (measured with
        # 2 processes: dividing by it again halved the logged value).
        ga = 1
        if num_items_in_batch is not None and self._loss_scaled_for_ga(num_items_in_batch):
            ga = getattr(self, "current_gradient_accumulation_steps", 1) or 1
        self._metrics[mode]["step_loss"].append(step_loss.detach().item() * ga)

        loss = step_loss
        if want_signal:
            hidden = self._captured_hidden
            self._captured_hidden = None
            if hidden is None:
                raise RuntimeError("the backbone hook did not capture hidden states")
            sig_lab = sig_lab.to(hidden.device)
            sig_pos = sig_pos.to(hidden.device)
            valid = sig_lab != IGNORE_INDEX
            rows = torch.arange(sig_lab.shape[0], device=hidden.device)[:, None].expand_as(sig_lab)[valid]
            h = hidden[rows, sig_pos[valid]]
            target = sig_lab[valid]
            logits = signal_logits(
                model, h, self.signal_token_ids, head=self._signal_head() if self.signal_objective == "head" else None
            )
            if target.numel():
                signal_loss = F.cross_entropy(logits, target)
                with torch.no_grad():
                    acc = (logits.argmax(-1) == target).float().mean()
                self._metrics[mode]["signal_loss"].append(signal_loss.detach().item())
                self._metrics[mode]["signal_accuracy"].append(acc.item())
            else:
                # No boundary in this micro-batch (e.g. a completion truncated before its first
                # signal). A zero that stays connected to the head keeps every parameter in the
                # graph, which DDP requires.
                signal_loss = logits.sum() * 0.0
            # Added even when lambda = 0 (then it contributes zero), for the same reason.
            loss = loss + self.signal_loss_weight * signal_loss / ga
        return (loss, outputs) if return_outputs else loss


def _expose_output_bias(model) -> None:
    """PEFT compatibility shim for TRL's fused LM head.

    With LoRA, the signal-token rows are trained through PEFT's ``trainable_token_indices``. On a
    model with tied embeddings PEFT then wraps the LM head too, in a ``TrainableTokensWrapper``
    that exposes ``weight`` (the merged, differentiable weight) but raises on ``bias``, which
    TRL's fused LM head reads. The wrapped head has the bias of the module it wraps (None for
    Llama-style heads); expose it.
    """
    head = causal_lm_of(model).get_output_embeddings()
    if head is None:
        return
    try:
        head.bias  # noqa: B018 - probing: a TrainableTokensWrapper raises here
    except AttributeError:
        original = getattr(head, "original_module", None)
        object.__setattr__(head, "bias", getattr(original, "bias", None))


# ---------------------------------------------------------------------------------------------
# building blocks


def use_bf16(setting: Any) -> bool:
    """``"auto"``: bf16 mixed precision on a CUDA device that supports it, else fp32."""
    if setting == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(setting)


def progress_bars() -> bool:
    """Whether training shows progress bars: when a terminal is attached (``training.args.disable_tqdm``
    decides otherwise)."""
    return sys.stderr is not None and sys.stderr.isatty()


def make_sft_config(cfg: TrainingConfig, checkpoint_dir: Path, **overrides: Any) -> SFTConfig:
    """The ``SFTConfig`` for a pre-tokenized dataset with extra (signal) columns.

    Built from the ``training`` fields (the arguments rscaffold sets itself, listed in
    :data:`rscaffold.config.TRAINER_ARGS_SET_BY_RSCAFFOLD`), a few defaults that ``training.args``
    may change (progress bars, data-loader workers, fp16, ...), then ``training.args`` passed
    through as given, then ``overrides`` (tests, benchmarks).
    """
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(cfg.args) - names)
    if unknown:
        raise ValueError(
            "; ".join(f"training.args.{k}: not an argument of TRL's SFTConfig / TrainingArguments" for k in unknown)
        )
    owned: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.epochs if cfg.epochs is not None else 1.0,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16(cfg.bf16),
        report_to=list(cfg.report_to) or "none",
        # The dataset is tokenized by rscaffold (prompt masking, signal positions, truncation that
        # keeps the prompt), so TRL's preparation is skipped and the extra columns are kept for
        # the collator.
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=None,
        packing=False,
        # TRL's own padding_free refuses a custom collator; ScaffoldCollator implements it.
        padding_free=False,
    )
    # transformers 5 dropped warmup_ratio: a float warmup_steps in [0, 1) is a ratio of the steps.
    if cfg.warmup_steps is not None:
        owned["warmup_steps"] = cfg.warmup_steps
    else:
        owned["warmup_ratio" if "warmup_ratio" in names else "warmup_steps"] = cfg.warmup_ratio
    # SFTConfig defaults to gradient checkpointing on; ours is off unless asked. transformers 5
    # renamed the argument (the old name still works, with a FutureWarning).
    ckpt_arg = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    owned[ckpt_arg] = cfg.gradient_checkpointing
    assert set(owned) <= set(TRAINER_ARGS_SET_BY_RSCAFFOLD), sorted(set(owned) - set(TRAINER_ARGS_SET_BY_RSCAFFOLD))
    defaults: dict[str, Any] = dict(
        logging_strategy="steps",
        save_total_limit=SAVE_TOTAL_LIMIT,
        fp16=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=not progress_bars(),
    )
    refused = sorted(set(cfg.args) & set(owned))  # also refused by the config; kept for direct callers
    if refused:
        raise ValueError(f"training.args sets {refused}, which rscaffold sets itself from the training section")
    return SFTConfig(**{**defaults, **cfg.args, **owned, **overrides})


class QLoRAUnavailableError(RuntimeError):
    """``training.load_in_4bit`` on a machine without bitsandbytes."""


def _require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QLoRAUnavailableError(
            "training.load_in_4bit (QLoRA) needs bitsandbytes, which is not installed: pip install bitsandbytes "
            "(and train on a CUDA GPU), or set training.load_in_4bit: false"
        )


def check_training_settings(cfg: TrainingConfig) -> None:
    """What training would refuse, checked before any stage starts: every ``training.args`` key is
    an SFTConfig argument, every ``training.report_to`` tracker is known and installed, and
    QLoRA's bitsandbytes is installed. Raises ``ValueError`` naming the key."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    problems = []
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    problems += [
        f"training.args.{k}: not an argument of TRL's SFTConfig / TrainingArguments" for k in cfg.args if k not in names
    ]
    installed = set(get_available_reporting_integrations())
    for tracker in cfg.report_to:
        if tracker in ("all", "none"):
            continue
        if tracker not in INTEGRATION_TO_CALLBACK:
            problems.append(
                f"training.report_to: unknown tracker {tracker!r} (known: {', '.join(sorted(INTEGRATION_TO_CALLBACK))})"
            )
        elif tracker not in installed:
            problems.append(f"training.report_to: {tracker} is not installed (pip install {tracker})")
    if cfg.load_in_4bit:
        try:
            _require_bitsandbytes()
        except QLoRAUnavailableError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_student_base(cfg: TrainingConfig):
    """The untrained student named by ``cfg`` (weights in ``training.student_dtype``, fp32 by default;
    ``attn_implementation``; 4-bit base weights with ``load_in_4bit``), and its tokenizer with a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rscaffold.models import build_tiny_model, plain_from_quantized

    dtype = _DTYPES.get(cfg.student_dtype, "auto")
    if cfg.tiny is not None:
        model, tokenizer = build_tiny_model(cfg.tokenizer or cfg.student, cfg.tiny)
        if dtype != "auto":
            model = model.to(dtype)
        if cfg.attn_implementation:
            model.set_attn_implementation(cfg.attn_implementation)
    else:
        gguf = {"gguf_file": cfg.student_gguf_file} if cfg.student_gguf_file else {}
        loading: dict[str, Any] = {"dtype": dtype, **gguf}
        if cfg.attn_implementation:
            loading["attn_implementation"] = cfg.attn_implementation
        if cfg.load_in_4bit:  # QLoRA: NF4 base weights, bf16 compute (Dettmers et al., 2023)
            _require_bitsandbytes()
            from transformers import BitsAndBytesConfig

            loading["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.student, **({} if cfg.tokenizer else gguf))
        model = AutoModelForCausalLM.from_pretrained(cfg.student, **loading)
        if gguf:
            model = plain_from_quantized(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def signal_token_modules(model) -> list[str]:
    """The modules whose signal-token rows must be trainable, by the name peft matches: the input
    embeddings, and the output embeddings (LM head) when they are not tied to them.

    With tied embeddings one matrix serves both (peft then follows the tie on its own). With
    untied ones (Qwen2.5-7B/14B, ...) the LM head's signal rows are what L_signal scores under the
    ``token`` objective: frozen, they would stay the identical mean rows, every signal would get
    the same logit, L_signal would have no gradient and the gate would always pick one signal.
    """
    lm = causal_lm_of(model)
    inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    names = {id(m): n for n, m in lm.named_modules()}
    modules = [names[id(inp)].rsplit(".", 1)[-1]]
    if out is not None and out.weight.data_ptr() != inp.weight.data_ptr():
        modules.append(names[id(out)].rsplit(".", 1)[-1])
    return modules


def _lora_config(settings: LoraSettings, signal_token_ids: list[int], *, with_head: bool, token_modules: list[str]):
    from peft import LoraConfig

    kwargs: dict[str, Any] = dict(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    if signal_token_ids:
        # The new rows start as copies of the mean embedding; frozen, every signal would stay the
        # same vector (indistinguishable as input, equal logits as output). Train just those rows,
        # in the input embeddings and (untied) in the LM head.
        kwargs["trainable_token_indices"] = {m: list(signal_token_ids) for m in token_modules}
    if with_head:
        kwargs["modules_to_save"] = ["signal_head"]
    return LoraConfig(**kwargs)


def _to_dataset(rows: list[dict[str, list[int]]]):
    from datasets import Dataset, Features, Sequence, Value

    features = Features(
        {
            "input_ids": Sequence(Value("int64")),
            "labels": Sequence(Value("int64")),
            "signal_positions": Sequence(Value("int64")),
            "signal_labels": Sequence(Value("int64")),
        }
    )
    return Dataset.from_list(rows, features=features)


def build_trainer(
    model,
    tokenizer,
    train_rows: list[dict[str, list[int]]],
    *,
    cfg: TrainingConfig,
    checkpoint_dir: Path,
    signal_token_ids: list[int],
    signal_objective: str = "token",
    signal_loss_weight: float = 1.0,
    eval_rows: list[dict[str, list[int]]] | None = None,
    **config_overrides: Any,
) -> ScaffoldTrainer:
    """A :class:`ScaffoldTrainer` over encoded rows (see :func:`rscaffold.student_format.encode_examples`)."""
    if not train_rows:
        raise ValueError("no training rows")
    args = make_sft_config(cfg, checkpoint_dir, **config_overrides)
    with_head = signal_objective == "head" and bool(signal_token_ids)
    peft_config = (
        _lora_config(cfg.lora, signal_token_ids, with_head=with_head, token_modules=signal_token_modules(model))
        if cfg.lora is not None
        else None
    )
    return ScaffoldTrainer(
        model=model,
        args=args,
        data_collator=ScaffoldCollator(pad_token_id=tokenizer.pad_token_id, padding_free=cfg.padding_free),
        train_dataset=_to_dataset(train_rows),
        eval_dataset=_to_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        signal_token_ids=signal_token_ids,
        signal_loss_weight=signal_loss_weight,
        signal_objective=signal_objective,
        callbacks=[LogLossesCallback()],
    )


class LogLossesCallback(TrainerCallback):
    """Sends the Trainer's logged figures (loss, signal loss, learning rate, ...) to the
    ``rscaffold.training`` logger, one line per logging step, so they reach the run's logs
    (console and Prefect UI) and not only the Trainer's progress bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ARG002, PLR0917 - TrainerCallback's signature
        if not logs:
            return
        figures = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k != "epoch"
        )
        log.info("step %d/%d: %s", state.global_step, state.max_steps, figures)


# ---------------------------------------------------------------------------------------------
# the entry point


@dataclass
class TrainResult:
    """What a training run produced.

    ``train_loss``: the Trainer's mean total loss over the steps run in this call (None when the
    call only resumed an already finished run).
    ``step_loss`` / ``signal_loss`` / ``signal_accuracy``: the last logging window (end of
    training; None when nothing was logged, or for the baseline's signal fields).
    ``tokens_per_s``: non-padding tokens processed in this call per second of training.
    ``eval_metrics``: Trainer.evaluate on the rows with ``split == "validation"`` (if any).
    ``longest_step_tokens``: the longest step of the scaffolded training rows in tokens (the
    guided decoder's default per-step cap; None for the baselines).
    ``lengths``: the training examples' token-length distribution, how many were longer than
    ``max_length`` and what ``truncation`` did with them (``dropped``, ``truncated``); see
    :func:`rscaffold.training.lengths.length_report`.
    """

    model_dir: Path
    train_loss: float | None
    step_loss: float | None
    signal_loss: float | None
    steps: int
    runtime_s: float
    tokens_per_s: float | None
    signal_accuracy: float | None
    scaffolded: bool = True
    resumed_from: str | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    longest_step_tokens: int | None = None
    lengths: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_dir"] = str(self.model_dir)
        return d


def train_student(
    examples: list[ExampleRecord],
    cfg: TrainingConfig,
    signal_names: list[str],
    *,
    signal_tokens: list[str],
    output_dir: Path,
    scaffolded: bool = True,
    model_card_info: dict[str, Any] | None = None,
    target: CompletionTarget = "trace",
    prompt_benchmark: str | Mapping[str, str] | None = None,
    signal_essential: list[bool] | None = None,
    segmentation: SegmentationConfig | None = None,
    lengths: dict[str, Any] | None = None,
) -> TrainResult:
    """Train the scaffolded student (or, ``scaffolded=False``, a plain CoT-SFT baseline) on ``examples``.

    Rows with ``split == "validation"`` are held out for a final evaluation; all others train.
    The baselines use the same rows without signal tokens and with lambda = 0; ``target``
    chooses their completion: ``trace`` the whole teacher trace (long-thinking distillation,
    ``cot_sft``), ``answer`` the teacher's final answer text (CoT distillation, ``short_cot``).
    ``prompt_benchmark``: the user message is that benchmark family's prompt (the same builder
    the teacher and the evaluation use), or for a mix of benchmarks a map of each example's
    ``source`` to its family; None: the bare question. ``signal_essential``: per
    signal, whether the taxonomy marks it essential (kept with the student: guided decoding
    prunes the others by default). ``segmentation``: how the ``answer`` target's text is split into
    steps (the labeling stage's segmenter, which split the traces).

    Examples longer than ``cfg.max_length`` are handled by ``cfg.truncation`` and counted
    (``TrainResult.lengths``, the model card, a log line). ``lengths``: the caller's report of
    these examples (:func:`rscaffold.training.lengths.length_report`, made before it left out the
    too-long ones), recorded with what this call cut or dropped on top; None: measured here.

    Checkpoints go to ``output_dir/checkpoints`` every ``cfg.save_steps``; if that folder already
    holds one, training resumes from the last (so a killed run continues, and a larger
    ``max_steps`` extends a finished one). ``output_dir`` must therefore be specific to the
    inputs (config apart from ``max_steps``, data, taxonomy); the pipeline's content-addressed
    stage directory is. The final model is written to ``output_dir/model``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_card_info = dict(model_card_info or {})
    if scaffolded:
        if len(signal_names) != len(signal_tokens) or not signal_names:
            raise ValueError("signal_names and signal_tokens must be non-empty and of the same length")
        if target != "trace":
            raise ValueError("the scaffolded student is trained on the whole trace (target='trace')")
    if signal_essential is not None and len(signal_essential) != len(signal_names):
        raise ValueError("signal_essential must have one flag per signal")
    train_examples = [e for e in examples if e.split != "validation"]
    eval_examples = [e for e in examples if e.split == "validation"]
    if not train_examples:
        raise ValueError("no training examples (all rows are split='validation')")

    model, tokenizer = load_student_base(cfg)
    if scaffolded:
        token_ids = add_signal_tokens(tokenizer, model, signal_tokens)
        token_map: dict[str, str] | None = dict(zip(signal_names, signal_tokens))
        weight, objective = cfg.signal_loss_weight, cfg.signal_objective
        if objective == "head":
            torch.manual_seed(cfg.seed)
            model.signal_head = SignalHead(model.config.get_text_config().hidden_size, len(signal_names))
    else:
        token_ids, token_map, weight, objective = [], None, 0.0, cfg.signal_objective

    encode = dict(
        signal_token_ids=token_ids,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        benchmark=prompt_benchmark,
        target=target,
        segmentation=segmentation,
    )
    counts = LengthCounts()
    train_rows = encode_examples(train_examples, tokenizer, token_map, counts=counts, **encode)
    length_info = _length_info(counts, cfg, lengths)
    log.info(
        "training examples (target %s): %d longer than max_length=%d: %d dropped, %d truncated (truncation: %s)",
        target,
        length_info["over_max_length"],
        cfg.max_length,
        length_info["dropped"],
        length_info["truncated"],
        cfg.truncation,
    )
    if not train_rows and counts.dropped:
        from rscaffold.training.lengths import TooLongExamplesError

        raise TooLongExamplesError(
            f"all {counts.dropped} training examples (target {target!r}) are longer than "
            f"training.max_length={cfg.max_length} and were dropped (truncation: {cfg.truncation}; "
            "truncate_keep_end drops an example whose prompt alone fills max_length): nothing to train on. "
            "Raise training.max_length. Nothing was trained."
        )
    if not train_rows:
        raise ValueError(f"no training rows for target {target!r} (e.g. no teacher answer text)")
    eval_rows = encode_examples(eval_examples, tokenizer, token_map, **encode) if eval_examples else None
    checkpoint_dir = output_dir / CHECKPOINTS_DIRNAME
    trainer = build_trainer(
        model,
        tokenizer,
        train_rows,
        cfg=cfg,
        checkpoint_dir=checkpoint_dir,
        signal_token_ids=token_ids,
        signal_objective=objective,
        signal_loss_weight=weight,
        eval_rows=eval_rows,
    )
    last = _last_checkpoint(checkpoint_dir)
    start_step = 0
    if last:
        log.info("resuming from %s", last)
        state_file = Path(last) / "trainer_state.json"
        if state_file.exists():
            start_step = int(json.loads(state_file.read_text()).get("global_step", 0))
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=last)
    runtime = out.metrics.get("train_runtime", time.perf_counter() - t0)
    eval_metrics: dict[str, float] = {}
    if eval_rows:
        eval_metrics = {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}

    last_log = _last_logged(trainer.state.log_history, ("step_loss", "signal_loss", "signal_accuracy"))
    tokens = trainer._total_train_tokens
    trained_now = trainer.state.global_step > start_step  # False: resumed a finished run
    result = TrainResult(
        model_dir=output_dir / MODEL_DIRNAME,
        train_loss=_finite(out.metrics.get("train_loss")) if trained_now else None,
        step_loss=last_log.get("step_loss"),
        signal_loss=last_log.get("signal_loss") if scaffolded else None,
        steps=int(trainer.state.global_step),
        runtime_s=float(runtime),
        tokens_per_s=(tokens / runtime) if runtime and tokens else None,
        signal_accuracy=last_log.get("signal_accuracy") if scaffolded else None,
        scaffolded=scaffolded,
        resumed_from=last,
        eval_metrics=eval_metrics,
        longest_step_tokens=longest_step_tokens(train_rows) if scaffolded else None,
        lengths=length_info,
    )
    meta = {
        "format_version": 1,
        "scaffolded": scaffolded,
        "target": target,
        "prompt_benchmark": dict(prompt_benchmark) if isinstance(prompt_benchmark, Mapping) else prompt_benchmark,
        "signal_essential": (list(signal_essential) if signal_essential is not None else None) if scaffolded else None,
        "longest_step_tokens": result.longest_step_tokens,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "signal_objective": objective if scaffolded else None,
        "signal_loss_weight": weight,
        "signal_names": list(signal_names) if scaffolded else [],
        "signal_tokens": list(signal_tokens) if scaffolded else [],
        "signal_token_ids": token_ids,
        "system_prompt": STUDENT_SYSTEM_PROMPT,
        "base_model": "tiny:" + (cfg.tokenizer or cfg.student) if cfg.tiny is not None else cfg.student,
        "model_card_info": model_card_info,
        "metrics": result.to_dict(),
    }
    _save_final(
        trainer,
        tokenizer,
        model_dir=result.model_dir,
        meta=meta,
        cfg=cfg,
        signal_names=signal_names if scaffolded else [],
    )
    return result


def _length_info(counts: LengthCounts, cfg: TrainingConfig, given: dict[str, Any] | None) -> dict[str, Any]:
    """The length report of a training run: the caller's (``given``) with what encoding cut or
    dropped added, or, without one, the distribution of the examples encoded here."""
    from rscaffold.dataset import length_summary

    if given is None:
        info = length_summary(counts.lengths, cfg.max_length)
        info.update(truncation=cfg.truncation, dropped=0, truncated=0)
    else:
        info = dict(given)
    info["dropped"] = int(info.get("dropped", 0)) + counts.dropped
    info["truncated"] = counts.truncated
    return info


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest *complete* ``checkpoint-<step>`` folder: the Trainer writes
    ``trainer_state.json`` last, so a checkpoint without a readable one was cut short (a kill
    during the save) and is skipped in favour of the one before."""
    if not checkpoint_dir.is_dir():
        return None
    steps = []
    for p in checkpoint_dir.glob("checkpoint-*"):
        suffix = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and suffix.isdigit():
            steps.append((int(suffix), p))
    for _step, path in sorted(steps, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("checkpoint %s is incomplete (no readable trainer_state.json); skipping it", path)
            continue
        return str(path)
    return None


def _last_logged(history: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    found: dict[str, float] = {}
    for entry in reversed(history):
        for k in keys:
            if k not in found and k in entry:
                found[k] = float(entry[k])
        if len(found) == len(keys):
            break
    return found


def _save_final(
    trainer: ScaffoldTrainer,
    tokenizer,
    *,
    model_dir: Path,
    meta: dict[str, Any],
    cfg: TrainingConfig,
    signal_names: list[str],
) -> None:
    """Write the final model directory (model, tokenizer, signal head, meta, model card) atomically.

    One process writes. Under FSDP/DeepSpeed the parameters are shards on each process, so every
    process takes part in gathering the full state dict first; under DDP (or one process) every
    process holds the whole model.
    """
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    full = None
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        if hasattr(acc.unwrap_model(trainer.model), "peft_config"):
            raise NotImplementedError("LoRA under FSDP/DeepSpeed is not supported; use DDP for LoRA")
        full = acc.get_state_dict(trainer.model)  # a collective: every process must call it
    if acc.is_main_process:
        _write_model_dir(
            trainer, tokenizer, model_dir=Path(model_dir), meta=meta, cfg=cfg, signal_names=signal_names, full=full
        )
    acc.wait_for_everyone()


def _write_model_dir(
    trainer: ScaffoldTrainer,
    tokenizer,
    *,
    model_dir: Path,
    meta: dict[str, Any],
    cfg: TrainingConfig,
    signal_names: list[str],
    full: dict[str, Any] | None,
) -> None:
    """The final model directory (:func:`rscaffold.student.write_student`, atomic); ``full``: a
    gathered state dict (sharded training) instead of the module's own weights."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if full is None and hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = model.merge_and_unload()  # a plain model directory: no peft needed to load it
    lm = causal_lm_of(model)

    def save_weights(tmp: Path) -> None:
        if full is not None:
            prefix = "signal_head."
            head_state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
            lm.save_pretrained(tmp, state_dict={k: v for k, v in full.items() if not k.startswith(prefix)})
            if head_state:
                head = SignalHead(lm.config.get_text_config().hidden_size, len(signal_names))
                head.load_state_dict(head_state)
                head.save(tmp, signal_names)
        else:
            head = lm._modules.pop("signal_head", None)  # saved on its own, not inside the LM weights
            try:
                lm.save_pretrained(tmp)
            finally:
                if head is not None:
                    lm.signal_head = head
            if head is not None:
                head.save(tmp, signal_names)

    write_student(model_dir, save_weights=save_weights, tokenizer=tokenizer, meta=meta, card=model_card(meta, cfg))


def evaluate_signal_accuracy(
    student: Student, examples, batch_size: int = 8, *, max_length: int | None = None
) -> float:
    """Teacher-forced next-signal accuracy over the gold scaffolds of ``examples`` (ExampleRecords)."""
    if not student.scaffolded or not student.signal_token_ids:
        raise ValueError("signal accuracy needs a scaffolded student")
    logits, gold = boundary_signal_logits(
        student, examples, benchmark=student.prompt_benchmark, max_length=max_length, batch_size=batch_size
    )
    if not gold:
        return float("nan")
    return float((logits.argmax(-1) == torch.as_tensor(gold)).float().mean())
