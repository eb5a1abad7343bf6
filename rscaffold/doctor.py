"""Preflight checks of a configuration, before a run spends time or money: each configured
endpoint (reachable, the model served, the features the stages that use it need, each with one
tiny real request) and the local side (GPU where models load locally, vLLM where configured, disk
space in the artifacts directory against a rough estimate of the run's outputs).

Every check is a :class:`Check`: ``pass``, ``warn`` or ``fail``, with what was seen and, when it
did not pass, what to do. :func:`run_checks` runs them all for a config. The Prefect API check
lives with the flows (``rscaffold_flows``): this library does not use Prefect.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rscaffold.config import BackendConfig, PipelineConfig

Status = Literal["pass", "warn", "fail"]
# Seconds one tiny check request may take (a cold server may load the model on the first one).
REQUEST_TIMEOUT_S = 120.0
# Seconds listing the served models may take: a server that is up answers at once, one that
# accepts connections and never answers (hung, or another program on the port) fails quickly.
REACHABLE_TIMEOUT_S = 15.0
# The schema of the structured-output probe: what a server that honours response_format returns.
PROBE_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Check:
    """One preflight check's outcome."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclass(frozen=True)
class Endpoint:
    """A configured OpenAI-compatible endpoint and what the stages using it need of it."""

    role: str  # the config section naming it, e.g. "teacher.llm"
    llm: BackendConfig
    needs: frozenset[str]  # of "structured_output", "seed", "logprobs", "allowed_token_ids"
    model_known: bool = True  # False: the model name is filled in per student at run time


def endpoints(cfg: PipelineConfig) -> list[Endpoint]:
    """The OpenAI-compatible endpoints ``cfg`` sends requests to that run before the pipeline does
    (a server the evaluation starts itself is checked through its command, not here)."""
    out: list[Endpoint] = []
    if cfg.teacher.llm.backend == "openai":
        out.append(Endpoint("teacher.llm", cfg.teacher.llm, frozenset({"seed"})))
    if cfg.labeling.method == "llm" and cfg.labeling.llm is not None and cfg.labeling.llm.backend == "openai":
        out.append(Endpoint("labeling.llm", cfg.labeling.llm, frozenset({"structured_output"})))
    elif cfg.labeling.method == "llm" and cfg.teacher.llm.backend == "openai":
        out[0] = Endpoint("teacher.llm", cfg.teacher.llm, frozenset({"seed", "structured_output"}))
    ev = cfg.evaluation.llm
    if ev is not None and ev.backend == "openai" and cfg.evaluation.server is None and ev.base_url:
        needs = {"logprobs", "allowed_token_ids"} if _guided_served(cfg) else set()
        known = "{" not in ev.model
        out.append(Endpoint("evaluation.llm", ev, frozenset(needs), model_known=known))
    return out


def _guided_served(cfg: PipelineConfig) -> bool:
    served = cfg.evaluation.served_students
    return "scaffolded" in cfg.training.students and (served is None or "scaffolded" in served)


def _client(llm: BackendConfig):
    import openai  # core dependency; imported here so that importing this module stays cheap

    return openai.OpenAI(
        base_url=llm.base_url,
        api_key=os.environ.get(llm.api_key_env) or "EMPTY",
        max_retries=0,
        timeout=min(llm.request_timeout_s, REQUEST_TIMEOUT_S),
    )


def _url(llm: BackendConfig) -> str:
    return llm.base_url or os.environ.get("OPENAI_BASE_URL") or "(OPENAI_BASE_URL unset)"


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:200]}"


def check_endpoint(ep: Endpoint) -> list[Check]:
    """Reachable, the model served, then one tiny request per feature ``ep.needs``."""
    llm, url, role = ep.llm, _url(ep.llm), ep.role
    client = _client(llm)
    try:
        served = [
            m.id for m in client.with_options(timeout=min(llm.request_timeout_s, REACHABLE_TIMEOUT_S)).models.list()
        ]
    except Exception as err:  # any failure to list models means we cannot go on with this endpoint
        return [
            Check(
                f"{role}: reachable",
                "fail",
                f"{url}: {_error(err)}",
                f"start the server, or set {role}.base_url to where it listens (and the API key in "
                f"${llm.api_key_env} if it needs one)",
            )
        ]
    checks = [Check(f"{role}: reachable", "pass", f"{url} answers ({len(served)} model(s) served)")]
    if ep.model_known:
        if llm.model in served:
            checks.append(Check(f"{role}: model served", "pass", llm.model))
        else:
            checks.append(
                Check(
                    f"{role}: model served",
                    "fail",
                    f"{llm.model!r} is not among the models {url} serves: {served[:10]}",
                    f"set {role}.model to one of them, or start the server with that model",
                )
            )
            return checks
    for feature in ("structured_output", "seed", "logprobs", "allowed_token_ids"):
        if feature in ep.needs:
            checks.append(_FEATURES[feature](client, ep))
    return checks


def _chat(client, llm: BackendConfig, **kw: Any):
    return client.chat.completions.create(
        model=llm.model, messages=[{"role": "user", "content": "What is 2 + 3? Answer in JSON."}], **kw
    )


def _check_structured_output(client, ep: Endpoint) -> Check:
    name = f"{ep.role}: structured output (response_format json_schema)"
    fmt = {"type": "json_schema", "json_schema": {"name": "probe", "schema": PROBE_SCHEMA}}
    fix = (
        "use a server that enforces response_format (vLLM, SGLang, a hosted API with structured outputs), "
        "or a labeler that constrains decoding locally (labeling.llm.backend: transformers or vllm)"
    )
    try:
        resp = _chat(client, ep.llm, response_format=fmt, max_tokens=24, temperature=0.0)
    except Exception as err:
        return Check(name, "fail", f"{_url(ep.llm)} refused it: {_error(err)}", fix)
    text = resp.choices[0].message.content or ""
    try:
        parsed = json.loads(text)
        ok = isinstance(parsed, dict) and isinstance(parsed.get("answer"), int) and set(parsed) == {"answer"}
    except ValueError:
        ok = False
    if ok:
        return Check(name, "pass", f"answer follows the schema: {text!r}")
    return Check(name, "fail", f"{_url(ep.llm)} ignores it: answered {text[:80]!r}, not the schema", fix)


def _check_seed(client, ep: Endpoint) -> Check:
    name = f"{ep.role}: seed"
    fix = (
        "sampled traces are not reproducible on this server (re-runs still reuse the request cache); "
        "use a server that honours seed (vLLM) if reproducibility matters"
    )
    try:
        texts = [
            _chat(client, ep.llm, seed=1234, temperature=1.0, max_tokens=12).choices[0].message.content
            for _ in range(2)
        ]
    except Exception as err:
        return Check(name, "fail", f"{_url(ep.llm)} refused a request with a seed: {_error(err)}", fix)
    if texts[0] == texts[1]:
        return Check(name, "pass", "two samples with the same seed are identical")
    return Check(name, "warn", "two samples with the same seed differ: the server ignores seed", fix)


def _completion(client, llm: BackendConfig, **kw: Any):
    return client.completions.create(model=llm.model, prompt="The answer is", max_tokens=4, temperature=0.0, **kw)


def _check_logprobs(client, ep: Endpoint) -> Check:
    name = f"{ep.role}: logprobs (text completions)"
    fix = (
        "guided decoding of the scaffolded student reads the signal probabilities: serve it with vLLM "
        "(--logprobs-mode processed_logprobs), or decode it in process (evaluation.served_students without "
        "'scaffolded')"
    )
    if not ep.model_known:
        return Check(name, "warn", "the model name is set per student at run time: not checked")
    try:
        resp = _completion(client, ep.llm, logprobs=1)
    except Exception as err:
        return Check(name, "fail", f"{_url(ep.llm)} refused it: {_error(err)}", fix)
    lp = resp.choices[0].logprobs
    if lp is not None and lp.top_logprobs:
        return Check(name, "pass", f"{len(lp.top_logprobs)} tokens with their top log-probabilities")
    return Check(name, "fail", f"{_url(ep.llm)} answered without log-probabilities", fix)


def _check_allowed_token_ids(client, ep: Endpoint) -> Check:
    name = f"{ep.role}: allowed_token_ids"
    fix = (
        "guided decoding through a server restricts the next token to the signal tokens: serve the student "
        "with vLLM, or decode it in process (evaluation.served_students without 'scaffolded')"
    )
    if not ep.model_known:
        return Check(name, "warn", "the model name is set per student at run time: not checked")
    try:
        resp = _completion(client, ep.llm, logprobs=1, extra_body={"allowed_token_ids": [13]})
    except Exception as err:
        return Check(name, "fail", f"{_url(ep.llm)} refused it: {_error(err)}", fix)
    lp = resp.choices[0].logprobs
    tokens = list(lp.tokens) if lp is not None and lp.tokens else []
    if tokens and len(set(tokens)) == 1:
        return Check(name, "pass", f"every token was the one allowed ({tokens[0]!r})")
    return Check(name, "fail", f"{_url(ep.llm)} ignores it: generated {tokens or resp.choices[0].text!r}", fix)


_FEATURES = {
    "structured_output": _check_structured_output,
    "seed": _check_seed,
    "logprobs": _check_logprobs,
    "allowed_token_ids": _check_allowed_token_ids,
}


# ---------------------------------------------------------------------------------------------
# the local side


def _local_backends(cfg: PipelineConfig) -> list[tuple[str, BackendConfig]]:
    out = [("teacher.llm", cfg.teacher.llm)]
    if cfg.labeling.method == "llm" and cfg.labeling.llm is not None:
        out.append(("labeling.llm", cfg.labeling.llm))
    if cfg.evaluation.llm is not None:
        out.append(("evaluation.llm", cfg.evaluation.llm))
    return [(role, llm) for role, llm in out if llm.backend != "openai"]


def check_vllm(cfg: PipelineConfig) -> list[Check]:
    """vLLM importable where a backend is ``vllm`` or the evaluation's server command runs it."""
    roles = [role for role, llm in _local_backends(cfg) if llm.backend == "vllm"]
    server = cfg.evaluation.server
    if server is not None and "vllm" in server.command.split()[0:2]:
        roles.append("evaluation.server.command")
    if not roles:
        return []
    if importlib.util.find_spec("vllm") is not None:
        return [Check("vllm importable", "pass", f"needed by {', '.join(roles)}")]
    return [
        Check(
            "vllm importable",
            "fail",
            f"{', '.join(roles)} use vLLM, which is not installed in this environment",
            "pip install 'rscaffold[vllm]' (Linux with a CUDA GPU), or choose backend 'transformers' / 'openai'",
        )
    ]


def check_gpu(cfg: PipelineConfig, *, device: Any = None) -> list[Check]:
    """A GPU and its memory where models load in this process (training always does; teacher,
    labeler and evaluation when their backend is local). ``device``: the torch.cuda module to ask
    (tests pass their own)."""
    local = [role for role, _ in _local_backends(cfg)] + ["training"]
    if device is None:
        import torch

        device = torch.cuda
    if not device.is_available():
        return [
            Check(
                "GPU",
                "warn",
                f"no CUDA GPU: {', '.join(local)} run on the CPU (fine for tiny models, hours for real ones)",
                "run on a machine with a GPU, or point the teacher and labeler at a server (backend 'openai')",
            )
        ]
    checks = []
    for i in range(device.device_count()):
        free, total = device.mem_get_info(i)
        checks.append(
            Check(
                f"GPU {i}",
                "pass",
                f"{device.get_device_name(i)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free (for {', '.join(local)})",
            )
        )
    return checks


def _dir_bytes(path: str) -> int | None:
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def estimate_output_bytes(cfg: PipelineConfig) -> int:
    """A rough upper estimate of what a run writes into the artifacts directory: each trained
    student (the model, saved checkpoints with optimizer state) dominates; traces, labels, datasets
    and predictions are small beside it."""
    student = _dir_bytes(cfg.training.student) or 1 << 30  # unknown (hub id): assume 1 GiB
    # every student's final model, and while one trains its last checkpoints (the trainer keeps
    # 2), each with the weights and the optimizer's two moments: about 3x the model
    return len(cfg.training.students) * student + 2 * 3 * student + (256 << 20)


def check_disk(cfg: PipelineConfig, *, need: int | None = None) -> list[Check]:
    """Free space where the artifacts go against :func:`estimate_output_bytes` (or ``need``)."""
    path = Path(cfg.run.artifacts_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    need = estimate_output_bytes(cfg) if need is None else need
    detail = f"{free / 2**30:.1f} GiB free at {existing}, the run needs about {need / 2**30:.1f} GiB"
    if free >= need:
        return [Check("disk space", "pass", detail)]
    return [
        Check(
            "disk space",
            "fail",
            detail,
            "free space there, or set run.artifacts_dir (or --artifacts-dir) to a disk with more room",
        )
    ]


def run_checks(cfg: PipelineConfig, *, gpu: bool = True) -> list[Check]:
    """Every library-side check of ``cfg``: endpoints first, then the local side."""
    checks: list[Check] = []
    for ep in endpoints(cfg):
        checks.extend(check_endpoint(ep))
    checks.extend(check_vllm(cfg))
    if gpu:
        checks.extend(check_gpu(cfg))
    checks.extend(check_disk(cfg))
    return checks


def format_checks(checks: Iterable[Check]) -> list[str]:
    """One line per check (``PASS``/``WARN``/``FAIL``), and the fix under the ones that did not pass."""
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():4s}  {c.name}: {c.detail}")
        if c.fix and c.status != "pass":
            lines.append(f"      fix: {c.fix}")
    return lines
