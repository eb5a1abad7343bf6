"""The teacher stage (rscaffold.stages.teacher): requests and prompts, outcome policy, persistence,
resume, failure threshold, selection, progress."""

from __future__ import annotations

import re

import pytest
from helpers import ScriptedTeacherBackend

from rscaffold.config import BackendConfig, PipelineConfig, SamplingConfig, TeacherConfig
from rscaffold.dataset import select_traces
from rscaffold.llm.base import ChatRequest
from rscaffold.records import ProblemRecord, TraceRecord
from rscaffold.stages.teacher import TRACES_SHARD, TeacherFailureError, build_request, generate_traces
from rscaffold.store import StageDir


def answer_fn(text: str) -> str | None:
    m = re.findall(r"answer is\s*(-?\d+)", text)
    return m[-1] if m else None


def check_fn(pred: str | None, gold: str) -> bool:
    return pred is not None and pred.strip() == gold.strip()


def problems(k: int) -> list[ProblemRecord]:
    return [
        ProblemRecord(
            problem_id=f"q{i}", split="train", source="test", question=f"What is {i}+1?", gold_answer=str(i + 1)
        )
        for i in range(k)
    ]


def stage_dir(tmp_path) -> StageDir:
    return StageDir(tmp_path, "teacher", "fp").prepare()


def test_outcome_policy(tmp_path):
    script = {
        "q0": dict(text="The answer is 1.", finish_reason="stop", completion_tokens=5),
        "q1": dict(text="The answer is 7.", finish_reason="stop"),
        "q2": dict(text="", reasoning="so the answer is 3", finish_reason="length"),
        "q3": dict(text="   "),
        "q4": dict(error="APIConnectionError: Connection error."),
        "q5": dict(text="no number here \udcff", finish_reason="stop"),
        "q6": dict(text="The answer is 7", extra={"unclosed_think": True}),
    }
    backend = ScriptedTeacherBackend(lambda pid, i: script[pid])
    cfg = TeacherConfig(max_failure_rate=1.0, shard_size=3)
    res = generate_traces(problems(7), backend, cfg, stage=stage_dir(tmp_path), answer_fn=answer_fn, check_fn=check_fn)
    t = {r.problem_id: r for r in res.traces}
    assert [r.trace_id for r in res.traces] == [f"q{i}#0" for i in range(7)]
    assert (
        t["q0"].correct
        and t["q0"].predicted_answer == "1"
        and t["q0"].status == "ok"
        and t["q0"].completion_tokens == 5
    )
    assert t["q0"].backend == "scripted" and t["q0"].model == "scripted-model" and t["q0"].gold_answer == "1"
    assert t["q1"].correct is False and t["q1"].predicted_answer == "7"
    assert t["q2"].predicted_answer == "3" and t["q2"].correct and t["q2"].truncated  # answer from the reasoning
    assert t["q3"].status == "failed" and t["q3"].error == "empty output"
    assert t["q4"].status == "failed" and "Connection" in t["q4"].error and t["q4"].correct is None
    assert t["q5"].status == "ok" and t["q5"].predicted_answer is None and t["q5"].correct is False
    assert "\ufffd" in t["q5"].text or "?" in t["q5"].text  # stored as valid UTF-8
    assert t["q6"].truncated and t["q6"].correct  # truncated is recorded, not judged
    assert res.counts == {"total": 7, "requested": 7, "resumed": 0, "ok": 5, "failed": 2, "truncated": 2, "correct": 3}
    assert res.failure_reasons == {"empty output": 1, "APIConnectionError: Connection error.": 1}
    # persisted in shards of 3 (3 + 3 + 1), named by the range of work they hold
    shards = sorted((tmp_path / "teacher" / "fp.partial" / "shards").glob(f"{TRACES_SHARD}-*.parquet"))
    assert [p.name for p in shards] == [
        f"{TRACES_SHARD}-{a}.parquet" for a in ("000000-000002", "000003-000005", "000006-000006")
    ]
    assert len(stage_dir(tmp_path).read_shards(TRACES_SHARD, TraceRecord)) == 7


def test_request_building():
    """One request per (problem, sample), its seed derived from (run seed, problem id, sample)."""
    from rscaffold.llm.parsing import derive_seed

    cfg = TeacherConfig(system_prompt="SYS", prompt_template="Q: {question}\nA:", samples_per_problem=3)
    r = build_request(problems(1)[0], cfg, 2)
    assert r.request_id == "q0#2" and r.n == 1 and r.seed == derive_seed(cfg.sampling.seed, "q0", 2)
    assert build_request(problems(1)[0], cfg, 1).seed != r.seed
    assert r.messages == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q: What is 0+1?\nA:"}]
    assert build_request(problems(1)[0], cfg.model_copy(update={"system_prompt": ""})).messages[0]["role"] == "user"


def test_teacher_prompt_defaults_to_the_benchmark_family():
    from rscaffold.records import ProblemRecord
    from rscaffold.stages.teacher import build_request, teacher_prompt_config

    p = ProblemRecord(problem_id="x", split="train", source="s", question="Is water wet?", gold_answer="yes")
    yesno = teacher_prompt_config(PipelineConfig.model_validate({"problems": {"format": "strategyqa"}}))
    user = build_request(p, yesno).messages[-1]["content"]
    assert user.startswith("Is water wet?") and "'The answer is yes.' or 'The answer is no.'" in user
    math = teacher_prompt_config(PipelineConfig())
    assert "'The answer is' followed by the final number" in build_request(p, math).messages[-1]["content"]
    own = teacher_prompt_config(PipelineConfig.model_validate({"teacher": {"prompt_template": "Q: {question}"}}))
    assert build_request(p, own).messages[-1]["content"] == "Q: Is water wet?"


def test_failed_pairs_are_retried_and_answer_fn_errors_fail(tmp_path):
    stage = stage_dir(tmp_path)
    cfg = TeacherConfig(samples_per_problem=2, max_failure_rate=1.0, shard_size=2)
    first = ScriptedTeacherBackend(
        lambda pid, i: dict(error="HTTP 503") if (pid, i) in {("q1", 1), ("q2", 0)} else dict(text="The answer is 2")
    )
    r1 = generate_traces(problems(3), first, cfg, stage=stage, answer_fn=answer_fn, check_fn=check_fn)
    assert r1.counts["failed"] == 2
    second = ScriptedTeacherBackend(lambda pid, i: dict(text="The answer is 9"))
    r2 = generate_traces(problems(3), second, cfg, stage=stage, answer_fn=answer_fn, check_fn=check_fn)
    # only the failed pairs are asked for, one sample each
    assert sorted((r.request_id, r.n) for r in second.requests) == [("q1#1", 1), ("q2#0", 1)]
    t = {r.trace_id: r for r in r2.traces}
    assert t["q1#1"].predicted_answer == "9" and t["q2#0"].predicted_answer == "9" and t["q1#0"].predicted_answer == "2"
    assert (
        r2.counts["resumed"] == 4 and r2.counts["requested"] == 2 and r2.counts["failed"] == 0 and len(r2.traces) == 6
    )

    def broken_answer_fn(text):
        raise TypeError("bad regex")

    r3 = generate_traces(
        problems(1),
        ScriptedTeacherBackend(lambda pid, i: dict(text="x")),
        cfg,
        stage=stage_dir(tmp_path / "b"),
        answer_fn=broken_answer_fn,
        check_fn=check_fn,
    )
    assert r3.counts["failed"] == 2 and r3.traces[0].error == "answer check: TypeError: bad regex"


def test_failure_threshold_raises_after_persisting(tmp_path):
    stage = stage_dir(tmp_path)
    backend = ScriptedTeacherBackend(
        lambda pid, i: dict(text="The answer is 1") if pid == "q0" else dict(error="RateLimitError: slow down")
    )
    cfg = TeacherConfig(max_failure_rate=0.5, shard_size=4)
    with pytest.raises(
        TeacherFailureError, match=r"4 of 5 .*most common error \(4x\): RateLimitError: slow down"
    ) as info:
        generate_traces(problems(5), backend, cfg, stage=stage, answer_fn=answer_fn, check_fn=check_fn)
    assert info.value.result.counts["failed"] == 4
    persisted = stage.read_shards(TRACES_SHARD, TraceRecord)
    assert sorted(t.trace_id for t in persisted) == [f"q{i}#0" for i in range(5)]
    # exactly at the threshold: no error
    ok = generate_traces(
        problems(2),
        ScriptedTeacherBackend(lambda pid, i: dict(error="x") if pid == "q0" else dict(text="a")),
        cfg,
        stage=stage_dir(tmp_path / "c"),
        answer_fn=answer_fn,
        check_fn=check_fn,
    )
    assert ok.failure_rate == 0.5


def test_select_traces():
    def tr(i, status="ok", pred="1", correct=True):
        return TraceRecord(
            trace_id=f"q{i}#0",
            problem_id=f"q{i}",
            sample_index=0,
            question="q",
            gold_answer="1",
            text="t",
            status=status,
            predicted_answer=pred,
            correct=correct,
        )

    traces = [
        tr(0),
        tr(1, correct=False, pred="2"),
        tr(2, pred=None, correct=False),
        tr(3, status="failed", pred=None, correct=None),
        tr(4),
    ]
    kept, dropped = select_traces(traces, "correct")
    assert [t.trace_id for t in kept] == ["q0#0", "q4#0"] and dropped == {"incorrect": 1, "no_answer": 1, "failed": 1}
    kept, dropped = select_traces(traces, "all")
    assert [t.trace_id for t in kept] == ["q0#0", "q1#0", "q2#0", "q4#0"] and dropped == {"failed": 1}
    with pytest.raises(ValueError):
        select_traces(traces, "best")


# ---------------------------------------------------------------------------------------------
# resume with the real transformers backend on a tiny model


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    from rscaffold.llm.transformers_local import TransformersBackend

    b = TransformersBackend(BackendConfig(model=str(tiny_model_dir), device="cpu", batch_size=2))
    yield b
    b.close()


class CrashAfter:
    """Test fake wrapping a real backend: counts the requests it forwards and raises (as a crash
    of the process would end the run) after ``crash_after`` completions have been delivered."""

    def __init__(self, inner, crash_after: int | None = None):
        self.inner = inner
        self.name, self.model_id, self.capabilities = inner.name, inner.model_id, inner.capabilities
        self.crash_after = crash_after
        self.delivered = 0  # over all calls (the stage calls once per shard)
        self.requests: list[ChatRequest] = []

    def generate(self, requests, sampling, on_result=None):
        self.requests.extend(requests)

        def relay(c):
            on_result(c)
            self.delivered += 1
            if self.crash_after is not None and self.delivered >= self.crash_after:
                raise RuntimeError("simulated crash")

        return self.inner.generate(requests, sampling, on_result=relay)

    def close(self):
        pass


def test_resume_after_crash(tmp_path, tiny_backend):
    stage = stage_dir(tmp_path)
    cfg = TeacherConfig(
        samples_per_problem=2,
        shard_size=3,
        max_failure_rate=1.0,
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, seed=1),
    )
    probs = problems(5)
    wanted = {f"q{i}#{s}" for i in range(5) for s in range(2)}

    crashing = CrashAfter(tiny_backend, crash_after=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_traces(probs, crashing, cfg, stage=stage, answer_fn=answer_fn, check_fn=check_fn)
    first = stage.read_shards(TRACES_SHARD, TraceRecord)
    assert len(first) == 5  # 3 in a full shard + 2 of the next one, flushed by the finally
    done = {t.trace_id for t in first if t.status == "ok"}
    assert len(done) == 5  # random tokens sampled at temperature 1 are never empty

    progress = []
    again = CrashAfter(tiny_backend)
    res = generate_traces(
        probs,
        again,
        cfg,
        stage=stage,
        answer_fn=answer_fn,
        check_fn=check_fn,
        progress=lambda d, t: progress.append((d, t)),
    )
    # no finished pair is asked for again (a partly done problem asks only for its missing sample)
    assert {r.request_id for r in again.requests} == wanted - done and all(r.n == 1 for r in again.requests)
    assert (
        res.counts["resumed"] == len(done) and res.counts["requested"] == 10 - len(done) and res.counts["total"] == 10
    )
    assert {t.trace_id for t in res.traces} == wanted and len(res.traces) == 10
    assert progress[0] == (len(done), 10) and progress[-1] == (10, 10)
    # nothing lost; on disk each pair is there once (a shard holds the traces of its range)
    on_disk = stage.read_shards(TRACES_SHARD, TraceRecord)
    assert sorted(t.trace_id for t in on_disk) == sorted(wanted)
    assert all(t.backend == "transformers" for t in on_disk)

    # a third run has nothing to do
    idle = CrashAfter(tiny_backend)
    res3 = generate_traces(probs, idle, cfg, stage=stage, answer_fn=answer_fn, check_fn=check_fn)
    assert {t.trace_id for t in res3.traces} == wanted
    assert idle.requests == [] and res3.counts["requested"] == 0 and res3.counts["resumed"] == 10


# ---------------------------------------------------------------------------------------------
# progress: the callback (Prefect progress artifact) and the console bar


class RecordingBar:
    """Test fake of ``tqdm``: records its arguments, updates and whether it was closed."""

    instances: list[RecordingBar] = []

    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
        self.n = kwargs.get("initial", 0)
        self.closed = False
        RecordingBar.instances.append(self)

    def update(self, k=1):
        assert not self.closed
        self.n += k

    def close(self):
        self.closed = True


def test_progress_callback_and_bar_count_resumed_work(tmp_path, monkeypatch):
    import rscaffold.stages.teacher as traces_mod

    RecordingBar.instances = []
    monkeypatch.setattr(traces_mod, "tqdm", RecordingBar)
    stage = stage_dir(tmp_path)
    cfg = TeacherConfig(samples_per_problem=2, max_failure_rate=1.0, shard_size=2)
    probs = problems(4)  # 8 (problem, sample) pairs
    fail = {("q1", 1), ("q3", 0), ("q3", 1)}
    first = ScriptedTeacherBackend(
        lambda pid, i: dict(error="boom") if (pid, i) in fail else dict(text="The answer is 1.", finish_reason="stop")
    )
    seen: list[tuple[int, int]] = []
    res = generate_traces(
        probs,
        first,
        cfg,
        stage=stage,
        answer_fn=answer_fn,
        check_fn=check_fn,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert res.counts["ok"] == 5 and res.counts["failed"] == 3
    assert seen == [(k, 8) for k in range(9)]  # failures count as done work in this run
    bar = RecordingBar.instances[-1]
    assert bar.kwargs["total"] == 8 and bar.kwargs["initial"] == 0 and bar.kwargs["disable"] is None
    assert bar.n == 8 and bar.closed

    # a re-run resumes the 5 ok traces and retries only the 3 failed pairs
    seen.clear()
    ok_now = ScriptedTeacherBackend(lambda pid, i: dict(text="The answer is 1.", finish_reason="stop"))
    res = generate_traces(
        probs,
        ok_now,
        cfg,
        stage=stage,
        answer_fn=answer_fn,
        check_fn=check_fn,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert res.counts["resumed"] == 5 and res.counts["requested"] == 3 and res.counts["ok"] == 8
    assert seen == [(5, 8), (6, 8), (7, 8), (8, 8)]
    bar = RecordingBar.instances[-1]
    assert bar.kwargs["total"] == 8 and bar.kwargs["initial"] == 5 and bar.n == 8 and bar.closed

    # everything done: one call at (total, total), no request, the bar still closed
    seen.clear()
    idle = ScriptedTeacherBackend(lambda pid, i: pytest.fail("nothing should be requested"))
    res = generate_traces(
        probs, idle, cfg, stage=stage, answer_fn=answer_fn, check_fn=check_fn, progress=lambda d, t: seen.append((d, t))
    )
    assert idle.requests == [] and res.counts["requested"] == 0 and res.counts["resumed"] == 8
    assert seen == [(8, 8)]
    bar = RecordingBar.instances[-1]
    assert bar.kwargs["initial"] == 8 and bar.n == 8 and bar.closed
    assert len(RecordingBar.instances) == 3


def test_progress_bar_closed_when_the_backend_crashes(tmp_path, monkeypatch):
    import rscaffold.stages.teacher as traces_mod

    RecordingBar.instances = []
    monkeypatch.setattr(traces_mod, "tqdm", RecordingBar)

    def script(pid, i):
        if pid == "q2":
            raise RuntimeError("backend died")
        return dict(text="The answer is 1.", finish_reason="stop")

    with pytest.raises(RuntimeError, match="backend died"):
        generate_traces(
            problems(3),
            ScriptedTeacherBackend(script),
            TeacherConfig(),
            stage=stage_dir(tmp_path),
            answer_fn=answer_fn,
            check_fn=check_fn,
        )
    bar = RecordingBar.instances[-1]
    assert bar.n == 2 and bar.closed
    assert len(stage_dir(tmp_path).read_shards(TRACES_SHARD, TraceRecord)) == 2  # still flushed


def test_a_shard_task_reads_only_the_shards_over_its_own_items(tmp_path, monkeypatch):
    import rscaffold.store as store

    sd = stage_dir(tmp_path)
    backend = ScriptedTeacherBackend(lambda pid, i: dict(text=f"The answer is {pid[1:]}.", finish_reason="stop"))
    args = dict(stage=sd, answer_fn=answer_fn, check_fn=check_fn)
    generate_traces(problems(6), backend, TeacherConfig(shard_size=2), **args)  # shards 0-1, 2-3, 4-5
    read: list[str] = []
    real = store.read_records
    monkeypatch.setattr(store, "read_records", lambda path, *a, **k: read.append(path.name) or real(path, *a, **k))

    res = generate_traces(problems(6), backend, TeacherConfig(shard_size=2), only={"000002-000003"}, **args)
    assert read == ["traces-000002-000003.parquet"] and res.counts["requested"] == 0
    read.clear()  # shards of an earlier size are read where they overlap the task's items
    res = generate_traces(problems(6), backend, TeacherConfig(shard_size=4), only={"000000-000003"}, **args)
    assert read == ["traces-000000-000001.parquet", "traces-000002-000003.parquet"]
    assert res.counts["requested"] == 0 and len(backend.requests) == 6
