"""In-process generation with Hugging Face transformers (CPU or one GPU).

The reference backend: slow next to vLLM, but it needs nothing beyond the core dependencies, so
it runs the built-in SmolLM2-135M-Instruct, the tiny test models and any local checkpoint.

Requests are expanded into (request, sample) rows, sorted by prompt length (less padding), and
generated in batches of ``cfg.batch_size`` with LEFT padding, which decoder-only generation
needs (the new tokens must start right after every row's last prompt token).

Sampling is seeded per row: sample ``k`` of a request draws from its own ``torch.Generator``
seeded with :func:`~rscaffold.llm.parsing.request_seed` (the request's seed, the same one every
backend uses), through :class:`SeededSampling`, so what a request gets does not depend on the
other rows of its batch, on batch numbers or on the process-wide RNG (which is left untouched).
Greedy decoding (temperature 0) generates each request once and copies the result to its ``n``
samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.llm.base import Capabilities, ChatRequest, Completion, ResultCallback
from rscaffold.llm.constraints import LineChoiceConstraint
from rscaffold.llm.parsing import (
    completion_from_output,
    describe_error,
    error_completions,
    request_seed,
)
from rscaffold.models import free_accelerator_memory, load_causal_lm

log = logging.getLogger(__name__)


@dataclass
class _Row:
    request: ChatRequest
    sample_indices: list[int]  # the samples this row's output stands for (several when greedy)
    prompt: str
    n_tokens: int


class SeededSampling:
    """A logits processor that samples each row's next token with that row's own generator.

    Scores are divided by the temperature, cut to the top-``top_p`` nucleus, sampled with
    ``torch.multinomial`` from the row's generator, and returned as a row that is ``-inf``
    everywhere but at the chosen token, so the greedy step of ``generate`` takes it. Processors
    that run before this one (output constraints) have already masked what is not allowed.
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float, top_p: float, device):
        import torch

        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(dim=-1) - sorted_p > self.top_p  # keeps at least the top token
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        chosen = torch.full_like(scores, float("-inf"))
        for b, gen in enumerate(self.generators):
            token = torch.multinomial(probs[b], 1, generator=gen)
            chosen[b, token] = 0.0
        return chosen


class TransformersBackend:
    """:class:`~rscaffold.llm.base.LLMBackend` on a local transformers causal LM.

    ``model``/``tokenizer`` may be passed in to share an already loaded model (the tokenizer is
    switched to left padding either way).
    """

    name = "transformers"
    capabilities = Capabilities(line_choices=True)  # enforced token by token (constraints.py)

    def __init__(self, cfg: BackendConfig, model=None, tokenizer=None):
        self.cfg = cfg
        self.model_id = cfg.model
        if model is None or tokenizer is None:
            model, tokenizer = load_causal_lm(
                cfg.model, cfg.gguf_file, cfg.tokenizer, device=cfg.device, dtype=cfg.dtype
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = self._eos_ids()

    # -- helpers ------------------------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for v in (gen_eos, self.tokenizer.eos_token_id):
            if v is None:
                continue
            for i in v if isinstance(v, (list, tuple)) else [v]:
                if int(i) not in ids:
                    ids.append(int(i))
        return ids

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        """The chat-templated prompt text (a plain transcript when the tokenizer has no template)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"

    def _rows(self, requests: Sequence[ChatRequest], greedy: bool) -> tuple[list[_Row], list[Completion]]:
        rows: list[_Row] = []
        failed: list[Completion] = []
        for req in requests:
            try:
                prompt = self.render_prompt(req.messages)
                n_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            except Exception as err:  # a bad request (e.g. the template rejects its messages)
                failed.extend(error_completions(req.request_id, req.n, f"prompt: {describe_error(err)}"))
                continue
            if greedy:
                rows.append(_Row(req, list(range(req.n)), prompt, n_tokens))
            else:
                rows.extend(_Row(req, [i], prompt, n_tokens) for i in range(req.n))
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory
        # error, if any, shows up in the first batch.
        rows.sort(key=lambda r: -r.n_tokens)
        return rows, failed

    def _generation_kwargs(self, sampling: SamplingConfig) -> dict:
        # Decoding is "greedy" for generate(): sampling happens in SeededSampling, per row. No
        # top-k (transformers' default 50), matching vLLM / OpenAI sampling.
        return {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.eos_token_ids or None,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }

    def _constraints(self, batch: list[_Row]) -> list[LineChoiceConstraint | None]:
        eos = self.eos_token_ids[0] if self.eos_token_ids else self.tokenizer.eos_token_id
        return [
            LineChoiceConstraint(self.tokenizer, r.request.line_choices, eos) if r.request.line_choices else None
            for r in batch
        ]

    def _generate_batch(self, batch: list[_Row], sampling: SamplingConfig) -> list[Completion]:
        import torch

        t0 = time.perf_counter()
        enc = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        kwargs = self._generation_kwargs(sampling)
        constraints = self._constraints(batch)
        if any(c is not None for c in constraints):
            prompt_len = enc["input_ids"].shape[1]
            unconstrained = list(range(len(self.tokenizer)))

            def allowed(batch_id: int, input_ids) -> list[int]:
                c = constraints[batch_id]
                return unconstrained if c is None else c.allowed(input_ids[prompt_len:].tolist())

            kwargs["prefix_allowed_tokens_fn"] = allowed
            # a constrained answer always fits: its length is known in advance
            kwargs["max_new_tokens"] = max([sampling.max_new_tokens] + [c.max_tokens for c in constraints if c])
        if sampling.temperature > 0:
            seeds = [request_seed(r.request, sampling.seed, r.sample_indices[0]) for r in batch]
            kwargs["logits_processor"] = [
                SeededSampling(seeds, temperature=sampling.temperature, top_p=sampling.top_p, device=self.model.device)
            ]
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        latency = time.perf_counter() - t0
        prompt_len = enc["input_ids"].shape[1]
        generated = out[:, prompt_len:].tolist()
        eos = set(self.eos_token_ids)
        results: list[Completion] = []
        for row, tokens, mask in zip(batch, generated, enc["attention_mask"].tolist()):
            stop_at = next((i for i, t in enumerate(tokens) if t in eos), None)
            if stop_at is None:
                kept, n_completion = tokens, len(tokens)
                finish = "length" if len(tokens) >= sampling.max_new_tokens else "stop"
            else:
                kept, n_completion, finish = tokens[:stop_at], stop_at + 1, "stop"
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            for i in row.sample_indices:
                results.append(
                    completion_from_output(
                        row.request.request_id,
                        i,
                        text,
                        finish_reason=finish,
                        prompt_tokens=int(sum(mask)),
                        completion_tokens=n_completion,
                        latency_s=latency,
                    )
                )
        return results

    # -- LLMBackend ---------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: ResultCallback | None = None,
    ) -> list[Completion]:
        if any(r.json_schema for r in requests):
            log.debug("transformers backend ignores json_schema (no constrained decoding); the caller validates")
        greedy = sampling.temperature == 0
        rows, results = self._rows(requests, greedy)
        for c in results:
            if on_result:
                on_result(c)
        bs = self.cfg.batch_size
        for b, start in enumerate(range(0, len(rows), bs)):  # noqa: B007 - b names the batch in logs
            batch = rows[start : start + bs]
            t0 = time.perf_counter()
            try:
                done = self._generate_batch(batch, sampling)
            except Exception as err:  # isolate the failure to this batch
                log.warning("transformers batch %d (%d rows) failed: %s", b, len(batch), describe_error(err))
                latency = time.perf_counter() - t0
                done = [
                    Completion(
                        request_id=r.request.request_id,
                        sample_index=i,
                        error=describe_error(err),
                        error_kind="engine",
                        latency_s=latency,
                    )
                    for r in batch
                    for i in r.sample_indices
                ]
            # Outside the try: an exception raised by the caller's callback is the caller's, and
            # must stop the run rather than be recorded as a generation failure.
            for c in done:
                results.append(c)
                if on_result:
                    on_result(c)
        return results

    def close(self) -> None:
        self.model = None
        free_accelerator_memory()
