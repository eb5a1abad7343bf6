"""The evaluation stage with a student behind a real OpenAI-compatible server (``transformers
serve``, started by the stage from ``evaluation.server.command``): the same answers as in-process
decoding under greedy decoding, and a server that dies mid-evaluation loses no finished shard."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers import SERVE_ENV, TRANSFORMERS_SERVE, serve_available

from rscaffold.config import config_from_dict


def _config(tmp_path: Path, bench: Path, served: bool):
    evaluation = {
        "models": ["base"],
        "benchmarks": [{"name": "gsm8k", "source": str(bench), "limit": 3}],
        "max_new_tokens": 12,
        "batch_size": 1,
        "shard_size": 1,
        "bootstrap_samples": 0,
    }
    if served:
        evaluation["server"] = {"command": TRANSFORMERS_SERVE, "env": SERVE_ENV}
        # no retries: a dead server fails at once
        evaluation["llm"] = {"backend": "openai", "model": "{model_dir}", "base_url": "http://x/v1", "max_retries": 0}
    return config_from_dict({"run": {"artifacts_dir": str(tmp_path / "artifacts")}, "evaluation": evaluation})


def test_served_student_answers_as_in_process_and_survives_a_dying_server(
    tiny_teacher_dir, benchmarks_dir, tmp_path, monkeypatch
):
    import polars as pl

    import rscaffold.serving as serving
    from rscaffold.decoding.served import ServedDecodingError
    from rscaffold.stages.evaluation import run_evaluation
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.problems import run_problems
    from rscaffold.store import StageRef

    why = serve_available()
    if why:
        pytest.skip(why)
    bench = tmp_path / "bench" / "gsm8k"
    bench.mkdir(parents=True)
    lines = (benchmarks_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    (bench / "test.jsonl").write_text("\n".join(lines) + "\n")
    training_dir = tmp_path / "training"
    shutil.copytree(tiny_teacher_dir, training_dir / "base")  # greedy text that is not degenerate
    training = StageRef("training", "t" * 16, str(training_dir), {"base": "base"})

    local_cfg = _config(tmp_path, bench.parent, served=False)
    fps = plan_fingerprints(local_cfg)
    problems = run_problems(local_cfg, fps)
    local = run_evaluation(local_cfg, fps, problems=problems, training=training)

    served_cfg = _config(tmp_path, bench.parent, served=True)
    sfps = plan_fingerprints(served_cfg)
    assert sfps["evaluation"] != fps["evaluation"]  # a different engine is a different result
    servers: list[serving.StudentServer] = []
    start = serving.StudentServer.start

    def recording_start(self):
        servers.append(self)
        return start(self)

    monkeypatch.setattr(serving.StudentServer, "start", recording_start)

    def kill_after_first_shard(done: int, total: int) -> None:
        if done == 1:  # the server dies (its whole process group: the supervisor and the server)
            os.killpg(servers[-1].proc.pid, signal.SIGKILL)
            servers[-1].proc.wait()

    with pytest.raises(ServedDecodingError, match="re-run to resume"):
        run_evaluation(served_cfg, sfps, problems=problems, training=training, progress=kill_after_first_shard)
    shard_dir = Path(served_cfg.run.artifacts_dir)
    first = [p for p in shard_dir.rglob("predictions-base-gsm8k-000000-000000.parquet") if sfps["evaluation"] in str(p)]
    assert len(first) == 1 and len(list(first[0].parent.glob("predictions-*.parquet"))) == 1
    before = first[0].stat().st_mtime_ns
    assert servers[-1].proc is None  # stopped (and reaped) when the stage failed

    served = run_evaluation(served_cfg, sfps, problems=problems, training=training)
    kept = Path(served.path) / "shards" / first[0].name  # the stage directory, renamed when finished
    assert kept.stat().st_mtime_ns == before  # the finished shard was kept, not answered again
    assert len(servers) == 2 and servers[-1].proc is None
    a = pl.read_parquet(Path(local.path) / "predictions.parquet")
    b = pl.read_parquet(Path(served.path) / "predictions.parquet")
    assert a["output"].to_list() == b["output"].to_list()
    assert any(o.strip() for o in a["output"].to_list())
    assert a["correct"].to_list() == b["correct"].to_list()
    assert served.summary["decoding"]["base"]["backend"] == "openai"
    assert (Path(served.path) / "server-base.log").exists()

    # every request is in the request cache now: a forced re-run answers from it, starting no server
    again = run_evaluation(served_cfg, sfps, problems=problems, training=training, force=True, fresh=True)
    assert len(servers) == 2
    assert pl.read_parquet(Path(again.path) / "predictions.parquet")["output"].to_list() == b["output"].to_list()


def test_served_scaffolded_student_decodes_guided_through_the_server(random_student, benchmarks_dir, tmp_path):
    """The stage's guided path through a server that runs (evaluation.llm.base_url): here the
    TEST-ONLY fake of vLLM's completions dialect (tests/serving_fake.py), vLLM not running here."""
    import json

    import polars as pl
    from helpers import RANDOM_STUDENT_SIGNALS, RANDOM_STUDENT_TOKENS
    from serving_fake import fake_vllm_server

    from rscaffold.stages.evaluation import run_evaluation
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.problems import run_problems
    from rscaffold.store import StageRef

    bench = tmp_path / "bench" / "gsm8k"
    bench.mkdir(parents=True)
    lines = (benchmarks_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]
    (bench / "test.jsonl").write_text("\n".join(lines) + "\n")
    d = tmp_path / "training" / "scaffolded"
    random_student.model.save_pretrained(d)
    random_student.tokenizer.save_pretrained(d)
    meta = {
        "scaffolded": True,
        "signal_objective": "token",
        "signal_names": RANDOM_STUDENT_SIGNALS,
        "signal_tokens": RANDOM_STUDENT_TOKENS,
        "signal_token_ids": random_student.signal_token_ids,
        "system_prompt": random_student.system_prompt,
    }
    (d / "rscaffold_student.json").write_text(json.dumps(meta))
    training = StageRef("training", "t" * 16, str(d.parent), {"scaffolded": "scaffolded"})
    with fake_vllm_server(random_student.model, random_student.tokenizer) as server:
        cfg = config_from_dict(
            {
                "run": {"artifacts_dir": str(tmp_path / "artifacts")},
                "training": {"students": ["scaffolded"]},
                "evaluation": {
                    "models": ["scaffolded"],
                    "benchmarks": [{"name": "gsm8k", "source": str(bench.parent), "limit": 2}],
                    "max_new_tokens": 24,
                    "bootstrap_samples": 0,
                    "llm": {"backend": "openai", "model": "{student}", "base_url": server.base_url, "max_retries": 0},
                },
            }
        )
        fps = plan_fingerprints(cfg)
        ref = run_evaluation(cfg, fps, problems=run_problems(cfg, fps), training=training)
        assert server.requests > 4  # signal and step requests, not one request per question
        assert {b["model"] for b in server.bodies} == {"scaffolded"}
    preds = pl.read_parquet(Path(ref.path) / "predictions.parquet")
    assert preds.height == 2 and set(preds["decoding"]) == {"guided"}
    assert ref.summary["decoding"]["scaffolded"]["backend"] == "openai"
    assert sum(len(s) for s in preds["signals"].to_list()) > 0
