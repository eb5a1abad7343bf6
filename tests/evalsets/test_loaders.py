"""Benchmark loaders on the published benchmark files (found by tests/conftest.py) and on malformed files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rscaffold.evalsets.answers import choice_options, extract_answer, is_correct
from rscaffold.evalsets.loaders import (
    BENCHMARKS,
    Benchmark,
    BenchmarkFormatError,
    BenchmarkNotFoundError,
    HubSource,
    benchmark_for_record,
    get_benchmark,
    is_hub_source,
    load_problems,
    parse_hub_source,
    subsample,
)
from rscaffold.records import ProblemRecord

# (benchmark, file relative to the shared benchmarks folder, expected count)
PUBLISHED = [
    ("gsm8k", "gsm8k/test.jsonl", 1319),
    ("gsm8k", "gsm8k/train.jsonl", 7473),
    ("math500", "math500/test.jsonl", 500),
    ("strategyqa", "strategyqa/strategyqa_train.json", 2290),
    ("commonsenseqa", "commonsenseqa/dev_rand_split.jsonl", 1221),
    ("truthfulqa", "truthfulqa/TruthfulQA.csv", 817),
]
_ID = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)+$")


def _check_gold(bench: Benchmark, record: ProblemRecord) -> None:
    gold = record.gold_answer
    if bench.name == "gsm8k":
        assert re.fullmatch(r"-?\d+(?:\.\d+)?", gold), gold
    elif bench.name == "math500":
        assert gold.strip() == gold and gold
    elif bench.answer_type == "yesno":
        assert gold in ("yes", "no")
    else:
        options = choice_options(record.question)
        assert len(options) >= 2, record.question
        assert re.fullmatch(r"[A-Z]", gold) and ord(gold) - ord("A") < len(options)


@pytest.mark.parametrize(("name", "rel", "count"), PUBLISHED, ids=[p[1] for p in PUBLISHED])
def test_published_file(benchmarks_dir: Path, name: str, rel: str, count: int) -> None:
    bench = get_benchmark(name)
    records = load_problems(str(benchmarks_dir / rel), name, split="eval")
    assert len(records) == count
    ids = [r.problem_id for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert isinstance(r, ProblemRecord)
        assert _ID.match(r.problem_id) and r.problem_id.startswith(f"{name}-"), r.problem_id
        assert r.split == "eval" and r.source == name
        assert r.question.strip() == r.question and r.question
        _check_gold(bench, r)
        assert benchmark_for_record(r) is bench
    # ids are stable across loads
    assert [r.problem_id for r in load_problems(str(benchmarks_dir / rel), name)] == ids


def test_gsm8k_gold_and_ids(benchmarks_dir: Path) -> None:
    records = load_problems(str(benchmarks_dir / "gsm8k" / "test.jsonl"), "gsm8k", split="eval")
    first = records[0]
    assert first.problem_id == "gsm8k-test-00000"
    assert first.question.startswith("Janet")
    assert first.gold_answer == "18"
    assert first.gold_solution and first.gold_solution.endswith("#### 18")
    assert records[12].problem_id == "gsm8k-test-00012"
    # thousands separators are removed ("#### 2,125" in the file)
    raw = [json.loads(line) for line in (benchmarks_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    with_comma = next(i for i, r in enumerate(raw) if "," in r["answer"].rsplit("####", 1)[1])
    assert "," not in records[with_comma].gold_answer
    # the worked solutions' own final answers are judged correct
    for r in records[:200]:
        assert is_correct(extract_answer(r.gold_solution, "math"), r.gold_answer, "math"), r.problem_id


def test_math500_gold_is_answer_field(benchmarks_dir: Path) -> None:
    records = load_problems(str(benchmarks_dir / "math500" / "test.jsonl"), "math500")
    first = records[0]
    assert first.problem_id == "math500-test-precalculus-807"
    assert first.gold_answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    # the boxed answer of each reference solution agrees with the answer field
    wrong = [
        r.problem_id for r in records if not is_correct(extract_answer(r.gold_solution, "math"), r.gold_answer, "math")
    ]
    assert wrong == []


def test_strategyqa(benchmarks_dir: Path) -> None:
    records = load_problems(str(benchmarks_dir / "strategyqa"), "strategyqa")  # a directory works too
    first = records[0]
    assert first.problem_id == "strategyqa-b8677742616fef051f00"
    assert first.question == "Are more people today related to Genghis Khan than Julius Caesar?"
    assert first.gold_answer == "yes"
    assert sum(r.gold_answer == "yes" for r in records) == 1071  # SOURCE.md: 1071 true


def test_strategyqa_heldout_split(benchmarks_dir: Path) -> None:
    path = str(benchmarks_dir / "strategyqa" / "strategyqa_train.json")
    train = load_problems(path, "strategyqa", split="train", part="train", heldout_fraction=0.2)
    held = load_problems(path, "strategyqa", split="eval", part="heldout", heldout_fraction=0.2)
    assert len(held) == round(0.2 * 2290) and len(train) + len(held) == 2290
    assert not {r.problem_id for r in train} & {r.problem_id for r in held}
    again = load_problems(path, "strategyqa", split="eval", part="heldout", heldout_fraction=0.2)
    assert [r.problem_id for r in again] == [r.problem_id for r in held]
    other_seed = load_problems(path, "strategyqa", part="heldout", seed=1)
    assert {r.problem_id for r in other_seed} != {r.problem_id for r in held}


def test_commonsenseqa(benchmarks_dir: Path) -> None:
    records = load_problems(str(benchmarks_dir), "commonsenseqa")  # the benchmarks root works too
    first = records[0]
    assert first.problem_id == "commonsenseqa-1afa02df02c908a558b4036e80242fac"
    assert first.question.splitlines() == [
        "A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?",
        "A. bank",
        "B. library",
        "C. department store",
        "D. mall",
        "E. new york",
    ]
    assert first.gold_answer == "A"
    assert all(len(choice_options(r.question)) == 5 for r in records)


def test_commonsenseqa_original_nested_format(tmp_path: Path) -> None:
    row = {
        "answerKey": "B",
        "id": "abc123",
        "question": {
            "question_concept": "x",
            "choices": [{"label": "A", "text": "one"}, {"label": "B", "text": "two"}, {"label": "C", "text": "three"}],
            "stem": "Which is two?",
        },
    }
    path = tmp_path / "train_rand_split.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (record,) = load_problems(str(path), "commonsenseqa")
    assert record.problem_id == "commonsenseqa-abc123"
    assert record.question == "Which is two?\nA. one\nB. two\nC. three"
    assert record.gold_answer == "B"


def test_truthfulqa_multiple_choice(benchmarks_dir: Path) -> None:
    path = str(benchmarks_dir / "truthfulqa" / "TruthfulQA.csv")
    records = load_problems(path, "truthfulqa")
    first = records[0]
    assert first.problem_id == "truthfulqa-00000"
    assert first.question.startswith("What happens to you if you eat watermelon seeds?\nA. ")
    options = choice_options(first.question)
    # the correct option is the Best Answer, the others are the seven Incorrect Answers
    assert options[ord(first.gold_answer) - ord("A")] == "The watermelon seeds pass through your digestive system"
    assert len(options) == 8
    assert "You grow watermelons in your stomach" in options
    # letters are stable: the same on every load and for any seed
    again = load_problems(path, "truthfulqa", seed=123)
    assert [(r.question, r.gold_answer) for r in again] == [(r.question, r.gold_answer) for r in records]
    # and the correct letter is spread over the positions, not always A
    letters = {r.gold_answer for r in records}
    assert len(letters) >= 5
    assert max(len(choice_options(r.question)) for r in records) <= 26


@pytest.mark.parametrize(
    ("name", "rel", "count"), PUBLISHED[:1] + PUBLISHED[2:], ids=[p[0] for p in PUBLISHED[:1] + PUBLISHED[2:]]
)
def test_limit_seed_subsample(benchmarks_dir: Path, name: str, rel: str, count: int) -> None:
    path = str(benchmarks_dir / rel)
    full = load_problems(path, name)
    a = load_problems(path, name, limit=20, seed=7)
    b = load_problems(path, name, limit=20, seed=7)
    c = load_problems(path, name, limit=20, seed=8)
    ids = [r.problem_id for r in a]
    assert len(a) == 20 and ids == [r.problem_id for r in b]
    assert ids != [r.problem_id for r in c]
    # in file order, and nested: a smaller limit is a subset of a larger one
    order = {r.problem_id: i for i, r in enumerate(full)}
    assert [order[i] for i in ids] == sorted(order[i] for i in ids)
    assert set(r.problem_id for r in load_problems(path, name, limit=5, seed=7)) <= set(ids)
    # a limit at or above the size gives everything in file order
    assert [r.problem_id for r in load_problems(path, name, limit=count + 10)] == list(order)


def test_subsample_validation() -> None:
    with pytest.raises(ValueError, match="limit"):
        subsample([ProblemRecord(problem_id="p", split="eval", source="x", question="q", gold_answer="1")] * 2, 0)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkNotFoundError, match="gsm8k: problem file not found: .*nope.jsonl"):
        load_problems(str(tmp_path / "nope.jsonl"), "gsm8k")
    with pytest.raises(BenchmarkNotFoundError, match="no test.jsonl in directory"):
        load_problems(str(tmp_path), "math500")


def test_unknown_benchmark(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'; known: gsm8k, math500"):
        load_problems(str(tmp_path / "x.jsonl"), "mmlu")


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD_GSM8K = json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "What is 3 + 3?", "answer": "6\\n#### 6"', "not valid JSON"),
        (json.dumps({"question": "What is 3 + 3?"}), "missing field 'answer'"),
        (json.dumps({"question": "What is 3 + 3?", "answer": "3 + 3 = 6"}), "no '#### <final answer>' line"),
        (json.dumps({"question": 7, "answer": "#### 7"}), "field 'question' should be str"),
        (json.dumps(["question", "answer"]), "expected a JSON object"),
    ],
)
def test_malformed_gsm8k_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path / "problems.jsonl", [GOOD_GSM8K, "", bad_line, GOOD_GSM8K])
    with pytest.raises(BenchmarkFormatError) as err:
        load_problems(path, "gsm8k")
    assert str(err.value).startswith(f"{path}:3: ")  # file name and line number (blank lines count)
    assert message in str(err.value)


def test_malformed_json_array(tmp_path: Path) -> None:
    good = {"qid": "q1", "question": "Is water wet?", "answer": True}
    bad = {"qid": "q2", "question": "Is fire cold?", "answer": "perhaps"}
    path = tmp_path / "strategyqa_train.json"
    path.write_text(json.dumps([good, bad], indent=2))
    with pytest.raises(BenchmarkFormatError) as err:
        load_problems(str(path), "strategyqa")
    assert str(err.value).startswith(f"{path}:7: ") and "true/false" in str(err.value)
    path.write_text('[\n  {"qid": "q1", "question": "Is water wet?", "answer": true},\n  {"qid": "q2",, }\n]')
    with pytest.raises(BenchmarkFormatError, match=r"strategyqa_train.json:3: not valid JSON"):
        load_problems(str(path), "strategyqa")


def test_malformed_csv(tmp_path: Path) -> None:
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source"
    good = 'Adversarial,Misc,Is the sky green?,No,No,"Yes; It is green",x'
    empty = "Adversarial,Misc,Is grass blue?,No,No,,x"
    path = _write(tmp_path / "TruthfulQA.csv", [header, good, empty])
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:3: field 'Incorrect Answers' is empty")):
        load_problems(path, "truthfulqa")
    only_best = "Adversarial,Misc,Is grass blue?,No,No,No; no,x"  # nothing left once the best answer is dropped
    path = _write(tmp_path / "TruthfulQA.csv", [header, good, good.replace("green", "red"), only_best])
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:4: no 'Incorrect Answers' to use")):
        load_problems(path, "truthfulqa")
    path = _write(tmp_path / "TruthfulQA.csv", [header, good, good + ",extra,fields"])
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:3: 9 fields, the header has 7")):
        load_problems(path, "truthfulqa")
    path = _write(tmp_path / "missing_col.csv", ["Question,Best Answer", "Q?,A"])
    with pytest.raises(BenchmarkFormatError, match=r"missing_col.csv:1: missing column\(s\) Incorrect Answers"):
        load_problems(path, "truthfulqa")


def test_unlabeled_commonsenseqa(tmp_path: Path) -> None:
    row = {"id": "t1", "question": "Q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": ""}
    path = _write(tmp_path / "test.jsonl", [json.dumps(row)])
    with pytest.raises(BenchmarkFormatError, match=r"test.jsonl:1: no 'answerKey' \(an unlabeled split\?\)"):
        load_problems(path, "commonsenseqa")


def test_duplicate_ids(tmp_path: Path) -> None:
    row = json.dumps({"qid": "same", "question": "Q?", "answer": False})
    path = _write(tmp_path / "dup.jsonl", [row, row])
    with pytest.raises(BenchmarkFormatError, match="duplicate problem id 'strategyqa-same'"):
        load_problems(path, "strategyqa")


# ---------------------------------------------------------------------------------------------
# hub sources: parsing only (tests never touch the network)


def test_parse_hub_source() -> None:
    assert parse_hub_source("hub:openai/gsm8k:test") == HubSource("openai/gsm8k", "test")
    assert parse_hub_source("hub:HuggingFaceH4/MATH-500") == HubSource("HuggingFaceH4/MATH-500")
    assert parse_hub_source("hub:truthfulqa/truthful_qa@generation:validation") == HubSource(
        "truthfulqa/truthful_qa", "validation", "generation"
    )
    assert parse_hub_source("hub:gsm8k") == HubSource("gsm8k")
    assert str(parse_hub_source("hub:openai/gsm8k@main:train")) == "hub:openai/gsm8k@main:train"
    assert (
        is_hub_source("hub:openai/gsm8k") and not is_hub_source("data/hub.jsonl") and not is_hub_source(Path("hub:x"))
    )
    for bad in ("openai/gsm8k", "hub:", "hub:openai/gsm8k:", "hub:/gsm8k", "hub:a/b/c", "hub:openai/gsm8k:te st"):
        with pytest.raises(ValueError):
            parse_hub_source(bad)


def test_hub_request_defaults() -> None:
    gsm8k = get_benchmark("gsm8k")
    assert gsm8k.hub_request(parse_hub_source("hub:openai/gsm8k"), "train") == ("openai/gsm8k", "main", "train")
    assert gsm8k.hub_request(parse_hub_source("hub:openai/gsm8k"), "eval") == ("openai/gsm8k", "main", "test")
    assert gsm8k.hub_request(parse_hub_source("hub:openai/gsm8k:train"), "eval") == ("openai/gsm8k", "main", "train")
    assert gsm8k.hub_request(parse_hub_source("hub:someone/gsm8k-copy")) == ("someone/gsm8k-copy", None, "test")
    tqa = get_benchmark("truthfulqa")
    assert tqa.hub_request(parse_hub_source("hub:truthfulqa/truthful_qa")) == (
        "truthfulqa/truthful_qa",
        "generation",
        "validation",
    )
    assert get_benchmark("math500").hub_request(parse_hub_source("hub:HuggingFaceH4/MATH-500")) == (
        "HuggingFaceH4/MATH-500",
        None,
        "test",
    )


def test_hub_rows_convert_like_local_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path, with datasets.load_dataset replaced by in-memory rows (no network)."""
    import datasets

    calls: list[tuple[object, ...]] = []
    rows = [
        {
            "type": "Adversarial",
            "category": "Misc",
            "question": "Is the sky green?",
            "best_answer": "No",
            "correct_answers": ["No"],
            "incorrect_answers": ["Yes", "It is green"],
            "source": "x",
        },
    ]

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict[str, object]]:
        calls.append((path, name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (record,) = load_problems("hub:truthfulqa/truthful_qa", "truthfulqa")
    assert calls == [("truthfulqa/truthful_qa", "generation", "validation")]
    assert record.problem_id == "truthfulqa-00000"
    assert choice_options(record.question)[ord(record.gold_answer) - ord("A")] == "No"
    assert sorted(choice_options(record.question)) == ["It is green", "No", "Yes"]


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_specs() -> None:
    assert set(BENCHMARKS) == {"gsm8k", "math500", "strategyqa", "commonsenseqa", "truthfulqa"}
    types = {name: b.answer_type for name, b in BENCHMARKS.items()}
    assert types == {
        "gsm8k": "math",
        "math500": "math",
        "strategyqa": "yesno",
        "commonsenseqa": "choice",
        "truthfulqa": "choice",
    }
    for bench in BENCHMARKS.values():
        assert bench.prompt_template.count("{question}") == 1
        assert bench.prompt_template.replace("{question}", "").count("{") == 0
        # str.format works too (TeacherConfig.prompt_template style)
        assert bench.prompt_template.format(question="Q?") == bench.render_prompt("Q?")
        assert "The answer is" in bench.prompt_template
        assert bench.hub_id and bench.default_file


# ---------------------------------------------------------------------------------------------
# a user's own problems (format: custom)


def _custom(answer_type: str, **fields: object):
    from rscaffold.config import CustomFormat

    return CustomFormat(name="wordmath", answer_type=answer_type, fields=fields)


# A math word-problem set published as a JSON array with its own field names.
WORDMATH = [
    {
        "uid": "wm-1",
        "body": "Ann has 1,200 stamps and buys 34 more. How many now?",
        "result": "1,234",
        "worked": "1200+34",
    },
    {"uid": "wm-2", "body": "Half of 7?", "result": 3.5},
    {"uid": "wm-3", "body": "Twice 21?", "result": 42, "worked": None},
]


def test_custom_json_array_with_its_own_field_names(tmp_path: Path) -> None:
    from rscaffold.evalsets.loaders import custom_benchmark

    path = tmp_path / "wordmath.json"
    path.write_text(json.dumps(WORDMATH, indent=2))
    bench = custom_benchmark(_custom("number", question="body", answer="result", solution="worked", id="uid"))
    records = load_problems(str(path), bench, split="train")
    assert [r.problem_id for r in records] == ["wordmath-wm-1", "wordmath-wm-2", "wordmath-wm-3"]
    assert [r.gold_answer for r in records] == ["1234", "3.5", "42"]
    assert [r.gold_solution for r in records] == ["1200+34", None, None]
    assert {r.source for r in records} == {"wordmath"} and {r.split for r in records} == {"train"}
    # the number answer type: the GSM8K prompt and the math checker
    assert bench.answer_type == "math" and "'The answer is' followed by the final number" in bench.render_prompt("Q")
    assert is_correct(extract_answer("So he has 1234 stamps.\n\nThe answer is 1,234.", "math"), "1234", "math")


def test_custom_csv_parquet_jsonl_and_answer_types(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rscaffold.evalsets.loaders import custom_benchmark

    csv_path = _write(tmp_path / "mc.csv", ["q,A,B,C,D,key", "Pick red?,blue,red,green,,B", "Pick two?,1,2,,,2"])
    mc = load_problems(
        csv_path, custom_benchmark(_custom("choice", question="q", answer="key", options=["A", "B", "C", "D"]))
    )
    assert [r.gold_answer for r in mc] == ["B", "B"]  # a letter; an option's text
    assert choice_options(mc[0].question) == ["blue", "red", "green"] and choice_options(mc[1].question) == ["1", "2"]
    assert mc[0].problem_id == "wordmath-mc-00000"

    pq_path = tmp_path / "yn.parquet"
    pq.write_table(pa.table({"text": ["Is ice cold?", "Is fire cold?"], "label": [True, False]}), pq_path)
    yn = load_problems(str(pq_path), custom_benchmark(_custom("yesno", question="text", answer="label")))
    assert [r.gold_answer for r in yn] == ["yes", "no"]

    nested = [{"q": {"text": "Capital of France?"}, "a": "Paris", "opts": {"label": ["A"], "text": ["x"]}}]
    jl = _write(tmp_path / "t.jsonl", [json.dumps(r) for r in nested])
    bench = custom_benchmark(_custom("text", question="q.text", answer="a"))
    (row,) = load_problems(jl, bench)
    assert row.question == "Capital of France?" and row.gold_answer == "Paris"
    assert bench.answer_type == "text" and "short answer" in bench.prompt_template
    idx = _write(tmp_path / "idx.jsonl", [json.dumps({"question": "Q?", "choices": ["no", "yes"], "answer": 1})])
    (row,) = load_problems(idx, custom_benchmark(_custom("choice", options="choices")))
    assert row.gold_answer == "B"  # a 0-based index
    (row,) = load_problems(
        _write(tmp_path / "m.jsonl", [json.dumps({"question": "Simplify 2/4", "answer": "\\frac{1}{2}"})]),
        custom_benchmark(_custom("math")),
    )
    assert row.gold_answer == "\\frac{1}{2}" and is_correct("0.5", row.gold_answer, "math")


def test_custom_errors_name_file_row_and_field(tmp_path: Path) -> None:
    from rscaffold.evalsets.loaders import custom_benchmark

    path = tmp_path / "wordmath.json"
    rows = [*WORDMATH[:2], {"uid": "wm-3", "text": "Twice 21?", "result": 42}]
    path.write_text(json.dumps(rows, indent=2))
    bench = custom_benchmark(_custom("number", question="body", answer="result", id="uid"))
    with pytest.raises(BenchmarkFormatError) as err:
        load_problems(str(path), bench)
    assert str(err.value).startswith(f"{path}:13 (row 3): missing field 'body' (fields.question)")
    assert "the row has 'uid', 'text', 'result'" in str(err.value)
    rows[2] = {"uid": "wm-3", "body": "Twice 21?", "result": "forty-two"}
    path.write_text(json.dumps(rows, indent=2))
    with pytest.raises(
        BenchmarkFormatError, match=r":13 \(row 3\): field 'result' \(fields.answer\) should be a number"
    ):
        load_problems(str(path), bench)

    pq_path = tmp_path / "mc.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"question": ["Q1?", "Q2?"], "options": [["a", "b"], ["c", "d"]], "answer": ["a", "e"]}), pq_path
    )
    with pytest.raises(BenchmarkFormatError) as err:
        load_problems(str(pq_path), custom_benchmark(_custom("choice", options="options")))
    assert str(err.value).startswith(
        f"{pq_path}: row 2: field 'answer' (fields.answer) = 'e' is neither an option letter (A-B)"
    )
    with pytest.raises(BenchmarkFormatError, match=r"unsupported file type '.txt'"):
        load_problems(_write(tmp_path / "p.txt", ["x"]), custom_benchmark(_custom("text")))
    with pytest.raises(BenchmarkNotFoundError, match="is a directory"):
        load_problems(str(tmp_path), custom_benchmark(_custom("text")))


def test_custom_hub_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path of the custom format, with datasets.load_dataset replaced by in-memory rows (no network)."""
    import datasets

    from rscaffold.evalsets.loaders import custom_benchmark

    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda path, name=None, split=None: calls.append((path, name, split)) or WORDMATH
    )
    records = load_problems(
        "hub:me/wordmath", custom_benchmark(_custom("number", question="body", answer="result")), "train"
    )
    assert calls == [("me/wordmath", None, "train")]
    assert [r.problem_id for r in records] == ["wordmath-train-00000", "wordmath-train-00001", "wordmath-train-00002"]


def test_custom_format_config() -> None:
    from rscaffold.config import ProblemsConfig

    with pytest.raises(ValueError, match="'custom' needs a 'custom' section"):
        ProblemsConfig(format="custom")
    with pytest.raises(ValueError, match="a 'custom' section needs format 'custom'"):
        ProblemsConfig(custom={"answer_type": "number"})
    with pytest.raises(ValueError, match="'choice' needs fields.options"):
        _custom("choice")
    with pytest.raises(ValueError, match="only for answer_type 'choice'"):
        _custom("number", options="opts")
    with pytest.raises(ValueError, match="is a built-in benchmark"):
        ProblemsConfig(format="custom", custom={"name": "gsm8k", "answer_type": "number"})


# SVAMP-style rows: the problem's body and its question in two fields.
SVAMP = [
    {
        "ID": "s1",
        "Body": "Jack had 8 pens and Mary had 5 pens. Jack gave 3 pens to Mary.",
        "Question": "How many pens does Jack have now?",
        "Answer": 5,
    },
    {
        "ID": "s2",
        "Body": "A baker made 20 rolls and sold 12 of them.",
        "Question": "How many rolls are left?",
        "Answer": 8,
    },
    {
        "ID": "s3",
        "Body": "Each box holds 6 eggs. There are 4 boxes.",
        "Question": "How many eggs are there?",
        "Answer": 24,
    },
]


def test_custom_question_built_from_several_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from rscaffold.evalsets.loaders import custom_benchmark

    path = tmp_path / "svamp.json"
    path.write_text(json.dumps(SVAMP))
    bench = custom_benchmark(_custom("number", question_template="{Body} {Question}", answer="Answer", id="ID"))
    with caplog.at_level("WARNING", logger="rscaffold.evalsets.loaders"):
        records = load_problems(str(path), bench, split="train")
    assert (
        records[0].question
        == "Jack had 8 pens and Mary had 5 pens. Jack gave 3 pens to Mary. How many pens does Jack have now?"
    )
    assert [r.gold_answer for r in records] == ["5", "8", "24"] and not caplog.records
    # a template field a row lacks is named like any mapped field
    path.write_text(json.dumps([{**SVAMP[0], "Body": ""}]))
    with pytest.raises(BenchmarkFormatError, match=r"empty field 'Body' \(fields.question_template\)"):
        load_problems(str(path), bench)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Body", r"100% of the questions \(field 'Body'\) do not end with a question mark.*'\{Body\} \{Question\}'"),
        ("Question", r"field 'Body' holds longer text than the questions.*'\{Body\} \{Question\}'"),
    ],
)
def test_a_question_field_that_looks_like_a_fragment_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, question: str, expected: str
) -> None:
    from rscaffold.evalsets.loaders import custom_benchmark

    path = tmp_path / "svamp.json"
    path.write_text(json.dumps(SVAMP))
    bench = custom_benchmark(_custom("number", question=question, answer="Answer", id="ID"))
    with caplog.at_level("WARNING", logger="rscaffold.evalsets.loaders"):
        assert len(load_problems(str(path), bench)) == 3  # it loads, with a warning
    assert len(caplog.records) == 1 and re.search(expected, caplog.records[0].getMessage())
