"""A stage that loads a model runs in a spawned child process (rscaffold_tasks._child): its memory
goes with the child; logs, progress and errors come back to the task."""

from __future__ import annotations

import logging
import os

import psutil
import pytest
from rscaffold_tasks._child import StageProcessError, needs_isolation, run_in_child

from rscaffold.config import config_from_dict
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import run_problems

pytestmark = pytest.mark.slow


def teacher_config(model_dir, artifacts, **teacher):
    from helpers import REPO

    data = REPO / "data" / "problems"
    return config_from_dict(
        {
            "run": {"artifacts_dir": str(artifacts), "request_cache": "off"},
            "problems": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "limit_train": 2},
            "teacher": {
                "llm": {"model": str(model_dir), "device": "cpu"},
                "sampling": {"max_new_tokens": 4},
                **teacher,
            },
        }
    )


def rss_mb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


class PeakRSS:
    """The most this process's resident memory grew while the block ran (sampled every 20 ms)."""

    def __enter__(self):
        import threading

        self.start, self.peak, self._stop = rss_mb(), rss_mb(), threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.grew = max(self.peak, rss_mb()) - self.start


def test_isolation_policy():
    cfg = config_from_dict({})
    assert needs_isolation("teacher", cfg) and needs_isolation("training", cfg) and needs_isolation("evaluation", cfg)
    assert not needs_isolation("problems", cfg) and not needs_isolation("dataset", cfg)
    served = config_from_dict({"teacher": {"llm": {"backend": "openai", "model": "m", "base_url": "http://x/v1"}}})
    assert not needs_isolation("teacher", served) and not needs_isolation("labeling", served)
    assert not needs_isolation("training", config_from_dict({"run": {"isolate_model_stages": "never"}}))


def test_the_model_leaves_with_the_child_and_its_logs_and_progress_come_back(smollm2_dir, tmp_path, caplog):
    """SmolLM2-135M in fp32 takes about 540 MB: run in a child, the parent never holds it; run
    here, the parent's memory peaks with it (the same call, for comparison)."""
    cfg = teacher_config(smollm2_dir, tmp_path / "a")
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    seen: list[tuple[int, int]] = []
    with caplog.at_level(logging.INFO, logger="rscaffold"), PeakRSS() as isolated:
        ref = run_in_child(
            "rscaffold.stages.teacher:run_teacher",
            {"cfg": cfg, "fps": fps, "problems": problems},
            progress=lambda d, t: seen.append((d, t)),
        )
    grew_isolated = isolated.grew
    assert ref.summary["total"] == 2 and ref.summary["ok"] + ref.summary["failed"] == 2
    assert seen and seen[-1] == (2, 2)  # progress came back
    assert any(r.name.startswith("rscaffold.") for r in caplog.records)  # the child's logs too
    assert grew_isolated < 150, f"the parent grew by {grew_isolated:.0f} MB"

    from rscaffold.stages.teacher import run_teacher

    cfg_b = teacher_config(smollm2_dir, tmp_path / "b")
    fps_b = plan_fingerprints(cfg_b)
    problems_b = run_problems(cfg_b, fps_b)
    with PeakRSS() as inline:
        run_teacher(cfg_b, fps_b, problems_b)  # in this process, for comparison
    assert inline.grew > grew_isolated + 300, (inline.grew, grew_isolated)


def test_the_childs_error_fails_the_task_as_itself(tiny_model_dir, tmp_path):
    from rscaffold.models import ModelPreparationError

    cfg = teacher_config(tiny_model_dir, tmp_path)
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    cfg.teacher.llm.model = str(tmp_path / "no-such-model")
    with pytest.raises(ModelPreparationError, match="cannot load model") as info:
        run_in_child("rscaffold.stages.teacher:run_teacher", {"cfg": cfg, "fps": fps, "problems": problems})
    assert isinstance(info.value.__cause__, StageProcessError)
    assert "in the stage's process" in str(info.value.__cause__) and "Traceback" in str(info.value.__cause__)


def test_a_child_that_dies_is_an_error(tmp_path):
    with pytest.raises(StageProcessError, match="exited with code"):
        run_in_child("os:_exit", {"status": 3})
