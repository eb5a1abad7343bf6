"""Never pay twice for the teacher: the request cache, fingerprints that follow what a stage reads,
and a Prefect cache key that includes the artifacts root.

The teacher and the labeler are a REAL OpenAI-compatible server (``transformers serve`` hosting a
tiny random-init model on 127.0.0.1), reached through a counting proxy (tests/helpers.py),
so every assertion on "requests sent" counts what reached the model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import CountingProxy

from rscaffold.config import config_from_dict
from rscaffold.records import TraceRecord
from rscaffold.stages.dataset import run_dataset
from rscaffold.stages.labeling import run_labeling
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems
from rscaffold.stages.teacher import run_teacher
from rscaffold.store import StageDir, read_records

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def proxy(counted_server):
    return counted_server


def make_config(proxy: CountingProxy, model: Path, artifacts: Path, **sections):
    raw = {
        "run": {"artifacts_dir": str(artifacts), "retries": 0},
        "problems": {
            "train": str(DATA / "problems" / "train.jsonl"),
            "eval": str(DATA / "problems" / "eval.jsonl"),
            "limit_train": 6,
            "limit_eval": 3,
        },
        "teacher": {
            "llm": {
                "backend": "openai",
                "base_url": proxy.base_url,
                "model": str(model),
                "concurrency": 4,
                "max_retries": 0,
            },
            "sampling": {"max_new_tokens": 16, "temperature": 0.7, "seed": 1},
            "shard_size": 2,
            "keep": "all",  # a random-init teacher's traces all hit the token limit
        },
        "labeling": {
            "method": "llm",
            "sampling": {"max_new_tokens": 24},
            "retries_on_invalid": 0,
            "max_fallback_rate": 1.0,  # a random-init labeler answers junk: keyword fallbacks
            "shard_size": 2,
        },
        "dataset": {"validation_fraction": 0.0},
    }
    for section, values in sections.items():
        for key, value in values.items():
            target = raw.setdefault(section, {})
            *path, last = key.split(".")
            for part in path:
                target = target.setdefault(part, {})
            target[last] = value
    return config_from_dict(raw)


def run_upto_dataset(cfg, *, force_teacher: bool = False, dataset: bool = True):
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    teacher = run_teacher(cfg, fps, problems, force=force_teacher)
    labeling = run_labeling(cfg, fps, teacher)
    refs = {"problems": problems, "teacher": teacher, "labeling": labeling}
    if dataset:
        refs["dataset"] = run_dataset(cfg, fps, teacher=teacher, labeling=labeling)
    return fps, refs


def traces_of(ref) -> list[dict]:
    return pq.read_table(ref.output("traces")).to_pylist()


def test_every_rerun_sends_zero_requests(proxy, tiny_teacher_dir, tmp_path, monkeypatch):
    import rscaffold
    import rscaffold.stages.common as common

    artifacts = tmp_path / "artifacts"
    proxy.reset()
    fps, cold = run_upto_dataset(make_config(proxy, tiny_teacher_dir, artifacts))
    sent_cold = proxy.reset()
    assert sent_cold >= 6 + 6  # 6 teacher traces, then one labeling request per trace with steps
    cold_traces = traces_of(cold["teacher"])
    assert cold["teacher"].summary["requests"]["sent"] == 6

    changes = {
        "teacher.llm.concurrency": {"teacher": {"llm.concurrency": 2}},
        "teacher.shard_size": {"teacher": {"shard_size": 3}},
        "teacher.max_failure_rate": {"teacher": {"max_failure_rate": 0.1}},
        "teacher.keep": {"teacher": {"keep": "correct"}},
        "problems.limit_eval": {"problems": {"limit_eval": 2}},
        "labeling.shard_size": {"labeling": {"shard_size": 3}},
    }
    for name, change in changes.items():
        cfg = make_config(proxy, tiny_teacher_dir, artifacts, **change)
        # keep=correct leaves the random-init teacher nothing to train on: no dataset there
        fps2, refs = run_upto_dataset(cfg, dataset=name != "teacher.keep")
        assert proxy.reset() == 0, f"{name}: requests were sent"
        assert fps2["teacher"] == fps["teacher"], f"{name} changed the teacher's fingerprint"
        assert traces_of(refs["teacher"]) == cold_traces, name

    # the package version is not part of any fingerprint
    monkeypatch.setattr(rscaffold, "__version__", "99.0")
    assert plan_fingerprints(make_config(proxy, tiny_teacher_dir, artifacts)) == fps

    # a fingerprint that changed for any reason (here: the teacher's code) re-serves every request
    original = common.stage_code_version
    monkeypatch.setattr(
        common, "stage_code_version", lambda stage: original(stage) + ("x" if stage == "teacher" else "")
    )
    import rscaffold.stages.teacher as teacher_stage

    monkeypatch.setattr(teacher_stage, "stage_code_version", common.stage_code_version)
    fps3, refs = run_upto_dataset(make_config(proxy, tiny_teacher_dir, artifacts))
    assert fps3["teacher"] != fps["teacher"] and refs["teacher"].path != cold["teacher"].path
    assert proxy.reset() == 0
    assert traces_of(refs["teacher"]) == cold_traces
    assert refs["teacher"].summary["requests"]["from_cache"] == 6

    # ... and so does a forced recomputation (`--refresh teacher`)
    monkeypatch.undo()
    _, refs = run_upto_dataset(make_config(proxy, tiny_teacher_dir, artifacts), force_teacher=True)
    assert proxy.reset() == 0 and traces_of(refs["teacher"]) == cold_traces

    # --refresh-requests sends them again
    _, refs = run_upto_dataset(
        make_config(proxy, tiny_teacher_dir, artifacts, run={"request_cache": "refresh"}), force_teacher=True
    )
    assert proxy.reset() == 6


TEACHER_ONLY = """
import json, sys
from rscaffold.config import config_from_dict
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems
from rscaffold.stages.teacher import run_teacher
cfg = config_from_dict(json.loads(sys.argv[1]))
fps = plan_fingerprints(cfg)
run_teacher(cfg, fps, run_problems(cfg, fps))
"""


def test_killed_teacher_resends_only_unanswered_requests(proxy, tiny_teacher_dir, tmp_path):
    artifacts = tmp_path / "artifacts"
    cfg = make_config(
        proxy,
        tiny_teacher_dir,
        artifacts,
        problems={"limit_train": 12},
        teacher={"sampling.max_new_tokens": 48, "llm.concurrency": 1, "shard_size": 4},
    )
    proxy.reset()
    proc = subprocess.Popen([sys.executable, "-c", TEACHER_ONLY, json.dumps(cfg.model_dump(mode="json"))])
    from rscaffold.llm.cache import DB_NAME, RequestCache

    cache = artifacts / "requests"

    def stored() -> int:
        return RequestCache(cache).count() if (cache / DB_NAME).exists() else 0

    deadline = time.monotonic() + 240
    while stored() < 3:  # some requests answered and cached
        assert proc.poll() is None, "the teacher finished before it could be killed"
        assert time.monotonic() < deadline, "no request was answered in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    answered = stored()
    sent_before = proxy.reset()
    assert 3 <= answered < 12 and sent_before >= answered

    fps = plan_fingerprints(cfg)
    ref = run_teacher(cfg, fps, run_problems(cfg, fps))
    assert proxy.reset() == 12 - answered  # only the requests that had not been answered
    assert ref.summary["requests"]["from_cache"] + ref.summary["resumed"] >= answered
    assert len(read_records(ref.output("traces"), TraceRecord)) == 12


def test_prefect_cache_key_includes_the_artifacts_root(tiny_model_dir, smollm2_dir, tmp_path):
    """Run A, then B with another artifacts dir, then A again: A's flow gets A's paths; with B
    deleted, A still runs (its outputs exist), and a cached result whose files are gone is
    recomputed instead of failing."""
    import shutil

    from prefect.testing.utilities import prefect_test_harness
    from rscaffold_flows.pipeline import rscaffold_stage

    def cfg_for(root: Path):
        return config_from_dict(
            {
                "run": {"artifacts_dir": str(root), "retries": 0, "isolate_model_stages": "never"},
                "problems": {"train": str(DATA / "problems" / "train.jsonl"), "eval": str(DATA / "problems" / "eval.jsonl"),
                             "limit_train": 4, "limit_eval": 2},
                "teacher": {"llm": {"backend": "transformers", "model": str(tiny_model_dir)},
                            "sampling": {"max_new_tokens": 8, "temperature": 1.0, "seed": 1}, "keep": "all"},
                "labeling": {"method": "keyword"},
            }
        )  # fmt: skip

    a, b = tmp_path / "A", tmp_path / "B"
    with prefect_test_harness(server_startup_timeout=120):
        refs_a = rscaffold_stage(config=cfg_for(a), stage="labeling")
        refs_b = rscaffold_stage(config=cfg_for(b), stage="labeling")
        assert refs_b["teacher"]["path"].startswith(str(b))
        refs_a2 = rscaffold_stage(config=cfg_for(a), stage="labeling")
        for stage in ("problems", "teacher"):
            assert refs_a2[stage]["path"] == refs_a[stage]["path"] and refs_a2[stage]["path"].startswith(str(a))
        shutil.rmtree(b)
        refs_a3 = rscaffold_stage(config=cfg_for(a), stage="labeling")
        assert refs_a3["teacher"]["path"] == refs_a["teacher"]["path"]
        # A's teacher output deleted: the cached Prefect result points at nothing, so it recomputes
        shutil.rmtree(Path(refs_a["teacher"]["path"]))
        refs_a4 = rscaffold_stage(config=cfg_for(a), stage="labeling")
        assert StageDir(a, "teacher", refs_a4["teacher"]["fingerprint"]).is_complete()
