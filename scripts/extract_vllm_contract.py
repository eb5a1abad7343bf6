"""Extract the request fields a vLLM version declares into rscaffold's vLLM contract file.

vLLM's OpenAI-compatible server accepts and ignores request fields it does not know (it only
logs them), so a misspelt field would silently change results. rscaffold's tests therefore check
every request body it builds against the fields vLLM declares; this script reads them from the
vLLM wheel's *source* with :mod:`ast` (nothing is imported, so no GPU, CUDA or vLLM dependency is
needed) and writes them, with the vLLM version, to ``rscaffold/llm/vllm_contract.json``:

* ``models``: for ``CompletionRequest``, ``ChatCompletionRequest`` (the ``/v1/completions`` and
  ``/v1/chat/completions`` bodies), ``SamplingParams`` and ``StructuredOutputsParams`` (the
  in-process engine's arguments), and every vLLM class their annotations name (recursively):
  ``{json key: annotation}``, the key being the field's alias where it has one; private fields
  (``_x``), ``ClassVar``s and dataclass fields with ``init=False`` are left out;
* ``aliases``: the type aliases those annotations use (``StopParam = str | list[str] | None``);
* ``enums``: the values of the enum classes they use;
* ``signatures``: the parameters of ``LLM.__init__`` and ``LLM.chat`` and the fields of
  ``EngineArgs`` (which takes ``LLM``'s extra keyword arguments);
* ``server``: the ``--logprobs-mode`` values ``vllm serve`` accepts and its default
  ``--max-logprobs``.

Upgrading vLLM: bump the pin in ``pyproject.toml`` (the ``vllm`` extra), then::

    pip download --no-deps vllm==<version> -d /tmp/vllm
    python scripts/extract_vllm_contract.py /tmp/vllm/vllm-<version>-*.whl

and run ``pytest tests/llm/test_vllm_contract.py`` to see what broke.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "rscaffold" / "llm" / "vllm_contract.json"
ROOT_MODELS = ("CompletionRequest", "ChatCompletionRequest", "SamplingParams", "StructuredOutputsParams")
# where each root class is defined, in the versions seen so far (the first that defines it wins)
ROOT_MODULES = {
    "CompletionRequest": (
        "vllm/entrypoints/openai/completion/protocol.py",
        "vllm/entrypoints/openai/protocol.py",
    ),
    "ChatCompletionRequest": (
        "vllm/entrypoints/openai/chat_completion/protocol.py",
        "vllm/entrypoints/openai/protocol.py",
    ),
    "SamplingParams": ("vllm/sampling_params.py",),
    "StructuredOutputsParams": ("vllm/sampling_params.py",),
}
LLM_MODULE = "vllm/entrypoints/llm.py"
ENGINE_ARGS_MODULE = "vllm/engine/arg_utils.py"
MODEL_CONFIG_MODULE = "vllm/config/model.py"
BUILTIN_NAMES = {
    "str", "int", "float", "bool", "bytes", "dict", "list", "set", "tuple", "None", "Any", "object",
    "Optional", "Union", "Literal", "Annotated", "Sequence", "Mapping", "Iterable", "TypeAlias", "ClassVar",
    "List", "Dict", "Tuple", "Set", "Callable", "type",
}  # fmt: skip


class Source:
    """The ``vllm`` package's Python files, from a wheel or an unpacked directory."""

    def __init__(self, path: Path):
        self.files: dict[str, str] = {}
        if path.is_dir():
            for p in path.rglob("*.py"):
                rel = p.relative_to(path).as_posix()
                if rel.startswith("vllm/"):
                    self.files[rel] = p.read_text(encoding="utf-8", errors="replace")
        else:
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    if name.startswith("vllm/") and name.endswith(".py"):
                        self.files[name] = zf.read(name).decode("utf-8", errors="replace")
        if not self.files:
            raise SystemExit(f"{path}: no vllm/*.py files (not a vLLM wheel or source tree)")
        self._trees: dict[str, ast.Module] = {}

    def version(self) -> str:
        text = self.files.get("vllm/_version.py", "")
        m = re.search(r"""(?:__version__|version)\s*(?::\s*str)?\s*=\s*['"]([^'"]+)['"]""", text)
        return m.group(1) if m else "unknown"

    def tree(self, module_path: str) -> ast.Module | None:
        if module_path not in self.files:
            return None
        if module_path not in self._trees:
            self._trees[module_path] = ast.parse(self.files[module_path], filename=module_path)
        return self._trees[module_path]

    def module_file(self, dotted: str) -> str | None:
        base = dotted.replace(".", "/")
        for cand in (base + ".py", base + "/__init__.py"):
            if cand in self.files:
                return cand
        return None

    def resolve(self, name: str, module_path: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """The definition (class, alias assignment) of ``name`` as seen from ``module_path``,
        following ``from x import name`` re-exports."""
        tree = self.tree(module_path)
        if tree is None or depth > 8:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module_path, node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return module_path, node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return module_path, node
            if getattr(ast, "TypeAlias", None) and isinstance(node, ast.TypeAlias) and node.name.id == name:
                return module_path, node
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if (a.asname or a.name) == name:
                        target = self.module_file(self._absolute(node, module_path))
                        if target is not None:
                            return self.resolve(a.name, target, depth + 1)
        for node in tree.body:  # last: star imports
            if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                target = self.module_file(self._absolute(node, module_path))
                found = self.resolve(name, target, depth + 1) if target is not None else None
                if found is not None:
                    return found
        return None

    @staticmethod
    def _absolute(node: ast.ImportFrom, module_path: str) -> str:
        """The dotted module a ``from ... import`` names, relative imports resolved."""
        if node.level == 0:
            return node.module or ""
        package = module_path.split("/")[:-1]  # a module's package (an __init__.py's own package)
        package = package[: len(package) - (node.level - 1)]
        return ".".join(package + ([node.module] if node.module else []))


def _is_classvar(annotation: ast.AST) -> bool:
    text = ast.unparse(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _field_call_kw(value: ast.AST | None, key: str) -> ast.AST | None:
    if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in ("Field", "field"):
        for kw in value.keywords:
            if kw.arg == key:
                return kw.value
    return None


def class_fields(src: Source, module_path: str, node: ast.ClassDef, *, depth: int = 0) -> dict[str, str]:
    """``{json key: annotation}`` of a class and its (vLLM) bases, bases first."""
    out: dict[str, str] = {}
    if depth < 8:
        for base in node.bases:
            found = src.resolve(ast.unparse(base).split("[")[0], module_path)
            if found and isinstance(found[1], ast.ClassDef):
                out.update(class_fields(src, found[0], found[1], depth=depth + 1))
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        if name.startswith("_") or _is_classvar(stmt.annotation):
            continue
        init = _field_call_kw(stmt.value, "init")
        if isinstance(init, ast.Constant) and init.value is False:
            continue
        alias = _field_call_kw(stmt.value, "alias")
        key = alias.value if isinstance(alias, ast.Constant) and isinstance(alias.value, str) else name
        out[key] = ast.unparse(stmt.annotation)
    return out


def _is_enum(src: Source, module_path: str, node: ast.ClassDef) -> bool:
    for base in node.bases:
        text = ast.unparse(base)
        if text.split(".")[-1] in ("Enum", "IntEnum", "StrEnum", "IntFlag", "Flag"):
            return True
        found = src.resolve(text, module_path)
        if found and isinstance(found[1], ast.ClassDef) and _is_enum(src, found[0], found[1]):
            return True
    return False


def _enum_values(node: ast.ClassDef) -> list[Any]:
    values = []
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
            values.append(stmt.value.value)
    return values


def _names_in(annotation: str) -> set[str]:
    """The type names an annotation uses (not those in ``Annotated`` metadata such as
    ``Field(le=_INT64_MAX)``, nor a ``Literal``'s values)."""
    names: set[str] = set()

    def walk(n: ast.AST) -> None:
        if isinstance(n, ast.Call):
            return
        if isinstance(n, ast.Subscript) and ast.unparse(n.value).split(".")[-1] in ("Annotated", "Literal"):
            if ast.unparse(n.value).endswith("Annotated"):
                first = n.slice.elts[0] if isinstance(n.slice, ast.Tuple) else n.slice
                walk(first)
            return
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):  # a forward reference
            try:
                names.update(_names_in(n.value))
            except SyntaxError:
                pass
        for child in ast.iter_child_nodes(n):
            walk(child)

    walk(ast.parse(annotation, mode="eval"))
    return names - BUILTIN_NAMES


def _alias_value(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.AnnAssign):
        return node.value
    if isinstance(node, ast.Assign):
        return node.value
    return getattr(node, "value", None)  # ast.TypeAlias


def _params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg != "self"]


def extract(src: Source) -> dict[str, Any]:
    models: dict[str, dict[str, str]] = {}
    aliases: dict[str, str] = {}
    enums: dict[str, list[Any]] = {}
    todo: list[tuple[str, str]] = []
    for name in ROOT_MODELS:
        where = next((m for m in ROOT_MODULES[name] if src.resolve(name, m)), None)
        if where is None:
            raise SystemExit(f"class {name} not found in {ROOT_MODULES[name]} (has vLLM moved it? update ROOT_MODULES)")
        todo.append((name, where))
    seen: set[str] = set()
    while todo:
        name, module_path = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        found = src.resolve(name, module_path)
        if found is None:
            continue  # not vLLM's (openai's message types, pydantic, ...): left unchecked
        where, node = found
        if isinstance(node, ast.ClassDef):
            if _is_enum(src, where, node):
                enums[name] = _enum_values(node)
                continue
            fields = class_fields(src, where, node)
            models[name] = fields
            annotations = fields.values()
        else:
            value = _alias_value(node)
            if value is None:
                continue
            text = ast.unparse(value)
            try:
                _names_in(text)
            except SyntaxError:
                continue
            aliases[name] = text
            annotations = [text]
        for annotation in annotations:
            todo.extend((n, where) for n in sorted(_names_in(annotation)) if n not in seen)
    signatures: dict[str, list[str]] = {}
    llm = src.resolve("LLM", LLM_MODULE)
    if llm and isinstance(llm[1], ast.ClassDef):
        for fn in llm[1].body:
            if isinstance(fn, ast.FunctionDef) and fn.name in ("__init__", "chat"):
                signatures[f"LLM.{fn.name}"] = _params(fn)
    engine_args = src.resolve("EngineArgs", ENGINE_ARGS_MODULE)
    if engine_args and isinstance(engine_args[1], ast.ClassDef):
        signatures["EngineArgs"] = sorted(class_fields(src, engine_args[0], engine_args[1]))
    return {
        "vllm_version": src.version(),
        "server": server_options(src),
        "roots": list(ROOT_MODELS),
        "models": dict(sorted(models.items())),
        "aliases": dict(sorted(aliases.items())),
        "enums": dict(sorted(enums.items())),
        "signatures": signatures,
    }


def server_options(src: Source) -> dict[str, Any]:
    """What ``vllm serve`` accepts for the options rscaffold's served guided decoding relies on:
    the ``--logprobs-mode`` values and the default ``--max-logprobs``."""
    out: dict[str, Any] = {}
    found = src.resolve("LogprobsMode", MODEL_CONFIG_MODULE)
    if found is not None and (value := _alias_value(found[1])) is not None:
        out["logprobs_modes"] = _literal_strings(value)
    model_config = src.resolve("ModelConfig", MODEL_CONFIG_MODULE)
    if model_config and isinstance(model_config[1], ast.ClassDef):
        for stmt in model_config[1].body:
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and stmt.target.id == "max_logprobs"
            ):
                default = _field_call_kw(stmt.value, "default") or stmt.value
                if isinstance(default, ast.Constant):
                    out["max_logprobs_default"] = default.value
    return out


def _literal_strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path, help="a vLLM wheel (pip download --no-deps vllm==X) or an unpacked source tree")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the contract file to write (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    contract = extract(Source(args.wheel))
    args.out.write_text(json.dumps(contract, indent=1, sort_keys=False) + "\n")
    n = sum(len(f) for f in contract["models"].values())
    print(f"vLLM {contract['vllm_version']}: {len(contract['models'])} classes, {n} fields -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
