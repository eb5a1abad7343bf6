"""Decoding students: plain and signal-guided, in this process or through a server.

* :mod:`~rscaffold.decoding.policy`: the guided-decoding rule (gate, pruning, free-decoding
  fallback, step budget, where a step ends), the one place every guided executor asks;
* :mod:`~rscaffold.decoding.output`: what a decoder returns, and how a plain output splits into steps;
* :mod:`~rscaffold.decoding.plain`: plain greedy decoding in-process;
* :mod:`~rscaffold.decoding.reference`: the reference guided executor (re-encodes the context);
* :mod:`~rscaffold.decoding.cached`: the guided executor on a KV cache (the same outputs);
* :mod:`~rscaffold.decoding.served`: plain and guided decoding through an OpenAI-compatible server;
* :mod:`~rscaffold.decoding.in_process`: :func:`generate`, which picks the in-process executor;
* :mod:`~rscaffold.decoding.calibration`: the gate's threshold, calibrated on validation data.
"""

from rscaffold.decoding.output import Generated
from rscaffold.decoding.policy import GuidedSettings, resolve_guided

__all__ = ["Generated", "GuidedSettings", "resolve_guided"]
