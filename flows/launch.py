"""Train the students on several processes (GPUs): the entry point for ``accelerate launch``.

    accelerate launch --config_file deployments/accelerate/fsdp.yaml --num_processes 8 \\
        -m rscaffold_flows.launch --config my.yaml

Every process runs the pipeline's training stage (:func:`rscaffold.stages.training.run_training`,
which is process-aware: every process trains, the main one writes) into the same content-addressed
stage directory (``<artifacts>/training/<fingerprint>``), so a later ``rscaffold run --config
my.yaml`` finds the stage complete and goes on to evaluation. The upstream stages (up to
``dataset``) must already be complete for this config. Also works as a plain ``python -m
rscaffold_flows.launch`` (one process).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rscaffold.vocabulary import TRAINED_STUDENTS

log = logging.getLogger("rscaffold.flows.launch")


class LaunchError(RuntimeError):
    """A precondition of the launch is not met (printed without a traceback)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m rscaffold_flows.launch",
        description="Run the pipeline's training stage on N processes (start with `accelerate launch` or torchrun).",
    )
    p.add_argument("--config", required=True, type=Path, help="pipeline config YAML (as for `rscaffold run`)")
    p.add_argument("--artifacts-dir", type=Path, default=None, help="override run.artifacts_dir")
    p.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, as for `rscaffold run --set` (give the same ones, or the fingerprints differ)",
    )
    p.add_argument(
        "--student",
        "--variant",  # the name before short_cot existed
        dest="variant",
        choices=(*TRAINED_STUDENTS, "all", "both"),
        default="all",
        help="which student to train (default all of training.students; 'both' is the old name of 'all'); "
        "the stage is finished (manifest written) once all the config asks for exist",
    )
    p.add_argument("--force", action="store_true", help="recompute the stage even if it is complete (a refresh)")
    p.add_argument("--fresh", action="store_true", help="discard the stage's partial work (checkpoints) first")
    return p.parse_args(argv)


def launch(
    config: Path,
    artifacts_dir: Path | None = None,
    variant: str = "all",
    *,
    assignments: Sequence[str] = (),
    force: bool = False,
    fresh: bool = False,
):
    """Train (all processes) and finish the training stage (main process). Returns the main
    process's ``StageRef`` when the stage is complete, else None. ``assignments``: ``--set``
    overrides (``training.max_steps=200``)."""
    from rscaffold.config import deep_merge, load_config, parse_assignments
    from rscaffold.stages.common import stage_dir
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.training import run_training, training_variants

    overrides = parse_assignments(list(assignments), base=Path.cwd())
    if artifacts_dir:
        overrides = deep_merge(overrides, {"run": {"artifacts_dir": str(artifacts_dir)}})
    cfg = load_config(config, overrides or None)
    fps = plan_fingerprints(cfg)
    ds = stage_dir(cfg, "dataset", fps)
    if not ds.is_complete():
        raise LaunchError(
            f"the dataset stage for this config is not complete (expected {ds.manifest_path}). "
            f"Produce it first: `rscaffold stage dataset --config {config}` (or `rscaffold run --config {config}`), "
            "with the same config and artifacts dir."
        )
    every = variant in ("all", "both")
    if not every and variant not in {n for n, _ in training_variants(cfg)}:
        raise LaunchError(
            f"--student {variant}: this config does not train it (training.students: {cfg.training.students})"
        )
    ref = run_training(cfg, fps, ds.ref(), force=force, fresh=fresh, only=None if every else variant)
    if ref is not None:
        log.info("training: complete at %s", ref.path)
    return ref


def main(argv: Sequence[str] | None = None) -> int:
    from rscaffold.config import ConfigError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        ref = launch(
            args.config,
            args.artifacts_dir,
            args.variant,
            assignments=args.assignments,
            force=args.force,
            fresh=args.fresh,
        )
    except (LaunchError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ref is not None:
        print(ref.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
