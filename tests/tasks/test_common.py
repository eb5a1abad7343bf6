"""What the stage tasks show in the console and the Prefect UI: progress with unit, rate and time
left; reports with their pictures inlined; run names that tell two runs apart."""

from __future__ import annotations

import base64

from rscaffold_tasks._common import embed_images, progress_line

from rscaffold.config import PipelineConfig


def test_progress_names_the_unit_the_rate_and_the_time_left():
    assert progress_line("teacher", 0, 6, unit="traces", first=0, elapsed=0.0) == "teacher: 0/6 traces (0%)"
    line = progress_line("teacher", 3, 6, unit="traces", first=1, elapsed=4.0)  # 2 made in 4 s
    assert line == "teacher: 3/6 traces (50%), 0.50 traces/s, about 6 s left"
    done = progress_line("labeling", 10, 10, unit="shards", first=0, elapsed=125.0)
    assert done == "labeling: 10/10 shards (100%), 0.08 shards/s, in 2 min 05 s"


def test_report_pictures_are_inlined(tmp_path):
    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "accuracy.png").write_bytes(png)
    text = "# Report\n\n![accuracy per model](accuracy.png)\n\n![gone](missing.png)\n"
    out = embed_images(text, tmp_path)
    assert f"![accuracy per model](data:image/png;base64,{base64.b64encode(png).decode()})" in out
    assert "![gone](missing.png)" in out  # a missing file keeps its link


def test_flow_run_names_tell_runs_apart(monkeypatch, tmp_path):
    from prefect.runtime import flow_run
    from rscaffold_flows.pipeline import _pipeline_run_name, _stage_run_name

    from rscaffold.stages.plan import plan_fingerprints

    cfg = PipelineConfig.model_validate({"run": {"artifacts_dir": str(tmp_path)}})
    other = PipelineConfig.model_validate({"run": {"artifacts_dir": str(tmp_path)}, "training": {"max_steps": 7}})
    monkeypatch.setattr(flow_run, "parameters", {"config": cfg})
    name = _pipeline_run_name()
    fp = plan_fingerprints(cfg)["evaluation"][:8]
    assert name.startswith(f"rscaffold-{cfg.problems.format}-{fp}-20")
    monkeypatch.setattr(flow_run, "parameters", {"config": other})
    assert _pipeline_run_name().split("-")[2] != fp  # another config, another name
    monkeypatch.setattr(flow_run, "parameters", {"config": cfg.model_dump(mode="json"), "stage": "teacher"})
    assert _stage_run_name().startswith(
        f"rscaffold-stage-teacher-{cfg.problems.format}-{plan_fingerprints(cfg)['teacher'][:8]}-"
    )
