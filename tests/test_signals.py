"""Tests of rscaffold.signals: taxonomy, keyword pre-labels, labeling request/parser, labeler."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml

from rscaffold.config import LabelingConfig, SamplingConfig, SegmentationConfig
from rscaffold.labeling.keywords import fallback_label, keyword_prelabel
from rscaffold.labeling.labeler import LabelStats, label_traces
from rscaffold.labeling.parsing import LabelParseError, parse_labels, resolve_signal
from rscaffold.labeling.prompts import PROMPT_STEP_CHARS, build_label_request
from rscaffold.labeling.quality import cohens_kappa, label_quality_report, transition_matrix
from rscaffold.labeling.taxonomy import Taxonomy, TaxonomyError, load_taxonomy
from rscaffold.llm.base import Capabilities, ChatRequest, Completion, LLMBackend
from rscaffold.paths import data_dir
from rscaffold.segment import split_steps

NAMES = [
    "Contrast and Concession",
    "Addition and Elaboration",
    "Reasoning and Analysis",
    "Conclusion and Summary",
    "Verification and Reflection",
    "Hypothesis and Exploration",
    "Restatement and Clarification",
]
CONTRAST, ADDITION, REASONING, CONCLUSION, VERIFY, HYPOTHESIS, RESTATE = NAMES

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)

# DeepSeek-R1 style trace (think block + visible answer), 10 steps at blank lines.
R1_TRACE = """<think>
Okay, so the problem says Natalia sold clips to 48 of her friends in April, and then in May she sold half as many. I need to find the total for April and May together.

First, let me figure out how many she sold in May. Half as many as 48 is 48 divided by 2, which is 24.

Wait, does "half as many clips" mean half as many clips or half as many friends? The question says she sold clips to 48 friends, so I'll assume one clip per friend, which means 48 clips in April.

Hmm, that assumption matters. If each friend bought more than one clip the numbers would change, but nothing in the problem suggests that.

So in May she sold 24 clips. Adding April and May: 48 + 24 = 72.

Let me check that again. 48 / 2 = 24, and 48 + 24 = 72. Yes, that's right.

Alternatively, I could think of it as 1.5 times 48, which is also 72. Same answer.

Therefore, Natalia sold 72 clips altogether.
</think>

Natalia sold 48 clips in April and 48 / 2 = 24 clips in May.

The answer is 72."""

R1_PRELABELS = [RESTATE, REASONING, CONTRAST, CONTRAST, REASONING, VERIFY, HYPOTHESIS, CONCLUSION, None, CONCLUSION]
R1_CUES = [
    "okay so the problem",
    "first",
    "wait",
    "hmm",
    "so",
    "let me check",
    "alternatively",
    "therefore",
    None,
    "the answer is",
]
# What a good labeler says: step 9 (no cue) is a summary, step 4 ("Hmm") is really verification.
R1_GOLD = [RESTATE, REASONING, CONTRAST, VERIFY, REASONING, VERIFY, HYPOTHESIS, CONCLUSION, CONCLUSION, CONCLUSION]

# QwQ style trace with markdown and list markers.
QWQ_TRACE = """Alright, so the problem asks for the area of a 2 m wide path around an 8 m by 5 m garden.

**Step 1:** The outer rectangle is (8 + 4) by (5 + 4), that is 12 by 9, so 108 square meters.

- Moreover, the garden itself is 8 * 5 = 40 square meters.

Hmm... so the path is 108 - 40 = 68 square meters.

Let’s verify: the four strips are 2*(8*2) + 2*(5*2) = 52, plus four 2x2 corners = 16, total 68.

So the answer is 68."""

# "**Step 1:** The outer rectangle ..." has no cue once the markdown and list marker are stripped.
QWQ_PRELABELS = [RESTATE, None, ADDITION, CONTRAST, VERIFY, CONCLUSION]
QWQ_GOLD = [RESTATE, REASONING, ADDITION, REASONING, VERIFY, CONCLUSION]


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return load_taxonomy(data_dir() / "signals.yaml")


# ---------------------------------------------------------------------------------------------
# a fake backend


class ScriptedBackend:
    """test fake: returns scripted outputs; real backends are exercised in the backend tests"""

    name = "scripted"
    model_id = "scripted-labeler"
    capabilities = Capabilities()

    def __init__(self, script: dict[str, list[str | Completion]] | Callable[[ChatRequest], str]) -> None:
        self.script = script
        self.calls: list[list[ChatRequest]] = []

    def generate(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: Callable[[Completion], None] | None = None,
    ) -> list[Completion]:
        self.calls.append(list(requests))
        out = []
        for r in requests:
            if callable(self.script):
                c = Completion(r.request_id, text=self.script(r), finish_reason="stop")
            else:
                queue = self.script.get(r.request_id.split(":")[0], [])
                item = queue.pop(0) if queue else Completion(r.request_id, error="unscripted request")
                c = item if isinstance(item, Completion) else Completion(r.request_id, text=item, finish_reason="stop")
                c.request_id = r.request_id
            if on_result:
                on_result(c)
            out.append(c)
        return out

    def close(self) -> None:
        pass


def _json_answer(signals: Sequence[str], rationale: bool = False) -> str:
    entries = []
    for i, s in enumerate(signals, 1):
        e: dict[str, object] = {"step": i, "signal": s}
        if rationale:
            e["rationale"] = f"reason {i}"
        entries.append(e)
    return json.dumps({"labels": entries})


def _llm_cfg(**kw: object) -> LabelingConfig:
    return LabelingConfig(method="llm", **kw)  # type: ignore[arg-type]


SAMPLING = SamplingConfig(max_new_tokens=1024)


# ---------------------------------------------------------------------------------------------
# taxonomy


def test_builtin_taxonomy(tax: Taxonomy) -> None:
    assert tax.version == 1
    assert tax.names == NAMES
    assert tax.default_signal == REASONING
    assert len(set(tax.tokens)) == 7 and all(t.startswith("<sig:") and t.endswith(">") for t in tax.tokens)
    assert tax.essential_names == NAMES[:6]  # only restatement can be pruned
    assert tax.by_name[CONTRAST].token == "<sig:contrast>"
    assert {"but", "however", "wait"} <= set(tax.by_name[CONTRAST].cues)
    assert all(s.definition and s.example and s.cues for s in tax.signals)
    assert re.fullmatch(r"[0-9a-f]{16}", tax.digest())


def test_each_example_is_prelabeled_as_its_own_signal(tax: Taxonomy) -> None:
    for s in tax.signals:
        assert keyword_prelabel(s.example, tax)[0] == s.name, s.example


def test_digest_is_stable_and_content_sensitive(tmp_path: Path, tax: Taxonomy) -> None:
    raw = yaml.safe_load((data_dir() / "signals.yaml").read_text())
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert load_taxonomy(p).digest() == tax.digest()
    raw["signals"][0]["definition"] += " Changed."
    p.write_text(yaml.safe_dump(raw))
    assert load_taxonomy(p).digest() != tax.digest()


def _write_taxonomy(tmp_path: Path, mutate: Callable[[dict], None]) -> Path:
    raw = yaml.safe_load((data_dir() / "signals.yaml").read_text())
    mutate(raw)
    p = tmp_path / "signals.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_missing_taxonomy_file(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="taxonomy file not found"):
        load_taxonomy(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nsignals: [unclosed\n")
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        load_taxonomy(p)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(TaxonomyError, match="top level must be a mapping"):
        load_taxonomy(p)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["signals"][1].update(name=r["signals"][0]["name"].upper()), "duplicate signal name"),
        (lambda r: r["signals"][1].update(token=r["signals"][0]["token"]), "duplicate signal token"),
        (lambda r: r.update(default_signal="Musing"), "default_signal 'Musing' is not one of"),
        (lambda r: r["signals"][1]["cues"].append("However"), "cue 'however' belongs to both"),
        (lambda r: r["signals"][0].update(colour="red"), r"signals\.0\.colour: unknown key"),
        (lambda r: r["signals"][0].update(token="<sig: contrast>"), "must not contain whitespace"),
        (lambda r: r.update(signals=[]), "signals"),
    ],
)
def test_invalid_taxonomy_content(tmp_path: Path, mutate: Callable[[dict], None], message: str) -> None:
    with pytest.raises(TaxonomyError, match=message):
        load_taxonomy(_write_taxonomy(tmp_path, mutate))


# ---------------------------------------------------------------------------------------------
# keyword pre-label


@pytest.mark.parametrize(
    ("step", "signal", "cue"),
    [
        ("Wait, that's not right.", CONTRAST, "wait"),
        ("BUT the train was late.", CONTRAST, "but"),
        ("On the other hand, 3 is odd.", CONTRAST, "on the other hand"),
        ("So the answer is 42.", CONCLUSION, "so the answer"),  # longest cue wins over "so"
        ("So we divide by 2.", REASONING, "so"),
        ("Another approach: count the corners.", HYPOTHESIS, "another approach"),  # beats "another"
        ("Another 5 apples were added.", ADDITION, "another"),
        ("**Therefore**, x = 3.", CONCLUSION, "therefore"),
        ("1. First, compute the total.", REASONING, "first"),
        ("- Also, note the discount.", ADDITION, "also"),
        ("> Let me double-check this.", VERIFY, "let me double-check"),
        ('"Hmm," I thought.', CONTRAST, "hmm"),
        ("Let’s verify with x = 2.", VERIFY, "let's verify"),  # curly apostrophe
        ("Okay, so the problem asks for the area.", RESTATE, "okay so the problem"),
        ("Step 3: Suppose x is even.", HYPOTHESIS, "suppose"),
        ("In other words, we need the sum.", RESTATE, "in other words"),
    ],
)
def test_keyword_prelabel_matches_cues(tax: Taxonomy, step: str, signal: str, cue: str) -> None:
    assert keyword_prelabel(step, tax) == (signal, cue)


@pytest.mark.parametrize(
    "step",
    [
        "Sooner or later the tank fills.",  # "so" only on a word boundary
        "Android phones cost $200.",  # not "and"
        "So-called primes are meant.",  # hyphenated word is not the cue "so"
        "The train leaves at 3 pm.",
        "48 / 2 = 24.",
        "",
        "   ",
    ],
)
def test_keyword_prelabel_no_cue(tax: Taxonomy, step: str) -> None:
    assert keyword_prelabel(step, tax) == (None, None)


def test_fallback_label(tax: Taxonomy) -> None:
    assert fallback_label("However, x is negative.", tax) == CONTRAST
    assert fallback_label("48 / 2 = 24.", tax) == tax.default_signal == REASONING


def test_trace_prelabels(tax: Taxonomy) -> None:
    steps = split_steps(R1_TRACE, SegmentationConfig())
    pre = [keyword_prelabel(s, tax) for s in steps]
    assert [p[0] for p in pre] == R1_PRELABELS
    assert [p[1] for p in pre] == R1_CUES
    qwq = [keyword_prelabel(s, tax) for s in split_steps(QWQ_TRACE, SegmentationConfig())]
    assert [p[0] for p in qwq] == QWQ_PRELABELS
    assert [p[1] for p in qwq] == ["alright so the problem", None, "moreover", "hmm", "let's verify", "so the answer"]


# ---------------------------------------------------------------------------------------------
# the labeling request


def test_build_label_request(tax: Taxonomy) -> None:
    steps = split_steps(R1_TRACE, SegmentationConfig())
    req = build_label_request("tr-1", QUESTION, steps, prelabels=R1_PRELABELS, tax=tax, with_rationale=False)
    assert req.request_id == "tr-1:label"
    prompt = req.messages[-1]["content"]
    for s in tax.signals:
        assert f"- {s.name}: {s.definition}" in prompt
    assert "Question: Natalia sold clips" in prompt
    assert "[1] (pre-label: Restatement and Clarification) Okay, so the problem says" in prompt
    assert "[9] (pre-label: none) Natalia sold 48 clips" in prompt
    assert "[10] (pre-label: Conclusion and Summary) The answer is 72." in prompt
    assert "exactly 10 entries" in prompt and "rationale" not in prompt
    schema = req.json_schema
    assert schema is not None
    labels = schema["properties"]["labels"]
    assert labels["items"]["properties"]["signal"]["enum"] == NAMES
    assert labels["minItems"] == labels["maxItems"] == 10
    assert labels["items"]["required"] == ["step", "signal"]


def test_label_json_schema_accepts_gold_and_rejects_bad_answers(tax: Taxonomy) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    req = build_label_request("t", QUESTION, ["a", "b"], prelabels=[None, None], tax=tax)
    assert req.json_schema is not None
    jsonschema.validate(json.loads(_json_answer([CONTRAST, ADDITION])), req.json_schema)
    for bad in (
        _json_answer([CONTRAST]),
        _json_answer([CONTRAST, "Musing"]),
        _json_answer([CONTRAST, ADDITION, ADDITION]),
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(bad), req.json_schema)


def test_build_label_request_with_rationale_and_compact_format(tax: Taxonomy) -> None:
    req = build_label_request(
        "t", "Q?", ["So x = 1.", "Thus 1."], prelabels=[REASONING, CONCLUSION], tax=tax, with_rationale=True
    )
    assert '"rationale"' in req.messages[-1]["content"]
    assert req.json_schema is not None and "rationale" in req.json_schema["properties"]["labels"]["items"]["required"]
    compact = build_label_request(
        "t",
        "Q?",
        ["So x = 1.", "Thus 1."],
        prelabels=[None, None],
        tax=tax,
        with_rationale=False,
        answer_format="lines",
    )
    assert compact.json_schema is None
    assert "exactly 2 lines" in compact.messages[-1]["content"]


def test_build_label_request_truncates_huge_steps_in_the_prompt(tax: Taxonomy) -> None:
    huge = "So " + "12 + 12 = 24. " * 2000
    req = build_label_request("t", QUESTION, ["First, add.", huge], prelabels=[REASONING, REASONING], tax=tax)
    prompt = req.messages[-1]["content"]
    assert len(prompt) < 5000
    line = next(ln for ln in prompt.splitlines() if ln.startswith("[2]"))
    assert line.endswith("[...]") and len(line) <= PROMPT_STEP_CHARS + 60


def test_build_label_request_rejects_mismatched_prelabels(tax: Taxonomy) -> None:
    with pytest.raises(ValueError, match="2 steps but 1 pre-labels"):
        build_label_request("t", "Q", ["a", "b"], prelabels=[None], tax=tax)


# ---------------------------------------------------------------------------------------------
# parsing


def _signals(parsed: list) -> list[str]:
    return [p.signal for p in parsed]


def test_parse_valid_json(tax: Taxonomy) -> None:
    parsed = parse_labels(_json_answer(R1_GOLD, rationale=True), 10, tax)
    assert _signals(parsed) == R1_GOLD
    assert [p.step_index for p in parsed] == list(range(10))
    assert parsed[3].rationale == "reason 4"


def test_parse_json_out_of_order(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 2, "signal": CONCLUSION}, {"step": 1, "signal": CONTRAST}]})
    assert _signals(parse_labels(text, 2, tax)) == [CONTRAST, CONCLUSION]


def test_parse_json_in_code_fence_with_prose(tax: Taxonomy) -> None:
    text = (
        "Sure! Here are the labels for the steps [as requested]:\n\n```json\n"
        + json.dumps(
            {"labels": [{"step": 1, "signal": "contrast and concession"}, {"step": 2, "signal": "Summary"}]}, indent=2
        )
        + "\n```\nLet me know if you need more."
    )
    assert _signals(parse_labels(text, 2, tax)) == [CONTRAST, CONCLUSION]


def test_parse_json_in_prose_without_fence(tax: Taxonomy) -> None:
    text = 'The labels are {"labels": [{"step": 1, "signal": "Reasoning"}]} as you asked.'
    assert _signals(parse_labels(text, 1, tax)) == [REASONING]


def test_parse_compact_json_list(tax: Taxonomy) -> None:
    text = '["Contrast", "<sig:verify>", "hypothesis and exploration", "RESTATEMENT AND CLARIFICATION"]'
    assert _signals(parse_labels(text, 4, tax)) == [CONTRAST, VERIFY, HYPOTHESIS, RESTATE]


def test_parse_compact_lines(tax: Taxonomy) -> None:
    text = (
        "1: Contrast and Concession\n"
        "2. Addition\n"
        "Step 3: sig:reasoning\n"
        "[4] Conclusion and Summary - it states the final answer\n"
        "**5:** Verification & Reflection\n"
    )
    parsed = parse_labels(text, 5, tax)
    assert _signals(parsed) == [CONTRAST, ADDITION, REASONING, CONCLUSION, VERIFY]
    assert parsed[3].rationale == "it states the final answer"


def test_parse_zero_based_numbering_is_accepted(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 0, "signal": CONTRAST}, {"step": 1, "signal": ADDITION}]})
    assert _signals(parse_labels(text, 2, tax)) == [CONTRAST, ADDITION]


def test_parse_ignores_a_think_block(tax: Taxonomy) -> None:
    text = '<think>step 1 is probably ["Addition"]</think>\n' + _json_answer([CONTRAST])
    assert _signals(parse_labels(text, 1, tax)) == [CONTRAST]


def test_parse_missing_step(tax: Taxonomy) -> None:
    text = _json_answer([CONTRAST, ADDITION, REASONING, CONCLUSION])
    with pytest.raises(LabelParseError, match=r"missing step\(s\): 5-6$"):
        parse_labels(text, 6, tax)


def test_parse_duplicate_step(tax: Taxonomy) -> None:
    text = json.dumps(
        {"labels": [{"step": 1, "signal": CONTRAST}, {"step": 1, "signal": ADDITION}, {"step": 3, "signal": ADDITION}]}
    )
    with pytest.raises(LabelParseError, match=r"step\(s\) labeled more than once: 1; missing step\(s\): 2"):
        parse_labels(text, 3, tax)


def test_parse_unknown_label(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 1, "signal": CONTRAST}, {"step": 2, "signal": "Musing"}]})
    with pytest.raises(
        LabelParseError, match=r"step 2: unknown signal 'Musing'.*valid signals: Contrast and Concession"
    ):
        parse_labels(text, 2, tax)


def test_parse_error_lists_at_most_five_problems(tax: Taxonomy) -> None:
    text = "\n".join(f"{i}. The total is {i * 12} apples." for i in range(1, 9))
    with pytest.raises(LabelParseError) as err:
        parse_labels(text, 8, tax)
    msg = str(err.value)
    assert msg.count("unknown signal") == 5 and "and 3 more" in msg and msg.endswith("Restatement and Clarification")


def test_parse_ambiguous_prefix_is_unknown(tax: Taxonomy) -> None:
    assert resolve_signal("Con", tax) is None  # Contrast... or Conclusion...
    with pytest.raises(LabelParseError, match="step 1: unknown signal 'Con'"):
        parse_labels('["Con"]', 1, tax)


def test_parse_out_of_range_step(tax: Taxonomy) -> None:
    text = json.dumps({"labels": [{"step": 1, "signal": CONTRAST}, {"step": 7, "signal": ADDITION}]})
    with pytest.raises(LabelParseError, match=r"step 7 is out of range 1..2; missing step\(s\): 2"):
        parse_labels(text, 2, tax)


def test_parse_wrong_count_in_list(tax: Taxonomy) -> None:
    with pytest.raises(LabelParseError, match="got 2 labels for 3 steps"):
        parse_labels('["Contrast", "Addition"]', 3, tax)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty answer"),
        ("I think these steps are fine.", "no labels found"),
        ('{"labels": [{"step": 1, "signal": "Contrast and Concession"}, {"step": 2, "sig', "no complete JSON answer"),
    ],
)
def test_parse_garbage(tax: Taxonomy, text: str, message: str) -> None:
    with pytest.raises(LabelParseError, match=message):
        parse_labels(text, 2, tax)


@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("contrast", CONTRAST),
        ("Conclusion", CONCLUSION),
        ("  **Verification and Reflection**. ", VERIFY),
        ("<sig:hypothesis>", HYPOTHESIS),
        ("Addition & Elaboration", ADDITION),
        ("Clarification", RESTATE),
        ("reasoning and analysis step", None),
        ("and", None),
        ("", None),
    ],
)
def test_resolve_signal(tax: Taxonomy, label: str, name: str | None) -> None:
    assert resolve_signal(label, tax) == name


# ---------------------------------------------------------------------------------------------
# labeling traces


def _traces() -> list[tuple[str, str, str, list[str]]]:
    return [
        ("r1", "p1", QUESTION, split_steps(R1_TRACE, SegmentationConfig())),
        ("qwq", "p2", "What is the area of the path?", split_steps(QWQ_TRACE, SegmentationConfig())),
    ]


def test_scripted_backend_satisfies_the_protocol() -> None:
    assert isinstance(ScriptedBackend({}), LLMBackend)


def test_keyword_method_does_not_call_the_backend(tax: Taxonomy) -> None:
    backend = ScriptedBackend({})
    stats = LabelStats()
    out = list(
        label_traces(_traces(), tax, backend, sampling=SAMPLING, cfg=LabelingConfig(method="keyword"), stats=stats)
    )
    assert backend.calls == []
    r1 = out[0]
    assert [r.signal for r in r1] == [p or REASONING for p in R1_PRELABELS]
    assert [r.source for r in r1] == ["fallback" if p is None else "keyword" for p in R1_PRELABELS]
    assert [r.cue for r in r1] == R1_CUES
    assert [r.step_index for r in r1] == list(range(10))
    assert stats.traces == 2 and stats.steps == 16 and stats.keyword_steps == 9 + 5
    assert stats.llm_ok == 0


def test_no_backend_means_keyword_labels(tax: Taxonomy) -> None:
    out = list(label_traces(_traces()[:1], tax, None, sampling=SAMPLING, cfg=_llm_cfg()))
    assert [r.signal for r in out[0]] == [p or REASONING for p in R1_PRELABELS]


def test_llm_valid_json_is_one_batched_call(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"r1": [_json_answer(R1_GOLD)], "qwq": ["```json\n" + _json_answer(QWQ_GOLD) + "\n```"]})
    stats = LabelStats()
    out = list(label_traces(_traces(), tax, backend, sampling=SAMPLING, cfg=_llm_cfg(), stats=stats))
    assert len(backend.calls) == 1 and [r.request_id for r in backend.calls[0]] == ["r1:label", "qwq:label"]
    r1, qwq = out
    assert [r.signal for r in r1] == R1_GOLD
    assert [r.signal for r in qwq] == QWQ_GOLD
    assert all(r.source == "llm" for r in r1 + qwq)
    assert [r.prelabel for r in r1] == R1_PRELABELS  # the pre-label is kept beside the final label
    assert [r.cue for r in r1] == R1_CUES
    assert r1[0].trace_id == "r1" and r1[0].problem_id == "p1" and qwq[0].problem_id == "p2"
    assert stats.llm_ok == 2 and stats.retried == 0 and stats.fallback_traces == 0
    # R1: 9 pre-labeled steps, the LLM changed one (step 4 "Hmm" -> verification);
    # QwQ: 5 pre-labeled steps, the LLM changed one (step 4 "Hmm... so" -> reasoning)
    assert stats.prelabel_checked == 9 + 5 and stats.prelabel_agreed == 8 + 4


def test_llm_compact_list_format(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"qwq": ["\n".join(f"{i}: {s}" for i, s in enumerate(QWQ_GOLD, 1))]})
    (qwq,) = label_traces(_traces()[1:], tax, backend, sampling=SamplingConfig(max_new_tokens=40), cfg=_llm_cfg())
    assert [r.signal for r in qwq] == QWQ_GOLD
    # 6 JSON entries do not fit 40 new tokens: the prompt asks for the compact form, without schema
    req = backend.calls[0][0]
    assert req.json_schema is None and "exactly 6 lines" in req.messages[-1]["content"]


def test_llm_invalid_then_valid_is_retried_with_the_error(tax: Taxonomy) -> None:
    bad = _json_answer(QWQ_GOLD[:4])  # steps 5 and 6 missing
    backend = ScriptedBackend({"r1": [_json_answer(R1_GOLD)], "qwq": [bad, _json_answer(QWQ_GOLD)]})
    stats = LabelStats()
    out = list(
        label_traces(_traces(), tax, backend, sampling=SAMPLING, cfg=_llm_cfg(retries_on_invalid=1), stats=stats)
    )
    assert len(backend.calls) == 2
    (retry,) = backend.calls[1]  # only the failed trace is retried
    assert retry.request_id == "qwq:label:retry1"
    assert retry.messages[:2] == backend.calls[0][1].messages
    assert retry.messages[2] == {"role": "assistant", "content": bad}
    assert "missing step(s): 5-6" in retry.messages[3]["content"]
    assert [r.signal for r in out[1]] == QWQ_GOLD and all(r.source == "llm" for r in out[1])
    assert stats.llm_ok == 2 and stats.retried == 1 and stats.fallback_traces == 0


def test_llm_invalid_twice_falls_back(tax: Taxonomy) -> None:
    backend = ScriptedBackend(
        {"r1": [_json_answer(R1_GOLD)], "qwq": ["1: Musing\n2: Pondering", "I cannot label these steps."]}
    )
    stats = LabelStats()
    out = list(
        label_traces(_traces(), tax, backend, sampling=SAMPLING, cfg=_llm_cfg(retries_on_invalid=1), stats=stats)
    )
    assert len(backend.calls) == 2
    assert "step 1: unknown signal 'Musing'" in backend.calls[1][0].messages[3]["content"]
    qwq = out[1]
    steps = [r.text for r in qwq]
    assert [r.signal for r in qwq] == [fallback_label(s, tax) for s in steps]
    assert all(r.source == "fallback" for r in qwq)
    assert [r.prelabel for r in qwq] == QWQ_PRELABELS
    assert all(r.source == "llm" for r in out[0])
    assert stats.llm_ok == 1 and stats.retried == 1 and stats.fallback_traces == 1
    assert stats.errors == [
        "qwq: no labels found: expected JSON {\"labels\": [...]} or lines '<step>: <signal>' for 6 steps"
    ]


def test_no_retries_configured_falls_back_at_once(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"qwq": ['["Contrast"]']})
    stats = LabelStats()
    (qwq,) = label_traces(
        _traces()[1:], tax, backend, sampling=SAMPLING, cfg=_llm_cfg(retries_on_invalid=0), stats=stats
    )
    assert len(backend.calls) == 1
    assert all(r.source == "fallback" for r in qwq)
    assert stats.fallback_traces == 1 and stats.retried == 0


def test_backend_error_is_retried(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"qwq": [Completion("x", error="HTTP 503"), _json_answer(QWQ_GOLD)]})
    (qwq,) = label_traces(_traces()[1:], tax, backend, sampling=SAMPLING, cfg=_llm_cfg())
    assert [r.signal for r in qwq] == QWQ_GOLD
    assert backend.calls[1][0].messages == backend.calls[0][0].messages  # nothing to quote back


def test_backend_exception_propagates(tax: Taxonomy) -> None:
    def boom(req: ChatRequest) -> str:
        raise ConnectionError("server down")

    with pytest.raises(ConnectionError, match="server down"):
        list(label_traces(_traces(), tax, ScriptedBackend(boom), sampling=SAMPLING, cfg=_llm_cfg()))


def test_truncated_answer_retries_in_compact_form(tax: Taxonomy) -> None:
    cut = Completion("x", text=_json_answer(QWQ_GOLD)[:70], finish_reason="length")
    backend = ScriptedBackend({"qwq": [cut, "\n".join(f"{i}: {s}" for i, s in enumerate(QWQ_GOLD, 1))]})
    (qwq,) = label_traces(_traces()[1:], tax, backend, sampling=SAMPLING, cfg=_llm_cfg())
    retry = backend.calls[1][0]
    assert retry.json_schema is None and "exactly 6 lines" in retry.messages[-1]["content"]
    assert "cut off at the length limit" in retry.messages[-1]["content"]
    assert [r.signal for r in qwq] == QWQ_GOLD


def test_zero_step_trace_yields_empty_list_and_no_request(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"qwq": [_json_answer(QWQ_GOLD)]})
    traces = [("empty", "p0", "Q?", []), _traces()[1]]
    out = list(label_traces(traces, tax, backend, sampling=SAMPLING, cfg=_llm_cfg()))
    assert out[0] == [] and len(out[1]) == 6
    assert [r.request_id for r in backend.calls[0]] == ["qwq:label"]


def test_duplicate_trace_ids_are_rejected(tax: Taxonomy) -> None:
    t = _traces()[1]
    with pytest.raises(ValueError, match="trace ids must be unique within one call: qwq"):
        list(label_traces([t, t], tax, ScriptedBackend({}), sampling=SAMPLING, cfg=_llm_cfg()))


def test_huge_step_is_kept_whole_in_the_record(tax: Taxonomy) -> None:
    huge = "So " + "7 * 6 = 42. " * 3000
    backend = ScriptedBackend(lambda req: '["Reasoning", "Conclusion"]')
    (recs,) = label_traces([("h", "p", "Q?", [huge, "Thus 42."])], tax, backend, sampling=SAMPLING, cfg=_llm_cfg())
    assert recs[0].text == huge
    assert len(backend.calls[0][0].messages[-1]["content"]) < 5000
    assert [r.signal for r in recs] == [REASONING, CONCLUSION]


def test_rationale_is_stored(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"qwq": [_json_answer(QWQ_GOLD, rationale=True)]})
    (qwq,) = label_traces(_traces()[1:], tax, backend, sampling=SAMPLING, cfg=_llm_cfg(with_rationale=True))
    assert [r.rationale for r in qwq] == [f"reason {i}" for i in range(1, 7)]
    assert '"rationale"' in backend.calls[0][0].messages[-1]["content"]


def test_counter_stats_accumulate_over_calls(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"qwq": [_json_answer(QWQ_GOLD), "nonsense", "still nonsense"]})
    stats: Counter[str] = Counter()
    list(label_traces(_traces()[1:], tax, backend, sampling=SAMPLING, cfg=_llm_cfg(), stats=stats))
    list(label_traces(_traces()[1:], tax, backend, sampling=SAMPLING, cfg=_llm_cfg(), stats=stats))
    assert stats["traces"] == 2 and stats["steps"] == 12 and stats["keyword_steps"] == 10
    assert stats["llm_ok"] == 1 and stats["retried"] == 1 and stats["fallback_traces"] == 1
    assert "errors" not in stats


# ---------------------------------------------------------------------------------------------
# statistics


def test_transition_matrix() -> None:
    names = ["A", "B", "C"]
    m = transition_matrix([["A", "B", "B", "C"], ["C", "A"], ["B"], []], names)
    assert m == [
        [0, 1, 0],  # A->B
        [0, 1, 1],  # B->B, B->C
        [1, 0, 0],  # C->A
    ]
    with pytest.raises(ValueError, match="unknown signal 'D'"):
        transition_matrix([["A", "D"]], names)


def test_cohens_kappa_hand_computed() -> None:
    a = ["x", "x", "x", "y", "y", "y", "x", "y", "x", "x"]
    b = ["x", "x", "y", "y", "y", "x", "x", "y", "x", "y"]
    # p_o = 7/10; p_e = (6*5 + 4*5) / 100 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    assert cohens_kappa(a, b) == pytest.approx(0.4)


def test_cohens_kappa_three_categories() -> None:
    a = ["A", "A", "B", "B", "C", "C"]
    b = ["A", "B", "B", "B", "C", "A"]
    # p_o = 4/6; p_e = (2*2 + 2*3 + 2*1) / 36 = 12/36; kappa = (4/6 - 1/3) / (2/3) = 0.5
    assert cohens_kappa(a, b) == pytest.approx(0.5)


def test_cohens_kappa_edges() -> None:
    assert cohens_kappa(["A", "B", "A"], ["A", "B", "A"]) == 1.0
    assert cohens_kappa(["A", "A"], ["A", "A"]) == 1.0
    assert cohens_kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="differ in length"):
        cohens_kappa(["A"], ["A", "B"])
    with pytest.raises(ValueError, match="empty"):
        cohens_kappa([], [])


def test_label_quality_report(tax: Taxonomy) -> None:
    backend = ScriptedBackend({"r1": [_json_answer(R1_GOLD)], "qwq": ["garbage", "garbage"]})
    records = [r for recs in label_traces(_traces(), tax, backend, sampling=SAMPLING, cfg=_llm_cfg()) for r in recs]
    report = label_quality_report(records, tax)
    json.dumps(report)  # JSON-able
    assert report["traces"] == 2 and report["steps"] == 16
    assert report["source_counts"] == {"llm": 10, "fallback": 6}
    assert report["keyword_coverage"] == pytest.approx(14 / 16)
    # only the R1 trace was LLM-labeled: 9 pre-labels checked, 8 kept
    assert report["prelabel_checked"] == 9
    assert report["prelabel_agreement"] == pytest.approx(8 / 9)
    expected = R1_GOLD + [p or REASONING for p in QWQ_PRELABELS]
    assert report["signal_counts"] == {k: expected.count(k) for k in NAMES}
    m = report["transitions"]
    assert sum(map(sum, m)) == 9 + 5
    # contrast -> verify: R1 steps 3 -> 4 and QwQ (fallback labels) steps 4 -> 5
    assert m[NAMES.index(CONTRAST)][NAMES.index(VERIFY)] == 2
    assert m[NAMES.index(VERIFY)][NAMES.index(REASONING)] == 1  # R1 steps 4 -> 5
    assert report["first_signal_counts"] == {RESTATE: 2}
