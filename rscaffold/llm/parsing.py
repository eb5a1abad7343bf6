"""Output parsing shared by every backend: separating a model's reasoning from its visible answer.

Long-thinking teachers (DeepSeek-R1, Qwen3, QwQ, ...) wrap their reasoning in ``<think>...</think>``.
Depending on the chat template, the opening tag may be part of the *prompt* (so the output starts
inside the block and only the closing tag appears), and a generation cut off by ``max_tokens``
may stop before the block is closed. :func:`split_reasoning` handles all of these.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from rscaffold.llm.base import ChatRequest, Completion
from rscaffold.vocabulary import STEP_SEPARATOR, THINK_CLOSE, THINK_OPEN

_BLOCK = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str | None  # None when the text had no reasoning block (or only empty ones)
    visible: str
    unclosed: bool = False  # a ``<think>`` block was opened and never closed (a truncated thought)


def parse_reasoning(text: str) -> ReasoningSplit:
    """Split ``text`` into its ``<think>`` reasoning and the visible rest (see module doc).

    - ``a <think>r</think> b``      -> reasoning ``r``, visible ``a`` + ``b`` (joined, stripped)
    - ``r</think> b`` (opening tag in the prompt) -> reasoning ``r``, visible ``b``
    - ``a <think>r`` (never closed)  -> reasoning ``r``, visible ``a``, ``unclosed=True``
    - several blocks                 -> reasonings joined by a blank line
    - no tags                        -> reasoning ``None``, visible ``text`` unchanged
    """
    if not text or (THINK_OPEN not in text and THINK_CLOSE not in text):
        return ReasoningSplit(None, text or "")
    reasoning_parts: list[str] = []
    visible_parts: list[str] = []
    rest = text
    # Opening tag in the prompt: everything before the first closing tag (with no opening tag
    # in front of it) is reasoning.
    first_close = rest.find(THINK_CLOSE)
    first_open = rest.find(THINK_OPEN)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        reasoning_parts.append(rest[:first_close])
        rest = rest[first_close + len(THINK_CLOSE) :]
    unclosed = False
    pos = 0
    for m in _BLOCK.finditer(rest):
        visible_parts.append(rest[pos : m.start()])
        reasoning_parts.append(m.group(1))
        pos = m.end()
    tail = rest[pos:]
    open_idx = tail.find(THINK_OPEN)
    if open_idx != -1:
        visible_parts.append(tail[:open_idx])
        reasoning_parts.append(tail[open_idx + len(THINK_OPEN) :])
        unclosed = True
    else:
        visible_parts.append(tail)
    # A stray closing tag left in the visible text carries no content; drop it.
    visible = "".join(visible_parts).replace(THINK_CLOSE, "").strip()
    reasoning = STEP_SEPARATOR.join(p.strip() for p in reasoning_parts if p.strip()) or None
    return ReasoningSplit(reasoning, visible, unclosed)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning or None, visible text)``; an unclosed ``<think>`` makes the rest reasoning."""
    s = parse_reasoning(text)
    return s.reasoning, s.visible


def merge_reasoning(*parts: str | None) -> str | None:
    """Join reasoning from several sources (API field, ``<think>`` blocks), skipping empties."""
    kept = [p.strip() for p in parts if p and p.strip()]
    return STEP_SEPARATOR.join(kept) or None


def clean_text(text: str | bytes | None) -> str:
    """Text that is safe to store: bytes decoded with replacement, lone surrogates replaced.

    Parquet (Arrow) strings must be valid UTF-8; a tokenizer can emit partial multi-byte
    sequences at a truncation point, and some servers send lone surrogates in JSON.
    """
    if text is None:
        return ""
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")


EMPTY_OUTPUT = "empty output"
RATE_LIMITED = "rate-limited"  # how the error of a request that a server kept refusing with HTTP 429 starts


def completion_from_output(
    request_id: str,
    sample_index: int,
    raw_text: str | bytes | None,
    *,
    finish_reason: str | None,
    reasoning_field: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    latency_s: float = 0.0,
    extra: dict | None = None,
) -> Completion:
    """One backend output -> :class:`Completion`, the same way for every backend.

    ``<think>`` blocks in the text and a separate reasoning field (``reasoning_field``, e.g. the
    OpenAI-compatible ``reasoning_content``) are merged into ``reasoning``; an unclosed block is
    flagged in ``extra["unclosed_think"]``. An output with neither visible text nor reasoning is an
    error Completion (``"empty output"``), as is any other unusable output the caller detects.
    """
    split = parse_reasoning(clean_text(raw_text))
    reasoning = merge_reasoning(clean_text(reasoning_field) if reasoning_field else None, split.reasoning)
    extra = dict(extra or {})
    if split.unclosed:
        extra["unclosed_think"] = True
    error = None if (split.visible.strip() or reasoning) else EMPTY_OUTPUT
    return Completion(
        request_id=request_id,
        text=split.visible.strip(),
        reasoning=reasoning,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_s=latency_s,
        sample_index=sample_index,
        error=error,
        extra=extra,
    )


def error_completions(
    request_id: str,
    n: int,
    error: str,
    *,
    latency_s: float = 0.0,
    start_index: int = 0,
    error_kind: str = "request",
) -> list[Completion]:
    """``n`` error Completions for one request (samples ``start_index..start_index+n-1``)."""
    return [
        Completion(
            request_id=request_id,
            sample_index=start_index + i,
            error=error,
            error_kind=error_kind,
            latency_s=latency_s,
        )
        for i in range(n)
    ]


MASK = "***"


def describe_error(err: BaseException, limit: int = 500, secrets: tuple[str, ...] = ()) -> str:
    """``"Type: message"``, one line, bounded (for Completion.error and failure counters).

    ``secrets`` (e.g. an API key) are replaced by ``***`` *before* the message is cut to
    ``limit``, so no part of a secret can survive at the cut.
    """
    msg = " ".join(str(err).split())
    for secret in secrets:
        if secret and len(secret) >= 6:
            msg = msg.replace(secret, MASK)
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def request_seed(request: ChatRequest, run_seed: int, sample: int = 0) -> int:
    """The sampling seed of sample ``sample`` of ``request``: its own :attr:`~ChatRequest.seed`
    (plus ``sample``), else derived from the run seed and its id. The same for every backend."""
    if request.seed is not None:
        return (request.seed + sample) & 0x7FFFFFFF
    return derive_seed(run_seed, request.request_id, sample)


def derive_seed(seed: int, request_id: str, offset: int = 0) -> int:
    """A per-request sampling seed, stable across runs and processes (unlike ``hash()``).

    Seeding each request from its own id makes a resumed run draw the same samples for a request
    as an uninterrupted run would, whatever else is in flight.
    """
    return zlib.crc32(f"{seed}:{request_id}:{offset}".encode()) & 0x7FFFFFFF
