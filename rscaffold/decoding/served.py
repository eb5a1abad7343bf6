"""Decoding a student through an OpenAI-compatible server (a :class:`~rscaffold.serving.StudentServer`
or one that runs), with the same outputs as in-process decoding
(:func:`rscaffold.decoding.in_process.generate`) under greedy decoding:

* ``plain``: one text completion (``/v1/completions``) per question, of the prompt rendered with
  the student's chat template here (so the server sees exactly the tokens the in-process decoder
  does), ``max_tokens`` = the budget, greedy.
* ``guided``: the rule of :class:`~rscaffold.decoding.policy.GuidedPolicy`, in rounds of one or two
  requests per question: a *signal request* (one token, restricted to the signal tokens, with
  their log-probabilities for the confidence gate) and a *step request* that stops at a signal
  token (``stop_token_ids``), at eos, or at a step boundary (stop strings for a blank line), with
  the tokens the policy suppresses in the step given a ``logit_bias`` of -100 (the most negative
  bias vLLM accepts). This needs what vLLM's completions API offers (and SGLang's mostly):
  ``allowed_token_ids``, ``stop_token_ids``, ``logit_bias``, ``logprobs``, ``skip_special_tokens``,
  ``add_special_tokens`` and the ``stop_reason`` of each choice; start vLLM with ``--logprobs-mode
  processed_logprobs`` so that the log-probabilities are those of the restricted distribution
  (with vLLM's default raw log-probabilities, the signals outside the top ``logprobs`` tokens of
  the full vocabulary count as probability 0). A server that answers without log-probabilities
  (``transformers serve``, llama.cpp) is refused with a clear error. Each request re-sends the
  question and the answer so far; the server's prefix cache makes that cheap (vLLM caches
  prefixes by default).

Differences from in-process decoding, under greedy decoding: a step request that stops at a
blank line before any text is continued from the re-sent text (re-tokenized, where in-process
decoding continues from the generated ids); token counts are the server's; a suppressed token
gets a bias of -100 instead of probability 0. Students with a signal head (``signal_objective:
head``) cannot be served: the head is not part of a causal LM.

Requests go through the given backend (:class:`rscaffold.llm.openai_api.OpenAIBackend`, usually
wrapped in the request cache), so they get its client, concurrency, retries and cache. Any
request that still fails raises :class:`ServedDecodingError`: a prediction is never made from a
failed request (the caller's finished shards are kept; a re-run resumes).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.decoding.output import Generated, free_sources, split_signals
from rscaffold.decoding.policy import GuidedPolicy, GuidedRow, GuidedSettings, Step, signal_policy, step_text
from rscaffold.llm.base import ChatRequest, Completion, LLMBackend
from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, render_prompt
from rscaffold.vocabulary import STEP_SEPARATOR

# Stop strings of a step request: a blank line (the step boundary, STEP_BOUNDARY: two newlines with
# only white space between them), as servers take them: literal strings, up to three spaces/tabs
# or a carriage return between the newlines (rarer forms end the step at the next signal instead).
STEP_STOPS = ["\n" + "".join(mid) + "\n" for n in range(4) for mid in itertools.product(" \t", repeat=n)] + ["\n\r\n"]
# Most top log-probabilities a server returns per token (vLLM's default --max-logprobs is 20).
MAX_LOGPROBS = 20


class ServedDecodingError(RuntimeError):
    """A request to the student's server failed (after the client's retries) or its answer
    cannot be used; nothing was predicted from it."""


def served_llm(
    llm: BackendConfig, *, student: str, model_dir: str | Path, base_url: str | None = None
) -> BackendConfig:
    """``llm`` (an ``openai`` backend) for one student: ``{student}`` and ``{model_dir}`` in its
    ``model`` filled in, ``base_url`` set when given (a server started for the student)."""
    fields = {"student": student, "model_dir": str(model_dir)}
    update: dict[str, Any] = {"model": llm.model.format(**fields)}
    if base_url is not None:
        update["base_url"] = base_url
    return llm.model_copy(update=update)


def _check(completions: Sequence[Completion], what: str, backend: LLMBackend) -> dict[str, Completion]:
    failed = [c for c in completions if not c.ok]
    if failed:
        where = getattr(getattr(backend, "cfg", None), "base_url", None) or backend.model_id
        raise ServedDecodingError(
            f"{len(failed)} of {len(completions)} {what} requests to the student's server ({where}) failed; "
            f"first: {failed[0].error}. No prediction was made from them: re-run to resume."
        )
    return {c.request_id: c for c in completions}


def generate_served(
    backend: LLMBackend,
    student: Any,
    questions: Sequence[str],
    *,
    mode: Literal["plain", "guided"] = "plain",
    max_new_tokens: int = 256,
    guided: GuidedSettings | None = None,
    request_prefix: str = "q",
) -> list[Generated]:
    """Answers of ``student`` (a :class:`~rscaffold.student.Student`, its weights not needed:
    ``load_student(..., weights=False)``) through ``backend``, one
    :class:`~rscaffold.decoding.output.Generated` each, as
    :func:`rscaffold.decoding.in_process.generate` makes them. ``guided``: resolved
    :class:`~rscaffold.decoding.policy.GuidedSettings`. ``request_prefix``
    names the requests (``<prefix>-<i>``), for logs and the cache's bookkeeping."""
    if not backend.capabilities.raw_prompt:
        raise ValueError(f"backend {backend.name!r} cannot serve text completions; use backend 'openai'")
    tok = student.tokenizer
    system_prompt = student.system_prompt or STUDENT_SYSTEM_PROMPT
    prompts = [render_prompt(q, tok, system_prompt) for q in questions]
    if mode == "plain":
        prompts = [without_added_bos(p, tok) for p in prompts]
        tokens = dict(zip(student.signal_tokens or [], student.signal_names or []))
        return _plain(backend, prompts, max_new_tokens=max_new_tokens, prefix=request_prefix, signal_of_token=tokens)
    if mode != "guided":
        raise ValueError(f"mode must be 'plain' or 'guided', got {mode!r}")
    if not student.signal_token_ids:
        raise ValueError("guided decoding needs a scaffolded student (signal names and token ids)")
    if student.signal_objective == "head":
        raise ValueError(
            "a student with a signal head (signal_objective: head) cannot be decoded through a server: "
            "the head is not part of the causal LM a server hosts; decode it in-process (no evaluation.llm)"
        )
    return _Guided(backend, student, guided, max_new_tokens=max_new_tokens, prefix=request_prefix).run(prompts)


def without_added_bos(prompt: str, tokenizer: Any) -> str:
    """``prompt`` as a server that tokenizes with special tokens added (the completions default)
    must get it to see the tokens in-process decoding sees (``add_special_tokens=False``): a
    tokenizer that adds a BOS of its own (Llama 3, Gemma) would otherwise give two, as the
    rendered chat template has one; the template's is dropped, the server adds it back."""
    bos = tokenizer.bos_token
    if not bos or not prompt.startswith(bos):
        return prompt
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    return prompt[len(bos) :] if added[:1] == [tokenizer.bos_token_id] else prompt


def _plain(
    backend: LLMBackend, prompts: list[str], *, max_new_tokens: int, prefix: str, signal_of_token: dict[str, str]
) -> list[Any]:
    # A student with signal tokens keeps them in the text (vLLM's skip_special_tokens), so that its
    # steps split as in-process; a server that rejects the field cannot decode such a student plain.
    # No server-specific field otherwise (transformers serve refuses unknown ones): the prompt is
    # sent so that the server's own tokenization (special tokens added) gives the in-process tokens.
    options = {"skip_special_tokens": False} if signal_of_token else None
    reqs = [ChatRequest(f"{prefix}-{i}", [], prompt=p, options=options) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    got = _check(backend.generate(reqs, SamplingConfig(max_new_tokens=max_new_tokens)), "answer", backend)
    share = (time.perf_counter() - t0) / max(1, len(reqs))
    out = []
    for r in reqs:
        c = got[r.request_id]
        steps, step_signals = split_signals(c.text, signal_of_token)
        out.append(
            Generated(
                text=STEP_SEPARATOR.join(steps),
                signals=[s for s in step_signals if s is not None],
                output_tokens=c.completion_tokens or 0,
                latency_s=share,
                steps=steps,
                step_signals=step_signals,
                confidences=[None] * len(steps),
                signal_sources=free_sources(step_signals),
            )
        )
    return out


class _Guided:
    """Guided decoding through a server (vLLM's completions dialect; see the module doc), under
    the student's :class:`~rscaffold.decoding.policy.GuidedPolicy`."""

    def __init__(self, backend: LLMBackend, student: Any, settings: Any, *, max_new_tokens: int, prefix: str):
        self.backend, self.prefix, self.max_new_tokens = backend, prefix, max_new_tokens
        settings = settings if isinstance(settings, GuidedSettings) else GuidedSettings()
        self.policy: GuidedPolicy = signal_policy(settings, student, max_new_tokens=max_new_tokens)
        self.name_of_token = {t: n for n, t in self.policy.token_of.items()}
        # every request: the rendered text is tokenized as is (no second BOS), signal tokens kept
        # in returned text where asked for
        self.base_options = {"add_special_tokens": False}

    def _send(self, reqs: list[ChatRequest], max_tokens: int, what: str) -> dict[str, Completion]:
        if not reqs:
            return {}
        return _check(self.backend.generate(reqs, SamplingConfig(max_new_tokens=max_tokens)), what, self.backend)

    def _signal_probs(self, c: Completion) -> list[float]:
        """The next-signal distribution of a signal request's answer, as the policy takes it (K
        probabilities, the pruned signals 0)."""
        top = (c.extra.get("top_logprobs") or [None])[0]
        if not top:
            raise ServedDecodingError(
                "the student's server answered a signal request without log-probabilities; guided decoding "
                "through a server needs /v1/completions with logprobs, allowed_token_ids and stop_token_ids "
                "(vLLM serve; transformers serve and llama.cpp lack them). Decode the scaffolded student "
                "in-process (evaluation.served_students without it) instead."
            )
        names = self.policy.names
        allowed = {names[k] for k in self.policy.allowed_idx}
        logp = {self.name_of_token[t]: float(v) for t, v in top.items() if t in self.name_of_token}
        logp = {n: v for n, v in logp.items() if n in allowed}
        if not logp:
            raise ServedDecodingError(
                f"the signal request's log-probabilities hold none of the signal tokens ({list(top)[:5]}...); "
                "does the server restrict the token to allowed_token_ids?"
            )
        # renormalised as the in-process decoder does (a float32 softmax), so that a gate at
        # threshold 1.0 commits the same saturated signals
        import torch

        got = list(logp)
        probs = dict(
            zip(got, torch.softmax(torch.tensor([logp[n] for n in got], dtype=torch.float32), dim=-1).tolist())
        )
        return [probs.get(n, 0.0) for n in names]

    def run(self, prompts: list[str]) -> list[Generated]:
        rows = [GuidedRow(index=i, prompt_ids=[]) for i in range(len(prompts))]
        while True:
            for r in rows:
                if self.policy.finished(r):
                    r.done = True
            live = [r for r in rows if not r.done]
            if not live:
                break
            t0 = time.perf_counter()
            self._round(live, prompts)
            share = (time.perf_counter() - t0) / len(live)
            for r in live:
                r.latency_s += share
        return [r.result() for r in rows]

    def _round(self, live: list[GuidedRow], prompts: list[str]) -> None:
        policy = self.policy
        probs: dict[int, list[float] | None] = {r.index: None for r in live}
        if policy.allowed_idx:
            n_top = min(len(policy.allowed_idx), MAX_LOGPROBS)
            opts = {**self.base_options, "allowed_token_ids": [policy.ids[k] for k in policy.allowed_idx]}
            opts["skip_special_tokens"] = False
            reqs = [
                ChatRequest(
                    f"{self.prefix}-{r.index}-r{r.rounds}-signal",
                    [],
                    prompt=prompts[r.index] + r.completion,
                    logprobs=n_top,
                    options=opts,
                )
                for r in live
            ]
            got = self._send(reqs, 1, "signal")
            for r, q in zip(live, reqs):
                probs[r.index] = self._signal_probs(got[q.request_id])
        steps = {r.index: policy.open_step(r, probs[r.index]) for r in live}
        results = self._steps(live, steps, prompts)
        # free decoding that opened the step with a signal of the model's own choosing (where the
        # policy lets it)
        again = [
            r
            for r in live
            if results[r.index][1] == "signal" and policy.free_signal_opens(steps[r.index], len(results[r.index][0]))
        ]
        for r in again:
            policy.take_free_signal(r, steps[r.index], results[r.index][2])
        if again:
            results.update(self._steps(again, steps, prompts))
        for r in live:
            body, stop, _, used = results[r.index]
            policy.end_step(r, steps[r.index], step_text(body), stop=stop, tokens=used)

    def _steps(
        self, rows: list[GuidedRow], steps: dict[int, Step], prompts: list[str]
    ) -> dict[int, tuple[str, str, str | None, int]]:
        """One step body per row: (text, why it stopped, the signal that stopped it, tokens used).

        Why: ``eos``, ``signal`` (a signal token began the next step; not counted), ``separator``,
        ``length`` (the row's step budget), ``budget`` (no tokens left). A stop at a blank line
        before any text is not a step's end (no training step is empty): the step goes on from
        the text so far.
        """
        policy = self.policy
        out: dict[int, tuple[str, str, str | None, int]] = {}
        body = {r.index: "" for r in rows}
        used = {r.index: 0 for r in rows}
        todo = [r for r in rows if steps[r.index].budget > 0]
        for r in rows:
            if steps[r.index].budget <= 0:
                out[r.index] = ("", "budget", None, 0)
        part = 0
        while todo:
            reqs = {}
            for r in todo:
                opts = {**self.base_options, "stop_token_ids": list(policy.ids), "skip_special_tokens": True}
                suppressed = policy.suppressed(steps[r.index])
                if suppressed:
                    # tokens the step never produces (a pruned kind of step is never started; free
                    # decoding emits no signal unless the policy lets it)
                    opts["logit_bias"] = {str(i): -100 for i in suppressed}
                reqs[r.index] = ChatRequest(
                    f"{self.prefix}-{r.index}-r{r.rounds}-step{part}",
                    [],
                    prompt=prompts[r.index] + r.completion + body[r.index],
                    stop=STEP_STOPS,
                    options=opts,
                )
            budgets = {r.index: steps[r.index].budget - used[r.index] for r in todo}
            got: dict[str, Completion] = {}
            for n in sorted(set(budgets.values())):  # one call per distinct budget
                got.update(self._send([reqs[i] for i, b in budgets.items() if b == n], n, "step"))
            nxt = []
            for r in todo:
                c = got[reqs[r.index].request_id]
                text, reason = c.text, c.extra.get("stop_reason")
                tokens = c.completion_tokens or 0
                body[r.index] += text
                used[r.index] += tokens
                if c.finish_reason == "length":
                    out[r.index] = (body[r.index], "length", None, used[r.index])
                elif isinstance(reason, int) and reason in policy.signal_of:
                    used[r.index] -= 1  # the signal token is not part of this step
                    out[r.index] = (body[r.index], "signal", policy.signal_of[reason], used[r.index])
                elif isinstance(reason, str):
                    if body[r.index].strip():
                        out[r.index] = (body[r.index], "separator", None, used[r.index])
                    elif tokens < budgets[r.index]:
                        body[r.index] += reason  # a blank line before the step's text: go on
                        nxt.append(r)
                    else:
                        out[r.index] = (body[r.index], "length", None, used[r.index])
                else:  # eos
                    out[r.index] = (body[r.index], "eos", None, used[r.index])
            todo, part = nxt, part + 1
        return out
