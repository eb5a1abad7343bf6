"""rscaffold export: a dataset stage's output as a Hugging Face dataset (datasets, huggingface_hub)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from rscaffold.config import PipelineConfig, config_from_dict
from rscaffold.evalsets.loaders import benchmark_for
from rscaffold.export import ExportError, export_dataset, find_dataset_dir, push_to_hub
from rscaffold.labeling.quality import label_quality_report
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.paths import default_model_dir
from rscaffold.prompts import student_user_message
from rscaffold.records import LabeledStepRecord, TraceRecord
from rscaffold.stages.dataset import run_dataset
from rscaffold.stages.plan import plan_fingerprints
from rscaffold.stages.problems import read_problems, run_problems
from rscaffold.store import StageDir, StageRef, write_records

SIGNALS = ["Reasoning and Analysis", "Contrast and Concession", "Conclusion and Summary"]


def _finish(cfg: PipelineConfig, fps: dict, stage: str, *, outputs: dict, config, inputs: dict) -> StageRef:
    sd = StageDir(cfg.run.artifacts_dir, stage, fps[stage]).prepare()
    return sd.finish(outputs=outputs, config=config, inputs=inputs, summary={}, started=0.0, code="test")


def build_artifacts(root: Path) -> tuple[PipelineConfig, StageRef]:
    """A real artifacts tree up to the dataset stage: the problems and dataset stages run; the teacher's
    and labeler's outputs are written as those stages write them (rows, manifests), without an LLM."""
    cfg = config_from_dict(
        {
            "run": {"artifacts_dir": str(root)},
            "problems": {"limit_train": 10, "limit_eval": 2},
            "teacher": {"llm": {"backend": "openai", "model": "deepseek-ai/DeepSeek-R1", "base_url": "http://x/v1"}},
            "dataset": {"validation_fraction": 0.2},
        }
    )
    fps = plan_fingerprints(cfg)
    problems = run_problems(cfg, fps)
    traces, steps = [], []
    for i, p in enumerate(read_problems(problems, "train")):
        tid = f"{p.problem_id}#0"
        traces.append(
            TraceRecord(
                trace_id=tid,
                problem_id=p.problem_id,
                sample_index=0,
                question=p.question,
                gold_answer=p.gold_answer,
                text="x",
                predicted_answer=p.gold_answer,
                correct=i % 3 != 0,
            )
        )
        for k, (sig, text) in enumerate(zip(SIGNALS, ("First, count.", "But wait, recheck.", "So the answer is 4."))):
            steps.append(
                LabeledStepRecord(
                    trace_id=tid,
                    problem_id=p.problem_id,
                    step_index=k,
                    text=text,
                    prelabel=sig if k else None,
                    signal=sig,
                    source="llm" if k else "keyword",
                )
            )
    teacher_sd = StageDir(root, "teacher", fps["teacher"]).prepare()
    write_records(teacher_sd.work / "traces.parquet", traces, TraceRecord)
    teacher = _finish(
        cfg,
        fps,
        "teacher",
        outputs={"traces": "traces.parquet"},
        config=cfg.teacher,
        inputs={"problems": fps["problems"]},
    )
    tax = load_taxonomy(cfg.labeling.taxonomy)
    labeling_sd = StageDir(root, "labeling", fps["labeling"]).prepare()
    write_records(labeling_sd.work / "labeled_steps.parquet", steps, LabeledStepRecord)
    (labeling_sd.work / "quality.json").write_text(json.dumps(label_quality_report(steps, tax)))
    tax.save(labeling_sd.work / "taxonomy.yaml")
    labeling = _finish(
        cfg,
        fps,
        "labeling",
        outputs={"labeled_steps": "labeled_steps.parquet", "quality": "quality.json", "taxonomy": "taxonomy.yaml"},
        config={"labeling": cfg.labeling, "keep": "all", "labeler": cfg.labeler_llm()},
        inputs={"teacher": fps["teacher"]},
    )
    return cfg, run_dataset(cfg, fps, teacher=teacher, labeling=labeling)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[PipelineConfig, StageRef]:
    return build_artifacts(tmp_path_factory.mktemp("artifacts"))


def card_header(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_export_loads_with_datasets_and_has_a_card(artifacts, tmp_path):
    import datasets

    cfg, dataset = artifacts
    result = export_dataset(dataset.path, tmp_path / "out")
    ds = datasets.load_dataset(str(tmp_path / "out"))
    assert set(ds) == {"train", "validation"} and result.splits == {"train": 8, "validation": 2}
    assert len(ds["train"]) == 8 and len(ds["validation"]) == 2
    assert "split" not in ds["train"].column_names
    assert {"messages", "messages_plain", "steps", "signals", "question", "gold_answer"} <= set(
        ds["train"].column_names
    )
    row = ds["train"][0]
    system, user, assistant = row["messages"]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    # the user turn is what the training stage renders: the question in its benchmark family's prompt
    family = benchmark_for(cfg.problems.format, cfg.problems.custom).family
    assert user["content"] == student_user_message(row["question"], family) != row["question"]
    assert row["prompt"] == [system, user] and row["completion"] == [assistant]
    assert row["completion_plain"] == [row["messages_plain"][2]]
    assert assistant["content"] == (
        "<sig:reasoning>First, count.\n\n<sig:contrast>But wait, recheck.\n\n<sig:conclusion>So the answer is 4."
    )
    assert row["messages_plain"][2]["content"] == "First, count.\n\nBut wait, recheck.\n\nSo the answer is 4."
    assert row["steps"][1] == {
        "index": 1,
        "signal": "Contrast and Concession",
        "text": "But wait, recheck.",
        "source": "llm",
    }
    train_problems, val_problems = set(ds["train"]["problem_id"]), set(ds["validation"]["problem_id"])
    assert not train_problems & val_problems
    # TRL takes it as a conversational dataset; with the signal tokens added they stay single tokens
    from trl.data_utils import apply_chat_template, is_conversational

    assert is_conversational({"messages": row["messages"]})
    model_dir = default_model_dir()
    if (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.add_special_tokens({"additional_special_tokens": ["<sig:reasoning>", "<sig:contrast>", "<sig:conclusion>"]})
        text = apply_chat_template({"messages": row["messages"]}, tok)["text"]
        assert "<sig:contrast>But wait" in text
        assert tok.convert_tokens_to_ids("<sig:contrast>") in tok(text)["input_ids"]

    header = card_header(result.card)
    assert header["license"] == "apache-2.0"  # the built-in problem set: rscaffold's own
    assert header["task_categories"] == ["text-generation", "question-answering"]
    assert header["size_categories"] == ["n<1K"]
    assert header["configs"][0]["data_files"] == [
        {"split": "train", "path": "data/train-*"},
        {"split": "validation", "path": "data/validation-*"},
    ]
    assert {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]} == {"train": 8, "validation": 2}
    body = result.card.read_text()
    for expected in (
        "`<sig:contrast>`",  # the taxonomy with its tokens
        "deepseek-ai/DeepSeek-R1 via openai",  # teacher and labeler
        "| steps with a keyword pre-label | 0.667 | about 0.74 |",  # labeling quality
        dataset.fingerprint,
        "| train | 8 |",
        "Train on `prompt` + `completion`",  # which columns to use
        f"the question inside the {family!r} family's prompt",
        "eprint        = {2509.23619}",  # the method's citation
        "## Configuration",  # the resolved configuration of the stages
        "validation_fraction: 0.2",
    ):
        assert expected in body, expected
    assert "degenerate" not in body.split("## Use")[0]
    assert str(Path.home()) not in body and str(tmp_path) not in body  # no local paths in a published card
    # the record metadata of examples.parquet survives
    meta = pq.read_schema(next((tmp_path / "out" / "data").glob("train-*.parquet"))).metadata
    assert meta[b"rscaffold.record"] == b"ExampleRecord" and b"rscaffold.schema_version" in meta
    assert b"huggingface" in meta


def test_degenerate_labels_are_flagged_at_the_top_of_the_card(artifacts, tmp_path):
    cfg, dataset = artifacts
    labeling = StageDir(
        cfg.run.artifacts_dir,
        "labeling",
        json.loads((Path(dataset.path) / "manifest.json").read_text())["inputs"]["labeling"],
    )
    manifest = json.loads(labeling.manifest_path.read_text())
    original = labeling.manifest_path.read_text()
    manifest["summary"] = {"degenerate_labeling": ["kappa 0.05 against the pre-labels"]}
    try:
        labeling.manifest_path.write_text(json.dumps(manifest))
        body = export_dataset(dataset.path, tmp_path / "out").card.read_text().split("---\n", 2)[2]
    finally:
        labeling.manifest_path.write_text(original)
    top = body.split("## Use")[0]
    assert "the labeling looks degenerate" in top and "kappa 0.05 against the pre-labels" in top


def test_plain_trl_trains_two_steps_on_the_export(artifacts, tmp_path, tiny_model_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    _, dataset = artifacts
    export_dataset(dataset.path, tmp_path / "out")
    ds = datasets.load_dataset(str(tmp_path / "out"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<sig:reasoning>", "<sig:contrast>", "<sig:conclusion>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=160,
    )
    train = ds["train"].select_columns(["prompt", "completion"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0


def test_export_of_a_published_benchmark_names_its_license(artifacts, tmp_path, monkeypatch):
    from rscaffold.export import Provenance

    _, dataset = artifacts
    prov = Provenance.read(Path(dataset.path))
    prov.problems["config"] = {"format": "truthfulqa", "train": "/data/TruthfulQA.csv"}
    assert prov.license() == "apache-2.0" and prov.source_datasets() == ["truthfulqa/truthful_qa"]
    prov.problems["config"] = {"format": "custom", "custom": {"name": "wordmath"}, "train": "/data/w.json"}
    assert prov.license() is None and prov.problem_set == "wordmath"


def test_cli_export_finds_the_newest_dataset_and_refuses_to_overwrite(artifacts, tmp_path, monkeypatch):
    from rscaffold_flows.cli import app
    from typer.testing import CliRunner

    cfg, dataset = artifacts
    runner = CliRunner()
    out = tmp_path / "hf"
    res = runner.invoke(app, ["export", cfg.run.artifacts_dir, "--out", str(out), "--license", "cc-by-4.0"])
    assert res.exit_code == 0, res.output
    assert "train 8, validation 2" in res.output and card_header(out / "README.md")["license"] == "cc-by-4.0"
    assert find_dataset_dir(cfg.run.artifacts_dir) == Path(dataset.path)
    res = runner.invoke(app, ["export", str(dataset.path), "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in " ".join(res.output.split())
    assert runner.invoke(app, ["export", str(dataset.path), "--out", str(out), "--overwrite"]).exit_code == 0
    res = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such directory" in " ".join(res.output.split())
    problems_dir = Path(dataset.path).parent.parent / "problems"
    res = runner.invoke(
        app,
        [
            "export",
            str(next(d for d in problems_dir.iterdir() if (d / "manifest.json").is_file())),
            "--out",
            str(tmp_path / "y"),
        ],
    )
    assert res.exit_code == 2 and "not of 'dataset'" in " ".join(res.output.split())
    # pushing without a token stops before any connection is made
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    res = runner.invoke(app, ["export", str(dataset.path), "--push-to-hub", "me/scaffolds", "--private"])
    assert res.exit_code == 2 and "needs a Hugging Face token" in " ".join(res.output.split())


def _hub_reachable() -> str | None:
    """Why the push test cannot run here (None: it can)."""
    if not os.environ.get("RSCAFFOLD_TEST_HUB_REPO"):
        return "set RSCAFFOLD_TEST_HUB_REPO=<user>/<scratch dataset repo> (and HF_TOKEN) to test pushing to the Hub"
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=5)  # noqa: S310 - a fixed https URL
    except urllib.error.HTTPError:
        return None  # reachable (401 without a token)
    except OSError as err:
        return f"the Hugging Face Hub ({endpoint}) is not reachable from here: {err}"
    return None


def test_push_to_hub_and_load_it_back(artifacts, tmp_path):
    reason = _hub_reachable()
    if reason:
        pytest.skip(reason)
    import datasets

    _, dataset = artifacts
    repo = os.environ["RSCAFFOLD_TEST_HUB_REPO"]
    result = export_dataset(dataset.path, tmp_path / "out")
    push_to_hub(result.out_dir, repo, private=True)
    ds = datasets.load_dataset(repo, download_mode="force_redownload")
    assert {k: len(v) for k, v in ds.items()} == result.splits


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(ExportError, match="no such directory"):
        export_dataset(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a complete dataset stage directory"):
        export_dataset(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ExportError, match="not an exported dataset folder"):
        push_to_hub(tmp_path / "empty", "me/x")


def test_export_refuses_a_damaged_or_unpublished_dataset(artifacts, tmp_path):
    cfg, dataset = artifacts
    published = Path(dataset.path)
    # a newer set-aside copy and a newer work directory are never "the newest dataset"
    for name in (f"{published.name}.damaged-20990101-000000", f"{published.name}.partial"):
        copy = published.parent / name
        shutil.copytree(published, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["finished_at"] += 1e6
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ExportError, match="not a published dataset"):
            export_dataset(copy, tmp_path / "out")
    assert find_dataset_dir(cfg.run.artifacts_dir) == published
    # a tampered examples file (same size) is refused, naming the file; nothing is written
    examples = published / "examples.parquet"
    data = bytearray(examples.read_bytes())
    data[len(data) // 2] ^= 0xFF
    examples.write_bytes(bytes(data))
    for target in (published, Path(cfg.run.artifacts_dir)):
        with pytest.raises(ExportError, match=r"damaged .*examples\.parquet: content changed"):
            export_dataset(target, tmp_path / "out")
    assert not (tmp_path / "out").exists()
