"""The fault matrix: nothing lost, nothing mixed (run them alone with ``pytest -m faults``).

Each test is a fault a hostile user can cause (two runs at once, kill -9 at every stage, damaged
files, dead endpoints, bad input) and checks what happens and what is kept; docs/faults.md's
"Faults" table lists them. Real processes, a real model (tiny, random-init) and, for the labeler
endpoint, a real OpenAI-compatible server behind a switchable proxy (tests/helpers.py).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from rscaffold.config import config_from_dict
from rscaffold.records import LabeledStepRecord, TraceRecord
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems
from rscaffold.stages.teacher import run_teacher
from rscaffold.store import StageDir, StageLockedError, read_records, write_records

pytestmark = [pytest.mark.faults, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def tiny_config(tiny_model_dir: Path, artifacts: Path, **sections) -> dict:
    """A teacher + labeling config on the tiny random-init model (sampling gives it text)."""
    raw = {
        "run": {"artifacts_dir": str(artifacts), "retries": 0},
        "problems": {
            "train": str(DATA / "problems" / "train.jsonl"),
            "eval": str(DATA / "problems" / "eval.jsonl"),
            "limit_train": 8,
            "limit_eval": 2,
        },
        "teacher": {
            "llm": {"backend": "transformers", "model": str(tiny_model_dir), "batch_size": 2},
            "sampling": {"max_new_tokens": 24, "temperature": 0.7, "seed": 3},
            "shard_size": 2,
            "keep": "all",  # a random-init teacher's traces all hit the token limit
        },
        "labeling": {"method": "llm", "sampling": {"max_new_tokens": 24}, "shard_size": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


STAGE_RUNNER = """
import json, sys, logging
logging.basicConfig(level=logging.INFO)
from rscaffold.config import config_from_dict
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems
from rscaffold.stages.teacher import run_teacher
from rscaffold.stages.labeling import run_labeling
cfg = config_from_dict(json.loads(sys.argv[1]))
fps = plan_fingerprints(cfg)
teacher = run_teacher(cfg, fps, run_problems(cfg, fps))
if sys.argv[2] == "labeling":
    run_labeling(cfg, fps, teacher)
"""


def start_stages(raw: dict, until: str = "labeling") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", STAGE_RUNNER, json.dumps(raw), until]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_files(folder: Path, pattern: str, n: int, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(folder.glob(pattern))) < n:
        assert proc.poll() is None, (
            f"finished before {n} x {pattern}:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}"
        )
        assert time.monotonic() < deadline, f"no {n} x {pattern} in {folder} after {timeout_s}s"
        time.sleep(0.02)


def without_latency(traces: list[TraceRecord]) -> list[dict]:
    return [t.model_dump(exclude={"latency_s"}) for t in traces]


# ---------------------------------------------------------------------------------------------
# 1. two runs on one artifacts directory


def test_two_runs_at_once_write_each_stage_once(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path / "artifacts")
    a, b = start_stages(raw), None
    try:
        time.sleep(1.0)
        b = start_stages(raw)
        out_a, err_a = a.communicate(timeout=600)
        out_b, err_b = b.communicate(timeout=600)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
    assert a.returncode == 0, err_a[-3000:]
    assert b.returncode == 0, err_b[-3000:]
    # the second run waited for the first, naming it, then reused its output
    assert "waiting for pid" in err_a + err_b
    assert (err_a + err_b).count("teacher: complete output found") == 1
    cfg = config_from_dict(raw)
    fps = plan_fingerprints(cfg)
    steps = read_records(
        StageDir(cfg.run.artifacts_dir, "labeling", fps["labeling"]).ref().output("labeled_steps"), LabeledStepRecord
    )
    keys = [(s.trace_id, s.step_index) for s in steps]
    assert keys and len(keys) == len(set(keys))  # no (trace, step) twice
    assert not list((tmp_path / "artifacts").glob("*/*.partial"))  # nothing left half-built


def test_second_run_with_no_wait_fails_naming_the_holder(tmp_path):
    sd = StageDir(tmp_path, "teacher", "abc")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rscaffold.store import StageDir\n"
         "with StageDir(sys.argv[1], 'teacher', 'abc').lock():\n    print('locked', flush=True)\n    time.sleep(60)\n",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageLockedError, match=f"pid {holder.pid}"):
            with sd.lock(wait=False):
                pass
        with pytest.raises(StageLockedError, match="being written by"):
            with sd.lock(wait=True, timeout_s=0.5, poll_s=0.1):
                pass
        holder.kill()  # kill -9: the OS releases the lock with the process
        holder.wait()
        with sd.lock(wait=False):
            pass
    finally:
        holder.kill()


# ---------------------------------------------------------------------------------------------
# 2. re-running a stage keeps what it should


def test_stage_rerun_after_a_kill_resumes_from_its_shards(tiny_model_dir, tmp_path, monkeypatch):
    """`rscaffold stage teacher` after a failure: finished shards are kept, only the rest is sent."""
    from rscaffold.llm.transformers_local import TransformersBackend

    raw = tiny_config(tiny_model_dir, tmp_path / "artifacts", run={"request_cache": "off"})
    proc = start_stages(raw, until="teacher")
    cfg = config_from_dict(raw)
    fps = plan_fingerprints(cfg)
    sd = StageDir(cfg.run.artifacts_dir, "teacher", fps["teacher"])
    wait_for_files(sd.shards, "traces-*.parquet", 2, proc)
    proc.kill()
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in sd.shards.glob("traces-*.parquet")}
    done = sum(len(read_records(p, TraceRecord)) for p in sd.shards.glob("traces-*.parquet"))
    sent: list[str] = []
    original = TransformersBackend.generate

    def counting(self, requests, sampling, on_result=None):
        sent.extend(r.request_id for r in requests)
        return original(self, requests, sampling, on_result)

    monkeypatch.setattr(TransformersBackend, "generate", counting)
    ref = run_teacher(cfg, fps, run_problems(cfg, fps), force=True)  # what `rscaffold stage teacher` does
    assert len(sent) == 8 - done and len(read_records(ref.output("traces"), TraceRecord)) == 8
    for name, mtime in kept.items():  # the finished shards were neither rewritten nor deleted
        assert (Path(ref.path) / "shards" / name).stat().st_mtime_ns == mtime


def test_refresh_builds_beside_the_old_output_and_replaces_it_only_on_success(tmp_path):
    from rscaffold.config import PipelineConfig
    from rscaffold.stages.common import open_stage

    cfg = PipelineConfig.model_validate({"run": {"artifacts_dir": str(tmp_path)}})
    fps = {"dataset": "fp"}

    def build(text: str, fail: bool = False):
        with open_stage(cfg, "dataset", fps, force=True) as (sd, done):
            assert done is None
            (sd.work / "out.txt").write_text(text)
            if fail:
                raise RuntimeError("injected failure")
            return sd.finish(outputs={"out": "out.txt"}, config={}, inputs={}, summary={}, started=0.0, code="v")

    ref = build("old")
    with pytest.raises(RuntimeError, match="injected"):
        build("new", fail=True)
    assert Path(ref.output("out")).read_text() == "old"  # the complete output is untouched
    assert StageDir(tmp_path, "dataset", "fp").verify() == []
    build("new")
    assert Path(ref.output("out")).read_text() == "new"


# ---------------------------------------------------------------------------------------------
# 3. a resumed run is the same run


def test_kill_and_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Sampling at temperature 0.7 with the local backend: seeds come from (run seed, problem id,
    sample index) and a shard is decoded in the same batches, so the traces are identical."""
    straight = config_from_dict(tiny_config(tiny_model_dir, tmp_path / "straight", run={"request_cache": "off"}))
    fps = plan_fingerprints(straight)
    expected = read_records(run_teacher(straight, fps, run_problems(straight, fps)).output("traces"), TraceRecord)
    assert len({t.text for t in expected}) > 1  # sampled, varied text

    raw = tiny_config(tiny_model_dir, tmp_path / "killed", run={"request_cache": "off"})
    proc = start_stages(raw, until="teacher")
    cfg = config_from_dict(raw)
    sd = StageDir(cfg.run.artifacts_dir, "teacher", plan_fingerprints(cfg)["teacher"])
    wait_for_files(sd.shards, "traces-*.parquet", 2, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list(sd.shards.glob("traces-*.parquet"))) < 4
    resumed = read_records(run_teacher(cfg, fps, run_problems(cfg, fps)).output("traces"), TraceRecord)
    assert without_latency(resumed) == without_latency(expected)


# ---------------------------------------------------------------------------------------------
# 4. a dead labeler is not a finished labeling stage


@pytest.fixture(scope="module")
def labeler_proxy(counted_server):
    return counted_server


def test_dead_labeler_fails_the_stage_keeping_its_labels(labeler_proxy, tiny_model_dir, tmp_path):
    import threading

    from rscaffold.labeling.labeler import LabelerUnavailableError
    from rscaffold.stages.labeling import run_labeling

    raw = tiny_config(
        tiny_model_dir,
        tmp_path / "artifacts",
        labeling={
            "method": "llm",
            "llm": {
                "backend": "openai",
                "base_url": labeler_proxy.base_url,
                "model": str(tiny_model_dir),
                "max_retries": 1,
            },
            "sampling": {"max_new_tokens": 16},
            "retries_on_invalid": 0,
            "max_fallback_rate": 1.0,
            "shard_size": 2,
        },
    )
    cfg = config_from_dict(raw)
    fps = plan_fingerprints(cfg)
    teacher = run_teacher(cfg, fps, run_problems(cfg, fps))
    shards = StageDir(cfg.run.artifacts_dir, "labeling", fps["labeling"]).shards
    labeler_proxy.reset()

    def kill_endpoint_after_first_shard():
        deadline = time.monotonic() + 300
        while not list(shards.glob("labeled_steps-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.01)
        labeler_proxy.down()

    watcher = threading.Thread(target=kill_endpoint_after_first_shard)
    watcher.start()
    try:
        with pytest.raises(LabelerUnavailableError, match="unreachable"):
            run_labeling(cfg, fps, teacher)
    finally:
        watcher.join()
        labeler_proxy.up()
    kept = list(shards.glob("labeled_steps-*.parquet"))
    assert kept and not StageDir(cfg.run.artifacts_dir, "labeling", fps["labeling"]).is_complete()
    labeled_before = {s.trace_id for p in kept for s in read_records(p, LabeledStepRecord)}
    sent_before = labeler_proxy.reset()
    ref = run_labeling(cfg, fps, teacher)  # the endpoint is back: resume
    steps = read_records(ref.output("labeled_steps"), LabeledStepRecord)
    assert {s.trace_id for s in steps} >= labeled_before
    assert labeler_proxy.reset() <= 8 - len(labeled_before)  # only what was not labeled before
    assert sent_before >= len(labeled_before)


def test_default_fallback_threshold_stops_a_broken_labeler(tiny_model_dir, tmp_path, monkeypatch):
    """A labeler that answers junk for every trace cannot pass the default max_fallback_rate."""
    from rscaffold.llm.base import Capabilities
    from rscaffold.llm.transformers_local import TransformersBackend
    from rscaffold.stages.labeling import LabelingFailureError, run_labeling

    # unconstrained decoding: the random-init labeler answers junk
    monkeypatch.setattr(TransformersBackend, "capabilities", Capabilities())
    monkeypatch.setattr(TransformersBackend, "_constraints", lambda self, batch: [None] * len(batch))
    raw = tiny_config(tiny_model_dir, tmp_path / "artifacts")
    raw["labeling"] = {"method": "llm", "sampling": {"max_new_tokens": 8}, "retries_on_invalid": 0}
    cfg = config_from_dict(raw)
    assert cfg.labeling.max_fallback_rate < 1.0
    fps = plan_fingerprints(cfg)
    teacher = run_teacher(cfg, fps, run_problems(cfg, fps))
    with pytest.raises(LabelingFailureError, match="fell back"):
        run_labeling(cfg, fps, teacher)


# ---------------------------------------------------------------------------------------------
# 5. damaged artifacts


def test_a_hand_edited_output_is_detected_and_recomputed(tiny_model_dir, tmp_path, caplog):
    cfg = config_from_dict(tiny_config(tiny_model_dir, tmp_path / "artifacts"))
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    ref = run_teacher(cfg, fps, problems)
    original = read_records(ref.output("traces"), TraceRecord)
    edited = [t.model_copy(update={"text": "EDITED BY HAND"}) for t in original]
    write_records(ref.output("traces"), edited, TraceRecord)
    assert StageDir(cfg.run.artifacts_dir, "teacher", fps["teacher"]).verify()
    with caplog.at_level("WARNING"):
        again = run_teacher(cfg, fps, problems)
    assert "damaged" in caplog.text
    assert without_latency(read_records(again.output("traces"), TraceRecord)) == without_latency(original)
    assert list((tmp_path / "artifacts" / "teacher").glob(f"{fps['teacher']}.damaged-*"))  # kept for inspection


def test_damaged_and_missing_shards_are_redone_without_overwriting_others(tiny_model_dir, tmp_path, caplog):
    raw = tiny_config(tiny_model_dir, tmp_path / "artifacts", run={"request_cache": "off"})
    proc = start_stages(raw, until="teacher")
    cfg = config_from_dict(raw)
    fps = plan_fingerprints(cfg)
    sd = StageDir(cfg.run.artifacts_dir, "teacher", fps["teacher"])
    wait_for_files(sd.shards, "traces-*.parquet", 3, proc)
    proc.kill()
    proc.wait()
    shards = sorted(sd.shards.glob("traces-*.parquet"))
    shards[0].write_bytes(shards[0].read_bytes()[:40])  # truncated
    shards[1].unlink()  # deleted
    untouched = {p.name: p.read_bytes() for p in shards[2:]}
    with caplog.at_level("WARNING"):
        ref = run_teacher(cfg, fps, run_problems(cfg, fps))
    assert "unreadable" in caplog.text
    assert len(read_records(ref.output("traces"), TraceRecord)) == 8
    out = Path(ref.path) / "shards"
    for name, data in untouched.items():  # names come from the work (index ranges), not a count
        assert (out / name).read_bytes() == data
    assert list((out / "damaged").iterdir())


def test_an_incomplete_checkpoint_is_skipped(tmp_path):
    from rscaffold.training.trainer import _last_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


# ---------------------------------------------------------------------------------------------
# 6. smaller ones


def test_cross_section_and_taxonomy_errors_stop_before_any_stage(tmp_path, monkeypatch):
    import rscaffold_flows.pipeline
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    def must_not_run(*a, **k):  # test guard: no flow may start
        raise AssertionError("flow started")

    monkeypatch.setattr(rscaffold_flows.pipeline, "rscaffold_pipeline", must_not_run)
    no_baseline = tmp_path / "a.yaml"
    no_baseline.write_text(
        yaml.safe_dump({"training": {"students": ["scaffolded"]}, "evaluation": {"models": ["base", "cot_sft"]}})
    )
    out = CliRunner().invoke(app, ["run", "--config", str(no_baseline)])
    assert out.exit_code == 2 and "cot_sft" in out.output and "training.students" in out.output

    tax = yaml.safe_load((DATA / "signals.yaml").read_text())
    tax["signals"].append(dict(tax["signals"][0]))  # a duplicate name
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump(tax))
    empty = dict(tax, signals=[])
    (tmp_path / "empty.yaml").write_text(yaml.safe_dump(empty))
    for name, expected in (("dup.yaml", "duplicate signal"), ("empty.yaml", "signals")):
        cfg = tmp_path / f"cfg-{name}"
        cfg.write_text(yaml.safe_dump({"labeling": {"taxonomy": str(tmp_path / name)}}))
        out = CliRunner().invoke(app, ["run", "--config", str(cfg)])
        assert out.exit_code == 2 and "labeling.taxonomy" in out.output and expected in out.output, out.output


def test_a_key_at_the_cut_of_an_error_message_is_still_masked():
    from rscaffold.llm.parsing import describe_error

    key = "sk-" + "s3cr3t" * 8
    msg = describe_error(RuntimeError("x" * 480 + key + " trailing"), limit=500, secrets=(key,))
    assert "s3cr3t" not in msg and "***" in msg


def test_parquet_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_records(tmp_path / "x.parquet", [], TraceRecord)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_killed_run_leaves_no_prefect_server_behind(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path / "artifacts")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    cli = subprocess.Popen(
        [str(Path(sys.executable).parent / "rscaffold"), "run", "--config", str(tmp_path / "cfg.yaml")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        server = None
        while server is None:
            assert cli.poll() is None and time.monotonic() < deadline, "no temporary Prefect server seen"
            server = next(
                (
                    c
                    for c in psutil.Process(cli.pid).children(recursive=True)
                    if "ephemeral_server" in " ".join(c.cmdline())
                ),
                None,
            )
            time.sleep(0.2)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        server.wait(timeout=20)  # raises psutil.TimeoutExpired if it outlives its parent
    finally:
        if cli.poll() is None:
            cli.kill()


# ---------------------------------------------------------------------------------------------
# a stage's process never outlives the run that started it

CHILD_DRIVER = """
import json, sys
from rscaffold_tasks._child import run_in_child
from rscaffold.config import config_from_dict
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems
cfg = config_from_dict(json.loads(sys.argv[1]))
fps = plan_fingerprints(cfg)
run_in_child("rscaffold.stages.teacher:run_teacher", {"cfg": cfg, "fps": fps, "problems": run_problems(cfg, fps)})
"""


def slow_teacher(tiny_model_dir: Path, artifacts: Path) -> dict:
    """The tiny teacher with enough work to still be running when it is interrupted."""
    return tiny_config(
        tiny_model_dir,
        artifacts,
        run={"request_cache": "off"},
        problems={"limit_train": 40},
        teacher={"sampling": {"max_new_tokens": 48, "temperature": 0.7, "seed": 3}, "shard_size": 2},
    )


def stage_process_of(parent: psutil.Process, proc: subprocess.Popen, timeout_s: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}"
        assert time.monotonic() < deadline, "no stage process seen"
        for c in parent.children(recursive=True):
            try:
                if "multiprocessing.spawn" in " ".join(c.cmdline()) and "spawn_main" in " ".join(c.cmdline()):
                    return c
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)


def assert_all_gone(procs: list[psutil.Process], within_s: float) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within_s)
    for p in alive:
        p.kill()
    assert not alive, f"still running {within_s:.0f} s later: {[(p.pid, p.cmdline()[:4]) for p in alive]}"


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_an_interrupted_run_leaves_no_stage_process_behind(tiny_model_dir, tmp_path, how):
    """A run killed outright takes its stage's process (and the multiprocessing helpers it shares)
    with it; one interrupted stops it within seconds. The finished shards stay."""
    raw = slow_teacher(tiny_model_dir, tmp_path / "artifacts")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.Popen(
        [sys.executable, "-c", CHILD_DRIVER, json.dumps(raw)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        cfg = config_from_dict(raw)
        sd = StageDir(cfg.run.artifacts_dir, "teacher", plan_fingerprints(cfg)["teacher"])
        stage_process_of(psutil.Process(run.pid), run)
        wait_for_files(sd.shards, "traces-*.parquet", 1, run)
        tree = psutil.Process(run.pid).children(recursive=True)
        os.kill(run.pid, signal.SIGKILL if how == "kill -9" else signal.SIGINT)
        run.wait(timeout=15)
        assert_all_gone(tree, within_s=5)
        assert sd.shards.is_dir() and list(sd.shards.glob("traces-*.parquet"))
        assert not sd.is_complete()
    finally:
        if run.poll() is None:
            run.kill()


def test_sigterm_stops_the_stage_within_seconds_and_the_sampled_resume_is_the_same_run(tiny_model_dir, tmp_path):
    """``rscaffold stage teacher`` (its stage in a child process, sampling at temperature 0.7)
    gets SIGTERM mid-stage: the whole process tree is gone within seconds, the finished shards
    stay, and the resumed stage's traces are those of an uninterrupted run."""
    raw = tiny_config(tiny_model_dir, tmp_path / "killed", run={"request_cache": "off"})
    assert raw["teacher"]["sampling"]["temperature"] > 0 and raw["problems"]["limit_train"] == 8
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "run.log"
    cli = subprocess.Popen(
        [str(Path(sys.executable).parent / "rscaffold"), "stage", "teacher", "--config", str(tmp_path / "cfg.yaml")],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        cfg = config_from_dict(raw)
        sd = StageDir(cfg.run.artifacts_dir, "teacher", plan_fingerprints(cfg)["teacher"])
        stage_process_of(psutil.Process(cli.pid), cli, timeout_s=300)
        wait_for_files(sd.shards, "traces-*.parquet", 2, cli)
        tree = psutil.Process(cli.pid).children(recursive=True)
        cli.send_signal(signal.SIGTERM)
        start = time.monotonic()
        cli.wait(timeout=20)
        assert_all_gone(tree, within_s=max(1.0, 10 - (time.monotonic() - start)))
    finally:
        if cli.poll() is None:
            cli.kill()
    assert "Failed to send telemetry" not in log.read_text()
    assert 2 <= len(list(sd.shards.glob("traces-*.parquet"))) < 4 and not sd.is_complete()

    # the resumed stage and an uninterrupted one, each in a process of its own
    straight_raw = tiny_config(tiny_model_dir, tmp_path / "straight", run={"request_cache": "off"})
    runs = [start_stages(raw, until="teacher"), start_stages(straight_raw, until="teacher")]
    for proc in runs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    straight = config_from_dict(straight_raw)
    resumed, expected = (
        read_records(StageDir(c.run.artifacts_dir, "teacher", sd.fingerprint).ref().output("traces"), TraceRecord)
        for c in (cfg, straight)
    )
    assert len({t.text for t in expected}) > 1  # sampled, varied text
    assert without_latency(resumed) == without_latency(expected)


def test_requests_cancelled_by_a_stop_are_not_counted_as_sent(tmp_path):
    """A run stopped (SIGTERM, Ctrl-C) while requests are in flight counts as sent only those
    that were answered."""
    from rscaffold.config import BackendConfig, SamplingConfig
    from rscaffold.llm.base import Capabilities, ChatRequest, Completion
    from rscaffold.llm.cache import CachedBackend, RequestCache

    class StoppedAfterTwo:
        """test fake: answers two requests, then the run is stopped (as a signal handler raises)"""

        capabilities = Capabilities(batch_invariant=True)

        def generate(self, requests, sampling, on_result=None):
            for r in requests[:2]:
                on_result(Completion(r.request_id, text="ok", prompt_tokens=1, completion_tokens=1))
            raise KeyboardInterrupt

    cfg = BackendConfig(backend="openai", model="m", base_url="http://127.0.0.1:1/v1")
    inner = StoppedAfterTwo()
    backend = CachedBackend(
        cfg, lambda: inner, capabilities=inner.capabilities, name="openai", cache=RequestCache(tmp_path)
    )
    requests = [ChatRequest(f"r{i}", [{"role": "user", "content": str(i)}]) for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        backend.generate(requests, SamplingConfig())
    assert backend.stats.requests == 5 and backend.stats.sent == 2


# ---------------------------------------------------------------------------------------------
# a finished run on a read-only share


def read_only(folder: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``folder`` mounted read-only (a private mount namespace: ``unshare -m``)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(folder), *cmd], capture_output=True, text=True, timeout=300
    )


REUSE_RUNNER = """
import json, sys
from rscaffold.config import config_from_dict
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems
from rscaffold.store import ReadOnlyArtifactsError
for raw in json.loads(sys.argv[1]):
    cfg = config_from_dict(raw)
    try:
        print(run_problems(cfg, plan_fingerprints(cfg)).path)
    except ReadOnlyArtifactsError as err:
        print("refused:", err)
"""


def test_complete_outputs_are_read_from_a_read_only_artifacts_directory(tmp_path):
    from test_export import build_artifacts

    probe = read_only(tmp_path, "touch", str(tmp_path / "x"))
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"no read-only bind mount here (unshare -m needs CAP_SYS_ADMIN): {probe.stderr.strip()[-200:]}")
    root = tmp_path / "artifacts"
    cfg, dataset = build_artifacts(root)
    raw = cfg.model_dump(mode="json")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    rscaffold = str(Path(sys.executable).parent / "rscaffold")

    other = json.loads(json.dumps(raw))
    other["problems"]["limit_train"] = 9  # a stage that would have to be computed
    reused = read_only(root, sys.executable, "-c", REUSE_RUNNER, json.dumps([raw, other]))
    assert reused.returncode == 0, reused.stderr[-3000:]
    done, refused = reused.stdout.strip().splitlines()[-2:]
    assert done == str(StageDir(root, "problems", plan_fingerprints(cfg)["problems"]).path)
    assert refused.startswith("refused:") and "must be computed, but the artifacts directory" in refused
    shown = read_only(root, rscaffold, "fingerprints", "--config", str(tmp_path / "cfg.yaml"))
    assert shown.returncode == 0 and "complete" in shown.stdout, shown.stderr[-3000:]
    exported = read_only(root, rscaffold, "export", str(root), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert (tmp_path / "hf" / "README.md").is_file() and (tmp_path / "hf" / "data").is_dir()


def test_a_bad_problem_file_is_a_config_error_naming_file_and_line(tmp_path, monkeypatch):
    """A problem file that is not UTF-8, not valid JSON or empty stops the run with exit 2 before
    any flow starts, naming ``file:line``."""
    import rscaffold_flows.pipeline
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    def must_not_run(*a, **k):  # test guard: no flow may start
        raise AssertionError("flow started")

    monkeypatch.setattr(rscaffold_flows.pipeline, "rscaffold_pipeline", must_not_run)
    good = (DATA / "problems" / "train.jsonl").read_bytes().splitlines()[:3]
    cases = {
        "latin1.jsonl": (b"\n".join([*good, b'{"question": "caf\xe9", "answer": "#### 1"}']), ":4: not UTF-8"),
        "broken.jsonl": (b"\n".join([good[0], b'{"question": "x",']), ":2: not valid JSON"),
        "empty.jsonl": (b"\n\n", "no problems"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        cfg = tmp_path / f"cfg-{name}.yaml"
        cfg.write_text(yaml.safe_dump({"problems": {"train": str(path)}, "run": {"artifacts_dir": str(tmp_path)}}))
        out = CliRunner().invoke(app, ["run", "--config", str(cfg)])
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and "problems.train" in text and expected in text, out.output
        assert "Traceback" not in out.output and "UnicodeDecodeError" not in out.output


def test_the_temporary_server_start_deadline_is_a_setting(tmp_path, monkeypatch):
    """``run.server_start_timeout_s`` / ``$RSCAFFOLD_SERVER_START_TIMEOUT_S`` set how long a run
    waits for its temporary Prefect server; the config check runs while it starts."""
    from rscaffold_flows.ephemeral_server import start_timeout_s

    monkeypatch.setenv("RSCAFFOLD_SERVER_START_TIMEOUT_S", "300")
    assert start_timeout_s() == 300 and start_timeout_s(7.5) == 7.5
    monkeypatch.setenv("RSCAFFOLD_SERVER_START_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="RSCAFFOLD_SERVER_START_TIMEOUT_S"):
        start_timeout_s()
    script = (
        "from rscaffold_flows.ephemeral_server import prefect_api\n"
        "seen = []\n"
        "try:\n"
        "    with prefect_api(meanwhile=lambda: seen.append('checked')):\n"
        "        print('started')\n"
        "except RuntimeError as err:\n"
        "    print(seen, err)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), RSCAFFOLD_SERVER_START_TIMEOUT_S="0.01")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "['checked'] the temporary Prefect server did not answer within 0 s" in out.stdout, out.stderr[-2000:]
