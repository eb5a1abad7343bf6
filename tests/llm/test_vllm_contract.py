"""Every request rscaffold sends to vLLM uses only what the pinned vLLM version declares.

vLLM's OpenAI-compatible server ignores request fields it does not know (it only logs them), so a
misspelt field would silently change results. The fields each vLLM request class declares are
extracted from the pinned vLLM wheel's source (scripts/extract_vllm_contract.py) into
rscaffold/llm/vllm_contract.json; these tests capture the bodies rscaffold really sends (through
its public functions, to local HTTP servers that record them) and the arguments the in-process
engine backend passes, and check every key against that file: declared, and of the declared type.
The last test re-extracts the file from the pinned wheel, so that the committed file is the
pinned version's.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeOpenAIServer

from rscaffold.config import BackendConfig, SamplingConfig

REPO = Path(__file__).resolve().parents[2]
CONTRACT_PATH = REPO / "rscaffold" / "llm" / "vllm_contract.json"
CONTRACT = json.loads(CONTRACT_PATH.read_text())


# ---------------------------------------------------------------------------------------------
# checking a value against a declared annotation


def _literal_values(node: ast.AST) -> list[Any]:
    elts = node.elts if isinstance(node, ast.Tuple) else [node]
    return [ast.literal_eval(e) for e in elts]


def conforms(value: Any, annotation: str | ast.AST, contract: dict[str, Any] = CONTRACT) -> bool:
    """Whether a JSON value (or a stand-in object for a vLLM class, see ``StandIn``) is accepted
    by pydantic for ``annotation`` (lax mode: an int is a float; a dict key arrives as a string).
    A type that is not vLLM's (openai's message types) is not checked."""
    node = ast.parse(annotation, mode="eval").body if isinstance(annotation, str) else annotation
    if isinstance(node, ast.Constant):
        if node.value is None:
            return value is None
        if isinstance(node.value, str):  # a forward reference
            return conforms(value, node.value, contract)
        return value == node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return conforms(value, node.left, contract) or conforms(value, node.right, contract)
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = ast.unparse(node).split(".")[-1]
        if isinstance(value, StandIn):
            return value.model == name
        simple = {
            "Any": lambda v: True,
            "object": lambda v: True,
            "None": lambda v: v is None,
            "str": lambda v: isinstance(v, str),
            "bytes": lambda v: isinstance(v, str),
            "bool": lambda v: isinstance(v, bool),
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "dict": lambda v: isinstance(v, dict),
            "Mapping": lambda v: isinstance(v, dict),
            "list": lambda v: isinstance(v, list),
            "Sequence": lambda v: isinstance(v, list),
            "tuple": lambda v: isinstance(v, list),
            "set": lambda v: isinstance(v, list),
        }
        if name in simple:
            return simple[name](value)
        if name in contract["models"]:
            return isinstance(value, dict) and not body_violations(value, name, contract)
        if name in contract["aliases"]:
            return conforms(value, contract["aliases"][name], contract)
        if name in contract["enums"]:
            return value in contract["enums"][name]
        return True  # not vLLM's type
    if isinstance(node, ast.Subscript):
        base = ast.unparse(node.value).split(".")[-1]
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Optional":
            return value is None or conforms(value, args[0], contract)
        if base == "Union":
            return any(conforms(value, a, contract) for a in args)
        if base == "Literal":
            return value in _literal_values(node.slice)
        if base in ("Annotated", "Required", "NotRequired", "ReadOnly"):
            return conforms(value, args[0], contract)
        if base in ("list", "List", "Sequence", "set", "Set", "Iterable", "tuple", "Tuple"):
            items = [a for a in args if not (isinstance(a, ast.Constant) and a.value is Ellipsis)]
            return isinstance(value, list) and all(any(conforms(v, a, contract) for a in items) for v in value)
        if base in ("dict", "Dict", "Mapping"):
            if not isinstance(value, dict):
                return False
            key_type = ast.unparse(args[0])
            keys_ok = all(
                re.fullmatch(r"-?\d+", k) is not None if key_type == "int" else conforms(k, args[0], contract)
                for k in value
            )
            return keys_ok and all(conforms(v, args[1], contract) for v in value.values())
        return True  # a generic that is not vLLM's
    return True


def body_violations(body: dict[str, Any], model: str, contract: dict[str, Any] = CONTRACT) -> list[str]:
    """What in ``body`` the vLLM class ``model`` does not declare, or declares with another type."""
    fields = contract["models"][model]
    out = []
    for key, value in body.items():
        if key not in fields:
            out.append(f"{model} has no field {key!r} (vLLM {contract['vllm_version']} would ignore it)")
        elif not conforms(value, fields[key], contract):
            out.append(f"{model}.{key} is {fields[key]}, but {value!r} was sent")
    return out


def test_the_checker_refuses_unknown_fields_and_wrong_types():
    assert (
        body_violations(
            {"prompt": "x", "max_tokens": 3, "stop": ["\n\n"], "logit_bias": {"7": -100}}, "CompletionRequest"
        )
        == []
    )
    assert body_violations({"guided_regex": "a|b"}, "CompletionRequest")  # removed in vLLM 0.12
    assert body_violations({"max_tokens": "3"}, "CompletionRequest")
    assert body_violations({"allowed_token_ids": [1, "2"]}, "CompletionRequest")
    assert body_violations({"skip_special_tokens": 0}, "CompletionRequest")
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert body_violations({"response_format": rf}, "ChatCompletionRequest") == []
    bad = {"type": "json_schema", "json_schema": {"name": "x", "json_schemaa": {}}}
    assert body_violations({"response_format": bad}, "ChatCompletionRequest")
    assert body_violations({"response_format": {"type": "xml"}}, "ChatCompletionRequest")


# ---------------------------------------------------------------------------------------------
# the pin


def test_the_contract_is_the_pinned_vllm_version():
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"vllm==([^"]+)"', pyproject)
    assert pins == [CONTRACT["vllm_version"]], (
        f"pyproject's vllm extra pins {pins}, the contract is vLLM {CONTRACT['vllm_version']}: "
        "rerun scripts/extract_vllm_contract.py on the pinned wheel"
    )
    assert {"CompletionRequest", "ChatCompletionRequest", "SamplingParams", "StructuredOutputsParams"} <= set(
        CONTRACT["models"]
    )


# ---------------------------------------------------------------------------------------------
# an OpenAI-compatible vLLM teacher and labeler (chat completions)


@pytest.fixture
def chat_server():
    server = FakeOpenAIServer()
    yield server
    server.close()


def _openai(base_url: str):
    from rscaffold.llm.openai_api import OpenAIBackend

    return OpenAIBackend(BackendConfig(backend="openai", model="teacher", base_url=base_url, max_retries=0))


def test_teacher_chat_requests_use_only_declared_fields(chat_server):
    from rscaffold.config import TeacherConfig
    from rscaffold.records import ProblemRecord
    from rscaffold.stages.teacher import build_request

    problem = ProblemRecord(problem_id="p1", split="train", source="t", question="2+2?", gold_answer="4")
    req = build_request(problem, TeacherConfig())
    req.n = 2  # several samples per request: n is sent too
    backend = _openai(chat_server.base_url)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=50)):
        assert all(c.ok for c in backend.generate([req], sampling))
    assert len(chat_server.bodies) == 2
    assert {"messages", "model", "seed", "max_tokens", "temperature", "top_p", "n"} <= set().union(*chat_server.bodies)
    for body in chat_server.bodies:
        assert body_violations(body, "ChatCompletionRequest") == []


def test_labeler_structured_requests_use_only_declared_fields(chat_server):
    from rscaffold.labeling.prompts import build_label_request, build_retry_request
    from rscaffold.labeling.taxonomy import load_taxonomy
    from rscaffold.llm.base import Completion
    from rscaffold.paths import data_dir

    tax = load_taxonomy(data_dir() / "signals.yaml")
    steps = ["First add.", "So the answer is 4."]
    reqs = [
        build_label_request("t1", "2+2?", steps, prelabels=[None, "conclude"], tax=tax, with_rationale=with_rationale)
        for with_rationale in (False, True)
    ]
    reqs.append(build_label_request("t2", "2+2?", steps, prelabels=[None, None], tax=tax, answer_format="lines"))
    reqs.append(
        build_retry_request(
            reqs[0], Completion("t1:label", text="{}"), "no labels", n_steps=2, tax=tax, with_rationale=False, attempt=1
        )
    )
    chat_server.actions.extend(("messages", [{"content": "{}"}]) for _ in reqs)
    out = _openai(chat_server.base_url).generate(reqs, SamplingConfig(max_new_tokens=64))
    assert all(c.ok for c in out), [c.error for c in out]
    formats = [b["response_format"] for b in chat_server.bodies if "response_format" in b]
    assert len(formats) == 3 and all(f["type"] == "json_schema" for f in formats)
    for body in chat_server.bodies:
        assert body_violations(body, "ChatCompletionRequest") == []


def test_a_wrong_field_in_a_chat_body_is_caught(chat_server, monkeypatch):
    """The check above is not vacuous: a misspelt structured-output field is reported."""
    import rscaffold.llm.openai_api as openai_api
    from rscaffold.llm.base import ChatRequest

    def misspelt(schema):
        return {"type": "json_schema", "json_schema": {"name": "x", "json_schema": schema}}

    monkeypatch.setattr(openai_api, "response_format_for", misspelt)
    req = ChatRequest("r", [{"role": "user", "content": "hi"}], json_schema={"type": "object"})
    _openai(chat_server.base_url).generate([req], SamplingConfig())
    assert body_violations(chat_server.bodies[-1], "ChatCompletionRequest")


# ---------------------------------------------------------------------------------------------
# a served student (text completions: plain, guided signal and step requests)


@pytest.fixture(scope="module")
def completion_bodies(random_student):
    """Every body a served student's plain and guided decoding (gated, pruned, step-capped)
    sends, recorded by a TEST-ONLY fake of vLLM's completions dialect (tests/serving_fake.py)."""
    from serving_fake import fake_vllm_server

    from rscaffold.decoding.policy import GuidedSettings
    from rscaffold.decoding.served import generate_served
    from rscaffold.llm import create_backend

    questions = ["Sara reads 12 pages a day. How many pages does she read in a week?"]
    with fake_vllm_server(random_student.model, random_student.tokenizer) as server:
        backend = create_backend(
            BackendConfig(backend="openai", model="student", base_url=server.base_url, max_retries=0)
        )
        generate_served(backend, random_student, questions, mode="plain", max_new_tokens=8)
        settings = GuidedSettings(confidence_threshold=0.5, prune_signals=("elaborate",), max_step_tokens=4)
        generate_served(backend, random_student, questions, mode="guided", max_new_tokens=12, guided=settings)
        return list(server.bodies)


def test_served_student_requests_use_only_declared_fields(completion_bodies):
    sent = set().union(*completion_bodies)
    # plain, signal (allowed_token_ids, logprobs) and step (stop_token_ids, stop, logit_bias) requests
    assert {"prompt", "max_tokens", "allowed_token_ids", "logprobs", "stop_token_ids", "stop", "logit_bias"} <= sent
    assert {"skip_special_tokens", "add_special_tokens", "seed", "temperature"} <= sent
    for body in completion_bodies:
        assert body_violations(body, "CompletionRequest") == []


def test_the_server_options_served_decoding_needs_exist():
    """The recommended ``vllm serve ... --logprobs-mode processed_logprobs`` is an option of the
    pinned version, and signal requests ask for no more log-probabilities than it returns by default."""
    from rscaffold.decoding.served import MAX_LOGPROBS

    assert "processed_logprobs" in CONTRACT["server"]["logprobs_modes"]
    assert MAX_LOGPROBS <= CONTRACT["server"]["max_logprobs_default"]


# ---------------------------------------------------------------------------------------------
# the in-process engine (vllm.LLM, SamplingParams, StructuredOutputsParams)


class StandIn:
    """TEST-ONLY stand-in for an instance of a vLLM class (vLLM cannot run here): it refuses
    keyword arguments the class does not declare in the pinned version, or of the wrong type."""

    def __init__(self, model: str, declared: dict[str, str] | list[str], kwargs: dict[str, Any]):
        self.model, self.kwargs = model, kwargs
        for key, value in kwargs.items():
            if key not in declared:
                raise TypeError(f"{model} has no argument {key!r} in vLLM {CONTRACT['vllm_version']}")
            if isinstance(declared, dict) and not conforms(value, declared[key]):
                raise TypeError(f"{model}.{key} is {declared[key]}, got {value!r}")


def contract_vllm_module(calls: list[StandIn]):
    """A TEST-ONLY ``vllm`` module whose classes check their arguments against the contract."""
    from types import ModuleType, SimpleNamespace

    models, sigs = CONTRACT["models"], CONTRACT["signatures"]

    def stand_in(name, declared):
        def make(*args, **kwargs):
            assert not args, f"{name} takes keyword arguments only here"
            calls.append(StandIn(name, declared, kwargs))
            return calls[-1]

        return make

    class LLM:
        def __init__(self, **kwargs):
            calls.append(StandIn("LLM", sigs["LLM.__init__"] + sigs["EngineArgs"], kwargs))

        def chat(self, messages, **kwargs):
            calls.append(StandIn("LLM.chat", sigs["LLM.chat"], kwargs))
            return [
                SimpleNamespace(
                    prompt_token_ids=[1, 2],
                    outputs=[
                        SimpleNamespace(index=k, text='{"a": 1}', token_ids=[3], finish_reason="stop")
                        for k in range(p.kwargs.get("n", 1))
                    ],
                )
                for p in kwargs["sampling_params"]
            ]

    module = ModuleType("vllm")
    module.LLM = LLM
    module.SamplingParams = stand_in("SamplingParams", models["SamplingParams"])
    module.sampling_params = SimpleNamespace(
        StructuredOutputsParams=stand_in("StructuredOutputsParams", models["StructuredOutputsParams"])
    )
    return module


def test_in_process_engine_passes_only_declared_arguments():
    from rscaffold.llm.base import ChatRequest
    from rscaffold.llm.vllm_engine import VLLMBackend

    calls: list[StandIn] = []
    module = contract_vllm_module(calls)
    with pytest.raises(TypeError, match="guided_decoding"):  # the stand-in refuses what vLLM removed
        module.SamplingParams(guided_decoding=None)
    cfg = BackendConfig(backend="vllm", model="some/model", tokenizer="some/tokenizer", tensor_parallel_size=2)
    backend = VLLMBackend(cfg, vllm_module=module)
    msgs = [{"role": "user", "content": "hi"}]
    reqs = [
        ChatRequest("plain", msgs, n=2),
        ChatRequest("json", msgs, json_schema={"type": "object"}),
        ChatRequest("lines", msgs, line_choices=[["1: a", "1: b"]]),
    ]
    out = backend.generate(reqs, SamplingConfig(temperature=0.7, top_p=0.9))
    assert len(out) == 4 and all(c.ok for c in out), [c.error for c in out]
    made = {c.model for c in calls}
    assert made == {"LLM", "LLM.chat", "SamplingParams", "StructuredOutputsParams"}
    structured = [c.kwargs for c in calls if c.model == "StructuredOutputsParams"]
    assert structured == [{"json": {"type": "object"}}, {"regex": "(1:\\ a|1:\\ b)"}]
    # and every SamplingParams carried its structured output (none was dropped by a TypeError fallback)
    assert sum("structured_outputs" in c.kwargs for c in calls if c.model == "SamplingParams") == 2


# ---------------------------------------------------------------------------------------------
# the committed contract is the pinned wheel's


def _pinned_version() -> str:
    return re.findall(r'"vllm==([^"]+)"', (REPO / "pyproject.toml").read_text())[0]


def _pinned_wheel() -> Path:
    """The pinned vLLM wheel: ``$RSCAFFOLD_VLLM_WHEEL`` when set, else downloaded once (about
    240 MB, no dependencies) into ``$RSCAFFOLD_VLLM_WHEEL_DIR`` (default
    ``~/.cache/rscaffold/vllm-wheels``) and reused from there."""
    given = os.environ.get("RSCAFFOLD_VLLM_WHEEL")
    if given == "skip":
        pytest.skip("RSCAFFOLD_VLLM_WHEEL=skip")
    if given:
        return Path(given)
    version = _pinned_version()
    folder = Path(os.environ.get("RSCAFFOLD_VLLM_WHEEL_DIR", Path.home() / ".cache" / "rscaffold" / "vllm-wheels"))
    found = sorted(folder.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"vllm=={version}"]
    try:
        done = subprocess.run([*cmd, "-d", str(folder)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"the vLLM {version} wheel could not be downloaded within 600 s (set RSCAFFOLD_VLLM_WHEEL)")
    found = sorted(folder.glob(f"vllm-{version}-*.whl"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"the vLLM {version} wheel cannot be downloaded here ({tail[0]}); set RSCAFFOLD_VLLM_WHEEL")
    return found[0]


def test_the_committed_contract_is_what_the_pinned_wheel_declares(tmp_path):
    wheel = _pinned_wheel()
    spec = importlib.util.spec_from_file_location(
        "extract_vllm_contract", REPO / "scripts" / "extract_vllm_contract.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "contract.json"
    assert script.main([str(wheel), "--out", str(out)]) == 0
    fresh = json.loads(out.read_text())
    assert fresh["vllm_version"] == _pinned_version()
    assert fresh == CONTRACT, "rscaffold/llm/vllm_contract.json is stale: rerun scripts/extract_vllm_contract.py"
