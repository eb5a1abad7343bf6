"""The processes that train together: one (the pipeline's training stage) or N started by
``accelerate launch`` / torchrun (DDP, FSDP, DeepSpeed).

Every process trains; only the main process writes shared files (the base model, the final model
directories, metrics, the manifest) while the others wait at :meth:`Processes.wait`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Processes:
    """This process's place among the training processes."""

    state: Any = None  # accelerate.PartialState when several processes train together

    @property
    def num(self) -> int:
        return 1 if self.state is None else int(self.state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.state is None or bool(self.state.is_main_process)

    def wait(self) -> None:
        """A barrier: every process arrives here before any goes on (no-op for one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()


def current_processes() -> Processes:
    """The training processes of this run: several when started by a launcher (``WORLD_SIZE`` > 1).

    Without a GPU, accelerate and the Trainer treat each torchrun process as a lone one (no DDP,
    every process "main") unless asked for CPU. ``ACCELERATE_USE_CPU`` asks both (the Trainer
    re-creates the state from it), so several CPU processes (the tests; ``accelerate launch
    --multi_gpu`` on a machine without GPUs) form one gloo group and only one of them writes. The
    ``PartialState`` is created before the Trainer's, which then shares it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    acc = getattr(torch, "accelerator", None)
    has_device = acc.is_available() if acc is not None else torch.cuda.is_available()
    if not has_device:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return Processes(PartialState(cpu=not has_device))
