"""What every config section shares: strictness (unknown keys refused), the execution marker
and the error a configuration that cannot be used raises."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and the problem."""


# Marks a field that decides how a stage runs, not what it produces (concurrency, timeouts, batch
# and shard sizes, devices, failure thresholds): left out of every fingerprint (fingerprint_view).
EXECUTION: dict[str, Any] = {"execution": True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
