import pyarrow.parquet as pq

from rscaffold.config import PipelineConfig
from rscaffold.records import ExampleRecord, Step, TraceRecord, arrow_schema
from rscaffold.store import StageDir, fingerprint, read_records, write_records


def test_fingerprint_is_stable_and_sensitive():
    a = PipelineConfig()
    b = PipelineConfig()
    assert fingerprint(a.teacher, "x") == fingerprint(b.teacher, "x")
    b.teacher.sampling.max_new_tokens += 1
    assert fingerprint(a.teacher, "x") != fingerprint(b.teacher, "x")
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def _example(i: int) -> ExampleRecord:
    steps = [Step(index=0, signal="Reasoning and Analysis", text="2 + 2 = 4", source="llm")]
    return ExampleRecord(
        trace_id=f"t{i}",
        problem_id=f"p{i}",
        split="train",
        question="q",
        gold_answer="4",
        teacher_answer=None,
        correct=None,
        steps=steps,
        signals=["Reasoning and Analysis"],
        n_steps=1,
    )


def test_parquet_round_trip_with_nested_schema(tmp_path):
    path = write_records(tmp_path / "x.parquet", [_example(0), _example(1)], ExampleRecord)
    table = pq.read_table(path)
    assert table.schema.equals(arrow_schema(ExampleRecord), check_metadata=False)
    assert table.schema.metadata[b"rscaffold.record"] == b"ExampleRecord"
    back = read_records(path, ExampleRecord)
    assert back == [_example(0), _example(1)]


def test_empty_table_keeps_schema(tmp_path):
    path = write_records(tmp_path / "e.parquet", [], TraceRecord)
    assert pq.read_table(path).num_rows == 0
    assert read_records(path, TraceRecord) == []


def test_stage_dir_completion_and_shards(tmp_path):
    sd = StageDir(tmp_path, "dataset", "abc").prepare()
    assert not sd.is_complete()
    sd.write_shard("examples", [_example(1)], ExampleRecord, key="000001-000001")
    sd.write_shard("examples", [_example(0)], ExampleRecord, key="000000-000000")
    assert [e.trace_id for e in sd.read_shards("examples", ExampleRecord)] == ["t0", "t1"]  # in key order
    assert sd.shard_keys("examples") == ["000000-000000", "000001-000001"]
    write_records(sd.work / "x.parquet", [_example(0)], ExampleRecord)
    ref = sd.finish(
        outputs={"x": "x.parquet"},
        config=PipelineConfig().dataset,
        inputs={"labeling": "f"},
        summary={"rows": 2},
        started=0.0,
        code="v1",
    )
    assert sd.is_complete() and ref.summary == {"rows": 2} and not sd.work.exists()  # published by a rename
    manifest = sd.read_manifest()
    assert manifest["inputs"] == {"labeling": "f"} and manifest["schema_version"] == 1
    assert set(manifest["files"]) == {"x.parquet"} and len(manifest["files"]["x.parquet"]["sha256"]) == 64
    assert sd.ref().outputs == {"x": "x.parquet"} and sd.verify() == []
    assert (tmp_path / "dataset" / "LATEST").read_text() == "abc\n"  # the stage's newest output
    # a fresh start discards partial work, never a complete output
    sd.prepare()
    sd.write_shard("examples", [_example(2)], ExampleRecord, key="000002-000002")
    sd.prepare(fresh=True)
    assert sd.read_shards("examples", ExampleRecord) == [] and sd.is_complete()
