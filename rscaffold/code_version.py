"""The version of the code a stage runs, computed from what it really imports.

A stage's fingerprint includes :func:`code_version` of its module (``rscaffold.stages.<stage>``):
a hash over every ``rscaffold`` module in that module's import closure, found by reading the
``import`` statements of the source files (lazy imports inside functions included), never from a
hand-kept list. Each module is hashed as its syntax tree without docstrings, so editing a comment,
a docstring or the formatting changes nothing, and neither does the package version: only code
that can change what a stage computes invalidates its output.

``rscaffold.config`` (the package and its modules) is left out on purpose: a stage's fingerprint
already holds the *values* of its config section (defaults and validators included), which is
everything the config package decides;
its help texts are not behaviour. ``rscaffold.code_version`` itself is left out too: it computes
the version, not a stage's output.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import threading
from pathlib import Path

PACKAGE = "rscaffold"
# Modules whose effect on a stage's output is fully captured by the config values in its
# fingerprint (see the module docstring).
EXCLUDED = frozenset({"rscaffold.config", "rscaffold.code_version"})


def is_excluded(module: str) -> bool:
    """Whether ``module`` is, or lies inside, one of the :data:`EXCLUDED` modules."""
    return any(module == e or module.startswith(e + ".") for e in EXCLUDED)


# The package's own directory: modules are resolved to files under it by name, never with
# ``importlib.util.find_spec``, which imports every parent package (and through them torch,
# transformers and TRL) just to say where a file is.
_ROOT = Path(__file__).resolve().parent


def _is_ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


@functools.cache
def _source_path(module: str) -> Path | None:
    """The ``.py`` file of an ``rscaffold`` module or package, or None if there is none (a name
    that is no module, e.g. a function imported with ``from pkg import name``, or another package)."""
    if not _is_ours(module):
        return None
    parts = module.split(".")[1:]
    if not all(part.isidentifier() for part in parts):
        return None
    base = _ROOT.joinpath(*parts)
    # A module's parents must be packages for it to be importable.
    for i in range(len(parts)):
        if not _ROOT.joinpath(*parts[:i], "__init__.py").is_file():
            return None
    for candidate in (base / "__init__.py", base.with_suffix(".py") if parts else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# CPython 3.11's parser is not safe to call from several threads at once ("AST constructor
# recursion depth mismatch", gh-106905); Prefect runs tasks in threads, so our parsing is
# serialised. A parse elsewhere in the process (a library's, in another thread) can still trip
# it: the error is transient (the same source parses on the next try), so it is retried.
_PARSE_LOCK = threading.Lock()
_PARSE_TRIES = 5


def _parse(path: Path) -> ast.Module:
    source = path.read_text(encoding="utf-8")
    with _PARSE_LOCK:
        for attempt in range(_PARSE_TRIES):
            try:
                return ast.parse(source, filename=str(path))
            except SystemError as err:
                if "recursion depth mismatch" not in str(err) or attempt == _PARSE_TRIES - 1:
                    raise
    raise AssertionError("unreachable")


@functools.cache
def _tree(path: Path) -> ast.Module:
    return _parse(path)


@functools.cache
def direct_imports(module: str) -> frozenset[str]:
    """The ``rscaffold`` modules that ``module``'s source imports (anywhere in the file)."""
    path = _source_path(module)
    if path is None:
        return frozenset()
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import submodule` imports the submodule
            if _is_ours(target):
                found.update(f"{target}.{a.name}" for a in node.names if _source_path(f"{target}.{a.name}"))
    return frozenset(m for m in found if _is_ours(m) and _source_path(m))


def import_closure(module: str) -> list[str]:
    """``module`` and every ``rscaffold`` module it imports, directly or not (parent packages
    included, since importing a module runs their ``__init__``), sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen or _source_path(m) is None:
            continue
        seen.add(m)
        todo.extend(_parents(m))
        todo.extend(direct_imports(m))
    return sorted(seen)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def module_digest(module: str) -> str:
    """Hash of one module's code: its syntax tree without docstrings (comments never reach it)."""
    path = _source_path(module)
    if path is None:
        raise ModuleNotFoundError(module)
    # Cached like the parsed trees: a long-running process versions the code it has loaded.
    tree = _strip_docstrings(_parse(path))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def code_version(module: str, length: int = 12) -> str:
    """The code version of ``module``: a hash over the digests of its import closure."""
    h = hashlib.sha256()
    for m in import_closure(module):
        if is_excluded(m):
            continue
        h.update(m.encode())
        h.update(module_digest(m).encode())
    return h.hexdigest()[:length]
