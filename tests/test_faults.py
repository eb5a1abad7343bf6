"""The fault matrix: nothing lost, nothing mixed (run them alone with ``pytest -m faults``).

Each test is a fault a hostile user can cause (two runs at once, kill -9 at every stage, damaged
files, dead endpoints, bad input) and checks what happens and what is kept; README.md's
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
        assert proc.poll() is None, f"finished before {n} x {pattern}:\n{proc.stderr.read()[-3000:]}"
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
