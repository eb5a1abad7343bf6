"""A config section as it enters a stage's fingerprint."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def fingerprint_view(section: BaseModel) -> dict[str, Any]:
    """A config section as it enters a fingerprint: its values, without the execution settings
    (fields marked :data:`EXECUTION`), recursively."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("execution"):
            continue
        value = getattr(section, name)
        if isinstance(value, dict) and extra.get("execution_keys"):
            value = {k: v for k, v in value.items() if k not in extra["execution_keys"]}
        if isinstance(value, BaseModel):
            out[name] = fingerprint_view(value)
        elif isinstance(value, list):
            out[name] = [fingerprint_view(v) if isinstance(v, BaseModel) else v for v in value]
        else:
            out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out
