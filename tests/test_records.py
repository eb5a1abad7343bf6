"""The artifacts (rscaffold.records) as a downstream reader sees them: plain pyarrow/polars, no
rscaffold import.

A fixture runs the six stages of a tiny pipeline (the library stage functions, exactly what the
Prefect tasks call, without the orchestration); the files are then read in a separate Python
process that imports only pyarrow and polars, and compared with the table of the README section
"Artifacts" (file names, record names, columns, nested step fields, the documented `source`
values, and the `rscaffold.record`/`rscaffold.schema_version` metadata).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import REPO, make_config, run_upstream_stages

from rscaffold.vocabulary import STAGES

pytestmark = pytest.mark.slow

README = REPO / "README.md"

# Top-level Parquet files that are partial work rather than documented outputs (docs/faults.md, "Caching,
# re-runs and failures": evaluation predictions are persisted per model).
PARTIAL_WORK = {"evaluation": re.compile(r"predictions-[a-z_-]+-\d{6}-\d{6}\.parquet")}

# Runs in a fresh interpreter (-I: no cwd, no PYTHONPATH) and must not import rscaffold.
READER = r"""
import json, sys
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq
import polars as pl

root = Path(sys.argv[1])
out = {}
for f in sorted(root.glob("*/*/*.parquet")):
    table = pq.read_table(f)
    frame = pl.read_parquet(f)
    fields = []
    for fld in table.schema:
        t = fld.type
        struct_fields = None
        if pa.types.is_list(t) and pa.types.is_struct(t.value_type):
            struct_fields = [t.value_type.field(i).name for i in range(t.value_type.num_fields)]
        fields.append({"name": fld.name, "type": str(t), "struct_fields": struct_fields})
    distinct = {}
    for c in frame.columns:
        if frame.schema[c] == pl.Utf8:
            values = frame[c].drop_nulls().unique().to_list()
            if len(values) <= 8:
                distinct[c] = sorted(values)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"rscaffold.")}
    out[f.relative_to(root).as_posix()] = {
        "rows": table.num_rows,
        "fields": fields,
        "metadata": meta,
        "polars_columns": frame.columns,
        "polars_height": frame.height,
        "distinct": distinct,
    }
leaked = sorted(m for m in sys.modules if m == "rscaffold" or m.startswith("rscaffold."))
assert not leaked, f"the reader imported {leaked}"
print(json.dumps(out))
"""


def _readme_artifacts() -> dict[str, dict]:
    """The README's "Artifacts" table: per stage, the files, row types and documented columns.

    A row-type cell is `` `Record`: col, col, ... `` (several records: separated by ``;``); a
    record named without ``: columns`` has its columns unchecked (a warning says so).
    """
    text = README.read_text()
    m = re.search(r"^## Artifacts.*?$(.*?)^## ", text, re.M | re.S)
    assert m, "README has no '## Artifacts' section"
    rows = [line for line in m.group(1).splitlines() if line.startswith("|")]
    out: dict[str, dict] = {}
    for line in rows[2:]:  # header, separator
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        stage, files_cell, type_cell = cells[0], cells[1], cells[2]
        files = [f for f in re.findall(r"`([^`]+)`", files_cell) if "." in f or f.endswith("/")]
        found = re.findall(r"`([A-Za-z]+Record)`(?:\s*:([^;]*))?", type_cell)
        records = [name for name, _ in found]
        columns = {name: _parse_columns(cols) if cols.strip() else None for name, cols in found}
        out[stage] = {"files": files, "records": records, "columns": columns}
    return out


def _parse_columns(spec: str) -> list[tuple[str, list[str] | None, list[str] | None]]:
    """`a, b (x/y), steps (list of {i, j})` -> [(name, nested struct fields, documented values)]."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        if ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for item in items:
        item = item.strip()
        name = re.match(r"[a-z_][a-z0-9_]*", item).group(0)
        nested = re.search(r"\{([^}]*)\}", item)
        values = re.search(r"\((`[^)]*`)\)", item)
        out.append(
            (
                name,
                [s.strip() for s in nested.group(1).split(",")] if nested else None,
                re.findall(r"`([^`]+)`", values.group(1)) if values else None,
            )
        )
    return out


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, smollm2_dir, tmp_path_factory) -> Path:
    """A finished tiny run of all six stages; returns the artifacts root."""
    from rscaffold.stages.evaluation import run_evaluation
    from rscaffold.stages.plan import plan_fingerprints
    from rscaffold.stages.training import run_training

    root = tmp_path_factory.mktemp("artifact-schemas") / "artifacts"
    cfg = make_config(tiny_model_dir, smollm2_dir, root, max_steps=1)
    # Smaller than the end-to-end run where it does not change what is written: keyword labels,
    # one training step, two evaluation problems.
    cfg.labeling.method = "keyword"
    cfg.evaluation.limit = 2
    fps = plan_fingerprints(cfg)
    refs = run_upstream_stages(cfg, fps)
    training = run_training(cfg, fps, refs["dataset"])
    run_evaluation(cfg, fps, problems=refs["problems"], training=training)
    for stage in STAGES:
        assert (root / stage / fps[stage] / "manifest.json").exists(), stage
    return root


@pytest.fixture(scope="module")
def read_back(finished_run, tmp_path_factory) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", READER, str(finished_run)],
        cwd=tmp_path_factory.mktemp("reader"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_readme_table_parses():
    table = _readme_artifacts()
    assert list(table) == list(STAGES)
    assert table["labeling"]["columns"]["LabeledStepRecord"] and table["dataset"]["records"] == ["ExampleRecord"]


def test_every_documented_file_exists(finished_run):
    table = _readme_artifacts()
    for stage, spec in table.items():
        (stage_dir,) = [d for d in (finished_run / stage).iterdir() if d.is_dir()]
        for name in spec["files"]:
            path = stage_dir / name.rstrip("/")
            assert path.is_dir() if name.endswith("/") else path.is_file(), f"{stage}: README lists {name}, missing"
            if name.endswith("/"):
                assert any(path.iterdir()), f"{stage}: {name} is empty"


def test_parquet_columns_match_readme(read_back):
    table = _readme_artifacts()
    seen: set[str] = set()
    schema_versions = set()
    undocumented_columns: list[str] = []
    for stage, spec in table.items():
        parquet = [f for f in spec["files"] if f.endswith(".parquet")]
        if not parquet:
            continue
        records = spec["records"]
        assert len(records) in (1, len(parquet)), f"{stage}: cannot pair {parquet} with {records}"
        for i, name in enumerate(parquet):
            record = records[0] if len(records) == 1 else records[i]
            (key,) = [k for k in read_back if k.startswith(f"{stage}/") and k.endswith(f"/{name}")]
            seen.add(key)
            got = read_back[key]
            assert got["rows"] > 0 and got["polars_height"] == got["rows"], f"{key}: no rows"
            assert got["metadata"].get("rscaffold.record") == record, f"{key}: {got['metadata']}"
            schema_versions.add(got["metadata"].get("rscaffold.schema_version"))
            names = [f["name"] for f in got["fields"]]
            assert got["polars_columns"] == names
            documented = spec["columns"][record]
            if documented is None:
                undocumented_columns.append(f"{record} ({key}: {', '.join(names)})")
                continue
            expected = [c[0] for c in documented]
            assert names == expected, f"{key}: columns {names} != README {expected}"
            fields = {f["name"]: f for f in got["fields"]}
            for col, nested, values in documented:
                if nested:
                    assert fields[col]["struct_fields"] == nested, f"{key}.{col}: {fields[col]}"
                if values and col in got["distinct"]:
                    assert set(got["distinct"][col]) <= set(values), f"{key}.{col}: {got['distinct'][col]}"
    assert len(schema_versions) == 1 and None not in schema_versions, schema_versions
    if undocumented_columns:
        warnings.warn("README's Artifacts table lists no columns for " + "; ".join(undocumented_columns), stacklevel=1)

    # Any other top-level Parquet file must be documented (or be known partial work).
    undocumented = []
    for key, got in read_back.items():
        stage, _fp, name = key.split("/")
        if key in seen:
            continue
        if stage in PARTIAL_WORK and PARTIAL_WORK[stage].fullmatch(name):
            assert got["metadata"].get("rscaffold.record") == "PredictionRecord", key
            continue
        undocumented.append(key)
    assert not undocumented, f"Parquet outputs not in the README's Artifacts table: {undocumented}"
