"""The training section (stage 5): the students, their trainer arguments, LoRA and tiny models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rscaffold.config.base import EXECUTION, _Section
from rscaffold.paths import default_model_dir
from rscaffold.vocabulary import TRAINED_STUDENTS, TrainedStudentName


class TinyModelConfig(_Section):
    """A random-init model built from a config (tests, smoke runs): a Llama with tied embeddings
    (SmolLM2's shape) or a Qwen2 with untied embeddings and a padded vocabulary (Qwen2.5-7B/14B's
    shape), at any size."""

    architecture: Literal["llama", "qwen2"] = Field(
        default="llama", description="'llama' (LlamaForCausalLM) or 'qwen2' (Qwen2ForCausalLM)."
    )
    tie_word_embeddings: bool = Field(
        default=True, description="One matrix for input embeddings and LM head (False: two, as in Qwen2.5-7B/14B)."
    )
    vocab_padding: int = Field(
        default=0,
        ge=0,
        description="Embedding rows beyond the tokenizer's entries (Qwen2.5 pads its vocabulary; new tokens then land in padding rows).",
    )

    hidden_size: int = Field(default=64, description="Hidden size of the tiny model.")
    intermediate_size: int = Field(default=128, description="MLP size.")
    num_hidden_layers: int = Field(default=2, description="Decoder layers.")
    num_attention_heads: int = Field(default=4, description="Attention heads.")
    num_key_value_heads: int = Field(default=2, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(default=1024, description="Longest sequence.")
    seed: int = Field(default=0, description="Seed of the random initialisation.")


class LoraSettings(_Section):
    r: int = Field(default=16, description="LoRA rank.")
    alpha: int = Field(default=32, description="LoRA scaling (alpha / r).")
    dropout: float = Field(default=0.05, description="Dropout on the LoRA path.")
    target_modules: list[str] | str = Field(
        default="all-linear", description="Modules that get adapters ('all-linear' or a list of names)."
    )


LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
]

# The trainer arguments (TRL's SFTConfig / transformers' TrainingArguments) that rscaffold sets
# itself, and where a config sets them instead ("" when the pipeline decides: the data is
# tokenized, masked and truncated by rscaffold, checkpoints exist to resume, ...). training.args
# refuses them.
TRAINER_ARGS_SET_BY_RSCAFFOLD: dict[str, str] = {
    "output_dir": "",
    "resume_from_checkpoint": "",
    "save_strategy": "",
    "dataset_kwargs": "",
    "dataset_text_field": "",
    "remove_unused_columns": "",
    "packing": "",
    "completion_only_loss": "",
    "assistant_only_loss": "",
    "model_init_kwargs": "training.student_dtype, training.attn_implementation, training.load_in_4bit",
    "max_steps": "training.max_steps",
    "num_train_epochs": "training.epochs",
    "per_device_train_batch_size": "training.per_device_batch_size",
    "per_device_eval_batch_size": "training.per_device_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "learning_rate": "training.learning_rate",
    "lr_scheduler_type": "training.lr_scheduler",
    "warmup_ratio": "training.warmup_ratio",
    "warmup_steps": "training.warmup_steps, training.warmup_ratio",
    "weight_decay": "training.weight_decay",
    "logging_steps": "training.logging_steps",
    "save_steps": "training.save_steps",
    "seed": "training.seed",
    "data_seed": "training.seed",
    "bf16": "training.bf16",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "activation_checkpointing": "training.gradient_checkpointing",
    "report_to": "training.report_to",
    "padding_free": "training.padding_free",
    "max_length": "training.max_length",
}
# Trainer arguments in training.args that change how training runs (logging, progress bars, data
# loading workers, the experiment tracker's names, hub pushes of checkpoints) but not the trained
# weights: left out of the training fingerprint, like the EXECUTION fields.
EXECUTION_TRAINER_ARGS: tuple[str, ...] = (
    "disable_tqdm",
    "run_name",
    "project",
    "trackio_space_id",
    "trackio_bucket_id",
    "trackio_static_space_id",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "logging_first_step",
    "logging_nan_inf_filter",
    "logging_strategy",
    "include_num_input_tokens_seen",
    "skip_memory_metrics",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "ddp_timeout",
    "save_total_limit",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_token",
    "hub_private_repo",
    "hub_always_push",
    "hub_revision",
)


class TrainingConfig(_Section):
    student: str = Field(
        default_factory=lambda: str(default_model_dir()),
        description="The student to train: a local model directory or hub id. Default: the fetched SmolLM2-135M-Instruct.",
    )
    student_gguf_file: str | None = Field(
        default=None, description="Load the student from this GGUF file in the 'student' directory."
    )
    tokenizer: str | None = Field(
        default=None,
        description="A separate tokenizer directory or hub id (with 'tiny': whose vocabulary the tiny model gets).",
    )
    tiny: TinyModelConfig | None = Field(
        default=None, description="Build a tiny random-init Llama instead of loading 'student' (tests, smoke runs)."
    )
    signal_objective: Literal["token", "head"] = Field(
        default="token",
        description="'token': L_signal is the LM head restricted to the signal tokens (no extra parameters); 'head': a linear head on the hidden state at step boundaries.",
    )
    signal_loss_weight: float = Field(default=1.0, ge=0, description="lambda in L = L_step + lambda * L_signal")
    students: list[TrainedStudentName] = Field(
        default_factory=lambda: list(TRAINED_STUDENTS),
        description="The students to train on the same rows: 'scaffolded' (signals + steps, the method), 'short_cot' (CoT distillation: plain SFT on the teacher's final answer text, what follows its reasoning block) and 'cot_sft' (long-thinking distillation: plain SFT on the whole trace).",
    )
    max_steps: int | None = Field(
        default=20, ge=1, description="Optimizer steps per student. null: train for 'epochs' instead."
    )
    epochs: float | None = Field(
        default=None,
        gt=0,
        description="Train for this many epochs instead of max_steps (setting it alone makes max_steps null).",
    )
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: LrScheduler = Field(
        default="linear",
        description="Learning-rate schedule after the warm-up (transformers' lr_scheduler_type; its options "
        "go in args.lr_scheduler_kwargs).",
    )
    per_device_batch_size: int = Field(default=4, ge=1, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(
        default=512,
        ge=16,
        description="Longest training example in tokens (prompt + completion); 'truncation' decides what happens to a longer one.",
    )
    truncation: Literal["drop", "fail", "truncate_keep_end"] = Field(
        default="drop",
        description="What happens to a training example longer than max_length: 'drop' leaves it out, for every "
        "student (so all train on the same problems, each example whole, its ending and eos kept); 'fail' stops "
        "the training stage before any model is loaded; 'truncate_keep_end' keeps the prompt, the beginning and "
        "the end of the completion (final answer and eos) and cuts its middle. Counted per student in the "
        "metrics, the model card, the stage summary and the log.",
    )
    max_over_length_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Fail the training stage before any model is loaded when a larger share of a student's "
        "training examples is longer than max_length (dropped or truncated); 1: never.",
        json_schema_extra=EXECUTION,
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Share of the training steps with linear warm-up.")
    warmup_steps: int | None = Field(
        default=None, ge=1, description="Linear warm-up over this many steps (instead of warmup_ratio)."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    logging_steps: int = Field(
        default=5, ge=1, description="Log the losses every this many steps.", json_schema_extra=EXECUTION
    )
    save_steps: int = Field(
        default=10,
        ge=1,
        description="Save a checkpoint (to resume a killed run) every this many steps.",
        json_schema_extra=EXECUTION,
    )
    keep_checkpoints: bool = Field(
        default=False,
        description="Keep the intermediate checkpoints after the final model is saved (they exist to resume a killed run).",
        json_schema_extra=EXECUTION,
    )
    seed: int = Field(default=0, description="Training seed (initialisation of new parameters, data order).")
    bf16: Literal["auto", True, False] = Field(
        default="auto", description="bf16 mixed precision; 'auto': on a GPU that supports it."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less memory, slower)."
    )
    student_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32",
        description="dtype the student's weights are loaded (and trained) in; 'auto': the checkpoint's own. "
        "bfloat16 halves the memory of weights and optimizer state; bf16 mixed precision is 'bf16'.",
    )
    attn_implementation: str | None = Field(
        default=None,
        description="The student's attention kernel: 'sdpa', 'eager', 'flash_attention_2', a hub kernel such as "
        "'kernels-community/flash-attn2', ... (default: transformers' choice).",
    )
    load_in_4bit: bool = Field(
        default=False,
        description="QLoRA: load the student's base weights in 4 bit (bitsandbytes NF4, bf16 compute) and train "
        "LoRA adapters on them; needs 'lora', a CUDA GPU and pip install bitsandbytes.",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers that receive the training logs: wandb, trackio, tensorboard, mlflow, "
        "... (each must be installed; [] for none).",
        json_schema_extra=EXECUTION,
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other argument of TRL's SFTConfig / transformers' TrainingArguments (optim, max_grad_norm, "
        "lr_scheduler_kwargs, torch_compile, neftune_noise_alpha, ...), passed through as given. Keys rscaffold "
        "sets itself are refused (set their training.* field). Part of the training fingerprint, except "
        "logging, progress-bar, data-loader-worker and tracker keys (disable_tqdm, run_name, ...).",
        json_schema_extra={"execution_keys": EXECUTION_TRAINER_ARGS},
    )
    padding_free: bool = Field(
        default=False, description="Pack each batch into one row without padding (flash-attention varlen kernels)."
    )
    lora: LoraSettings | None = Field(
        default=None,
        description="Train LoRA adapters (peft) instead of all weights; the signal-token rows of the input embeddings and (untied) of the LM head are trained too; the saved student is merged.",
    )
    num_processes: int = Field(
        default=1,
        ge=1,
        description="Train on this many processes (GPUs) with `accelerate launch`, started by the training task; the "
        "effective batch is per_device_batch_size x processes x gradient_accumulation_steps.",
        json_schema_extra=EXECUTION,
    )
    num_machines: int = Field(
        default=1,
        ge=1,
        description="Machines of a multi-node launch (see accelerate's docs).",
        json_schema_extra=EXECUTION,
    )
    accelerate_config: str | None = Field(
        default=None,
        description="An accelerate config file for the launch (e.g. deployments/accelerate/fsdp.yaml); "
        "None: plain data parallelism (DDP) over num_processes.",
        json_schema_extra=EXECUTION,
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_max_steps(cls, data: Any) -> Any:
        # `epochs` given without `max_steps`: train by epochs (max_steps' default would win otherwise).
        if isinstance(data, dict) and data.get("epochs") is not None and "max_steps" not in data:
            data = {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _check_training(self) -> TrainingConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.max_steps and training.epochs (the other null)")
        if self.warmup_steps is not None and self.warmup_ratio:
            raise ValueError("set training.warmup_steps or training.warmup_ratio, not both")
        if self.load_in_4bit and self.lora is None:
            raise ValueError("training.load_in_4bit (QLoRA) trains LoRA adapters on the 4-bit base: set training.lora")
        if self.load_in_4bit and self.tiny is not None:
            raise ValueError("training.load_in_4bit needs a real student, not training.tiny")
        refused = {k: TRAINER_ARGS_SET_BY_RSCAFFOLD[k] for k in self.args if k in TRAINER_ARGS_SET_BY_RSCAFFOLD}
        if refused:
            raise ValueError(
                "; ".join(
                    f"training.args.{k} is set by rscaffold itself"
                    + (f" from {where}: set it there" if where else " (the pipeline decides it)")
                    for k, where in refused.items()
                )
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _train_baseline(cls, data: Any) -> Any:
        # The old switch 'train_baseline: false' (no baseline: only the scaffolded student) still reads.
        if isinstance(data, dict) and "train_baseline" in data:
            data = dict(data)
            if not data.pop("train_baseline"):
                data["students"] = ["scaffolded"]
        return data

    @field_validator("students")
    @classmethod
    def _unique_students(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("train at least one student")
        if len(set(v)) != len(v):
            raise ValueError(f"each student may be listed once: {v}")
        return [s for s in TRAINED_STUDENTS if s in v]  # one order (training order), one fingerprint
