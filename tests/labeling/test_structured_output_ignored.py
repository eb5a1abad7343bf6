"""A labeler server that ignores structured output (``response_format``) stops the labeling within
a few requests, with a message naming the server, the model and the feature; a real server that
does so: ``transformers serve`` answers requests with a JSON schema in free text."""

from __future__ import annotations

import pytest
from helpers import free_port, llm_labeling_config

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.labeling.labeler import LabelerUnavailableError, StructuredOutputIgnoredError, label_traces
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.llm.openai_api import OpenAIBackend

TRACES = [
    (f"t{i}", f"p{i}", f"What is {i} + {i}?", [f"First, add {i} and {i}.", f"So the answer is {2 * i}."])
    for i in range(12)
]
# two steps in JSON fit in 48 tokens: the labeler asks for the JSON answer (with a schema)
SAMPLING = SamplingConfig(max_new_tokens=48)


def _backend(base_url: str, model: str) -> OpenAIBackend:
    cfg = BackendConfig(
        backend="openai", model=model, base_url=base_url, concurrency=1, max_retries=0, request_timeout_s=60
    )
    return OpenAIBackend(cfg)


def test_a_server_ignoring_response_format_stops_labeling_within_a_few_requests(counted_server, tiny_teacher_dir):
    backend = _backend(counted_server.base_url, str(tiny_teacher_dir))
    counted_server.reset()
    cfg = llm_labeling_config(stop_after_nonconforming=3, retries_on_invalid=0)
    with pytest.raises(StructuredOutputIgnoredError) as err:
        list(label_traces(TRACES, load_taxonomy(cfg.taxonomy), backend, sampling=SAMPLING, cfg=cfg))
    message = str(err.value)
    assert "response_format" in message and counted_server.base_url in message and str(tiny_teacher_dir) in message
    assert "3 answers in a row" in message
    assert counted_server.reset() <= 4  # one request in flight at most beyond the three


def test_without_the_limit_the_same_server_falls_back_for_every_trace(counted_server, tiny_teacher_dir):
    backend = _backend(counted_server.base_url, str(tiny_teacher_dir))
    cfg = llm_labeling_config(stop_after_nonconforming=0, retries_on_invalid=0)
    stats: dict[str, int] = {}
    out = list(label_traces(TRACES[:3], load_taxonomy(cfg.taxonomy), backend, sampling=SAMPLING, cfg=cfg, stats=stats))
    assert len(out) == 3 and stats["fallback_traces"] == 3


def test_an_unreachable_labeler_is_named_by_its_url(tiny_teacher_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cfg = llm_labeling_config()
    with pytest.raises(LabelerUnavailableError, match=url.replace(".", r"\.")):
        list(label_traces(TRACES[:1], load_taxonomy(cfg.taxonomy), _backend(url, "m"), sampling=SAMPLING, cfg=cfg))
