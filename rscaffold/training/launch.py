"""Train the students on several processes (GPUs): the entry point for ``accelerate launch``.

    accelerate launch --config_file deployments/accelerate/fsdp.yaml --num_processes 8 \\
        -m rscaffold.training.launch --config my.yaml

Every process runs the same training as the pipeline's training stage, into the same
content-addressed stage directory (``<artifacts>/training/<fingerprint>``), so a later
``rscaffold run --config my.yaml`` finds the stage complete and goes on to evaluation. The
upstream stages (up to ``dataset``) must already be complete for this config. Also works as a
plain ``python -m rscaffold.training.launch`` (one process).

Why not just call :func:`rscaffold.pipeline.run_training` on every process: it is written for one
process. Every process would (1) write the tiny base model, the final model directory (the
``.partial`` folder is wiped and renamed), ``train_metrics.json`` and the manifest at the same
paths at once, and (2) under FSDP/DeepSpeed save ``unwrap_model(model)``, whose parameters are
shards. So here:

* every process trains each student with :func:`~rscaffold.training.trainer.train_student` (the
  Trainer does DDP/FSDP/DeepSpeed itself), with the final save replaced by
  :func:`_save_final_distributed`: the full state dict is gathered by all processes
  (``Accelerator.get_state_dict``, a collective under FSDP/DeepSpeed) and written by the main one;
* the main process alone writes the base model, deletes checkpoints, and finally calls
  ``run_training``, which finds every student's final model already there (its "already trained,
  reusing" path) and only writes ``train_metrics.json`` and the manifest. The others wait.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("rscaffold.training.launch")

VARIANTS = ("scaffolded", "cot_sft")


class LaunchError(RuntimeError):
    """A precondition of the launch is not met (printed without a traceback)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m rscaffold.training.launch",
        description="Run the pipeline's training stage on N processes (start with `accelerate launch` or torchrun).",
    )
    p.add_argument("--config", required=True, type=Path, help="pipeline config YAML (as for `rscaffold run`)")
    p.add_argument("--artifacts-dir", type=Path, default=None, help="override run.artifacts_dir")
    p.add_argument(
        "--variant",
        choices=("scaffolded", "cot_sft", "both"),
        default="both",
        help="which student(s) to train; the stage is finished (manifest written) once all the config asks for exist",
    )
    return p.parse_args(argv)


def _variants(cfg, which: str) -> list[tuple[str, bool]]:
    wanted = [("scaffolded", True)] + ([("cot_sft", False)] if cfg.training.train_baseline else [])
    if which == "both":
        return wanted
    if which not in {n for n, _ in wanted}:
        raise LaunchError(f"--variant {which}: this config does not train it (training.train_baseline is false)")
    return [(n, s) for n, s in wanted if n == which]


def _save_final_distributed(original):
    """A rank-aware replacement for ``trainer._save_final`` (same signature)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    def save(trainer, tokenizer, model_dir: Path, meta: dict[str, Any], cfg, signal_names: list[str]) -> None:
        state = PartialState()
        acc = trainer.accelerator
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # The parameters are shards on each process: gather (every process must take part).
            full = acc.get_state_dict(trainer.model)
            if state.is_main_process:
                _save_from_state_dict(trainer, tokenizer, Path(model_dir), meta, cfg, signal_names, full)
        elif state.is_main_process:
            # DDP / one process: every process holds the whole model; one writes it.
            original(trainer, tokenizer, model_dir, meta, cfg, signal_names)
        state.wait_for_everyone()

    return save


def _save_from_state_dict(trainer, tokenizer, model_dir: Path, meta, cfg, signal_names, full: dict[str, Any]) -> None:
    """``trainer._save_final`` for a sharded model, from its gathered full state dict."""
    from rscaffold.training import trainer as trainer_mod
    from rscaffold.training.student import STUDENT_META, SignalHead, causal_lm_of

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config"):
        raise NotImplementedError("LoRA under FSDP/DeepSpeed is not supported by rscaffold.training.launch; use DDP")
    lm = causal_lm_of(model)
    head_prefix = "signal_head."
    head_sd = {k[len(head_prefix):]: v for k, v in full.items() if k.startswith(head_prefix)}
    lm_sd = {k: v for k, v in full.items() if not k.startswith(head_prefix)}
    tmp = model_dir.with_name(model_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lm.save_pretrained(tmp, state_dict=lm_sd)
    if head_sd:
        head = SignalHead(lm.config.get_text_config().hidden_size, len(signal_names))
        head.load_state_dict(head_sd)
        head.save(tmp, signal_names)
    tokenizer.save_pretrained(tmp)
    (tmp / STUDENT_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (tmp / "README.md").write_text(trainer_mod._model_card(meta, cfg))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)


@contextlib.contextmanager
def _distributed_saving() -> Iterator[None]:
    from rscaffold.training import trainer as trainer_mod

    original = trainer_mod._save_final
    trainer_mod._save_final = _save_final_distributed(original)
    try:
        yield
    finally:
        trainer_mod._save_final = original


def _state():
    """The process's ``PartialState``, created before the Trainer's (which then shares it).

    Without a GPU, accelerate and the Trainer treat each torchrun process as a lone one (no DDP,
    every process "main") unless asked for CPU. ``ACCELERATE_USE_CPU`` asks both (the Trainer
    re-creates the state from it), so several CPU processes (the tests; ``accelerate launch
    --multi_gpu`` on a machine without GPUs) form one gloo group and only one of them writes.
    """
    import torch
    from accelerate import PartialState

    acc = getattr(torch, "accelerator", None)
    has_device = acc.is_available() if acc is not None else torch.cuda.is_available()
    if not has_device:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return PartialState(cpu=not has_device)


def launch(config: Path, artifacts_dir: Path | None = None, variant: str = "both"):
    """Train (all processes) and finish the training stage (main process). Returns the main
    process's ``StageRef`` when the stage is complete, else None."""
    from rscaffold import pipeline
    from rscaffold.config import load_config
    from rscaffold.models import save_tiny_model
    from rscaffold.records import ExampleRecord
    from rscaffold.signals import load_taxonomy
    from rscaffold.store import StageDir, read_records
    from rscaffold.training.student import STUDENT_META
    from rscaffold.training.trainer import CHECKPOINTS_DIRNAME, MODEL_DIRNAME, train_student

    overrides = {"run": {"artifacts_dir": str(Path(artifacts_dir).resolve())}} if artifacts_dir else None
    cfg = load_config(config, overrides)
    fps = pipeline.plan_fingerprints(cfg)
    ds = StageDir(cfg.run.artifacts_dir, "dataset", fps["dataset"])
    if not ds.is_complete():
        raise LaunchError(
            f"the dataset stage for this config is not complete (expected {ds.manifest_path}). "
            f"Produce it first: `rscaffold stage dataset --config {config}` (or `rscaffold run --config {config}`), "
            "with the same config and artifacts dir."
        )
    variants = _variants(cfg, variant)
    state = _state()
    sd = StageDir(cfg.run.artifacts_dir, "training", fps["training"])
    if sd.is_complete():
        if state.is_main_process:
            log.info("training: already complete at %s", sd.path)
        return sd.ref()
    state.wait_for_everyone()  # no process may see a manifest written by the main one below

    dataset = ds.ref()
    tax = load_taxonomy(cfg.labeling.taxonomy)
    examples = read_records(dataset.output("examples"), ExampleRecord)
    train_rows = [e for e in examples if e.split == "train"]  # as run_training: no eval during training
    # The same student config and model card as run_training (so the model directories match).
    tcfg = cfg.training
    if tcfg.tiny is not None:
        base_dir = sd.path / "base"
        if state.is_main_process:
            sd.prepare()
            if not (base_dir / "config.json").exists():
                save_tiny_model(tcfg.tokenizer or tcfg.student, tcfg.tiny, base_dir)
        state.wait_for_everyone()
        tcfg = tcfg.model_copy(update={"student": str(base_dir), "tiny": None, "tokenizer": None})
    card = {"dataset_fingerprint": dataset.fingerprint, "taxonomy_digest": tax.digest(), "training_fingerprint": sd.fingerprint}

    with _distributed_saving():
        for name, scaffolded in variants:
            if (sd.path / name / MODEL_DIRNAME / STUDENT_META).exists():
                if state.is_main_process:
                    log.info("training: %s already trained", name)
                continue
            if state.is_main_process:
                log.info("training: %s on %d process(es)", name, state.num_processes)
            train_student(train_rows, tcfg, tax.names, tax.tokens, sd.path / name, scaffolded=scaffolded, model_card_info=card)
            state.wait_for_everyone()
            if state.is_main_process and not cfg.training.keep_checkpoints:
                shutil.rmtree(sd.path / name / CHECKPOINTS_DIRNAME, ignore_errors=True)

    ref = None
    all_done = all((sd.path / n / MODEL_DIRNAME / STUDENT_META).exists() for n, _ in _variants(cfg, "both"))
    if state.is_main_process:
        if all_done:
            # Every student exists, so this only writes train_metrics.json and the manifest.
            ref = pipeline.run_training(cfg, fps, dataset)
            log.info("training: complete at %s", ref.path)
        else:
            log.info("training: %s trained; the stage is finished once the other student is", variant)
    state.wait_for_everyone()
    return ref


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        ref = launch(args.config, args.artifacts_dir, args.variant)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ref is not None:
        print(ref.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
