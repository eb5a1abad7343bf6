"""Loading a config: YAML, relative paths, ``--set`` assignments, validation errors that name the
field, the check of local inputs, and ``show-config --explain``."""

from __future__ import annotations

import difflib
import os
import textwrap
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rscaffold.config.base import ConfigError
from rscaffold.config.pipeline import PipelineConfig
from rscaffold.paths import data_dir

_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "problems": ("train", "eval"),
    "labeling": ("taxonomy",),
    "training": ("student", "tokenizer", "accelerate_config"),
}
_LLM_PATH_FIELDS = ("model", "tokenizer")


def _resolve(value: Any, base: Path) -> Any:
    """Resolve a relative local path against ``base``; leave hub ids and absolute paths alone."""
    if not isinstance(value, str) or value.startswith("hub:") or "://" in value:
        return value
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    candidate = base / p
    # A bare hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct" has no local counterpart; keep it.
    if (
        value.startswith((".", "~"))
        or candidate.exists()
        or value.endswith((".jsonl", ".yaml", ".json", ".csv", ".parquet"))
    ):
        return str(candidate.resolve())
    return value


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(raw)
    for section, keys in _PATH_FIELDS.items():
        sec = out.get(section)
        if isinstance(sec, dict):
            sec = dict(sec)
            for k in keys:
                if k in sec:
                    sec[k] = _resolve(sec[k], base)
            out[section] = sec
    for section in ("teacher", "labeling"):
        sec = out.get(section)
        if isinstance(sec, dict) and isinstance(sec.get("llm"), dict):
            llm = dict(sec["llm"])
            for k in _LLM_PATH_FIELDS:
                if k in llm:
                    llm[k] = _resolve(llm[k], base)
            out[section] = {**sec, "llm": llm}
    pr = out.get("problems")
    if isinstance(pr, dict) and isinstance(pr.get("mix"), list):
        out["problems"] = {
            **pr,
            "mix": [
                {**m, **{k: _resolve(m[k], base) for k in ("train", "eval") if isinstance(m.get(k), str)}}
                if isinstance(m, dict)
                else m
                for m in pr["mix"]
            ],
        }
    ev = out.get("evaluation")
    if isinstance(ev, dict) and isinstance(ev.get("benchmarks"), list):
        out["evaluation"] = {
            **ev,
            "benchmarks": [
                {**b, "source": _resolve(b["source"], base)} if isinstance(b, dict) and "source" in b else b
                for b in ev["benchmarks"]
            ],
        }
    return out


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The config keys next to the one at ``loc`` (the fields of the section holding it)."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_flat_keys(v, key + ".") if isinstance(v, dict) and v else [key])
    return out


def format_validation_error(err: ValidationError, overridden: Collection[str] = ()) -> str:
    """One line per error; an unknown key gets the closest known one as a suggestion, and a key
    that a command-line override (``overridden``: dotted keys of ``--set``) set says so."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        notes = []
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(e["loc"][-1]), _keys_at(e["loc"]), n=1)
            if close:
                notes.append(f"did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])}?")
        elif not isinstance(e.get("input"), dict):
            notes.append(f"got {e['input']!r}")
        origin = next((k for k in overridden if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")), None)
        if origin is not None:
            notes.insert(0, f"from --set {origin}")
        lines.append(f"  {loc}: {msg}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def config_from_dict(
    raw: dict[str, Any], base: Path | None = None, source: str = "<dict>", *, overridden: Collection[str] = ()
) -> PipelineConfig:
    """Validate ``raw``; ``overridden``: the dotted keys set on the command line (errors name them)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    if base is not None:
        raw = _resolve_paths(raw, base)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}:\n{format_validation_error(err, overridden)}") from None
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a YAML config (``None``: the built-in default, ``data/default.yaml``)."""
    path = Path(path) if path is not None else data_dir() / "default.yaml"
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config: {err}") from None
    if overrides:
        raw = deep_merge(raw, overrides)
        source = f"{path} with the command-line overrides"
    else:
        source = str(path)
    return config_from_dict(
        raw, base=path.parent.resolve(), source=source, overridden=_flat_keys(overrides) if overrides else ()
    )


def parse_assignments(assignments: list[str] | tuple[str, ...], base: Path | None = None) -> dict[str, Any]:
    """``["training.max_steps=200", "teacher.sampling.temperature=0.6"]`` as a nested override dict.

    Each value is read as YAML (``200`` an int, ``0.6`` a float, ``null``, ``[a, b]``, ``{r: 8}``,
    anything else a string), so it is typed and then validated exactly like the same key in a
    config file. Relative paths in it are resolved against ``base`` (the working directory of a
    command line), not against the config file's directory. Raises :class:`ConfigError` for an
    assignment that is not ``dotted.key=value``.
    """
    out: dict[str, Any] = {}
    for item in assignments:
        key, eq, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not eq or not key or any(not p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training.max_steps=200")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: the value is not valid YAML: {err}") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is also set to a value")
            node = child
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"--set {key}: keys below it are set too")
        node[parts[-1]] = deep_merge(node[parts[-1]], value) if isinstance(node.get(parts[-1]), dict) else value
    return _resolve_paths(out, base) if base is not None else out


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def check_inputs_exist(cfg: PipelineConfig) -> None:
    """Fail fast on local files the run will need (before any stage starts)."""
    problems: list[str] = []
    mixed = bool(cfg.problems.mix)
    for i, src in enumerate(cfg.problems.sources()):
        for name in ("train", "eval"):
            v = getattr(src, name)
            if v is not None and not v.startswith("hub:") and not Path(v).exists():
                problems.append(f"  problems.{f'mix.{i}.' if mixed else ''}{name}: file not found: {v}")
    for i, b in enumerate(cfg.evaluation.benchmarks):
        if not b.source.startswith("hub:") and not Path(b.source).expanduser().exists():
            problems.append(f"  evaluation.benchmarks.{i}.source: file not found: {b.source}")
    if not Path(cfg.labeling.taxonomy).exists():
        problems.append(f"  labeling.taxonomy: file not found: {cfg.labeling.taxonomy}")

    for where, llm in (("teacher.llm", cfg.teacher.llm), ("labeling.llm", cfg.labeling.llm)):
        if llm is None or llm.backend == "openai":
            continue
        if _looks_local(llm.model) and not Path(llm.model).exists():
            problems.append(
                f"  {where}.model: model directory not found: {llm.model} "
                "(run `rscaffold models fetch` for the built-in SmolLM2-135M-Instruct)"
            )
    if cfg.training.tiny is None and _looks_local(cfg.training.student) and not Path(cfg.training.student).exists():
        problems.append(f"  training.student: model directory not found: {cfg.training.student}")
    if problems:
        raise ConfigError("the config points at missing inputs:\n" + "\n".join(problems))


def _looks_local(value: str) -> bool:
    # hub ids look like "org/name"; local paths are absolute or start with . or ~
    return value.startswith(("/", ".", "~")) or Path(value).is_absolute()


# ---------------------------------------------------------------------------------------------
# documentation


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section class of a field (``X`` or ``X | None``), else None."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), None)


def explain_config(cfg: BaseModel, indent: int = 0) -> str:
    """``cfg`` as YAML with every key's help text as a comment above it (``rscaffold show-config
    --explain``); the output loads back as the same config."""
    pad = " " * indent
    lines: list[str] = []
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        for line in textwrap.wrap(field.description or "", width=max(40, 100 - indent)):
            lines.append(f"{pad}# {line}")
        if isinstance(value, BaseModel) and _section_type(field.annotation) is not None:
            lines.append(f"{pad}{name}:")
            lines.append(explain_config(value, indent + 2))
            continue
        dumped = yaml.safe_dump({name: _plain(value)}, sort_keys=False, default_flow_style=False, width=1000)
        lines.extend(pad + ln for ln in dumped.rstrip("\n").splitlines())
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
