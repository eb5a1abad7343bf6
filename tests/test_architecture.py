"""The house rules, checked on the import graph (built from the source with ``ast``):

* the library (``rscaffold``) never imports Prefect or the orchestration packages;
* imports run one way: flows -> tasks -> stages -> library parts -> records/config/store ->
  vocabulary, never from a lower layer to a higher one;
* no hand-kept list of modules decides a stage's code version (it is the import closure);
* every stage module declares its stage, and the flow reaches every declared stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rscaffold": ROOT / "rscaffold", "rscaffold_tasks": ROOT / "tasks", "rscaffold_flows": ROOT / "flows"}

# Lower number = lower layer. A module may import modules of its own layer or below.
LAYERS: list[tuple[str, int]] = [
    ("rscaffold.vocabulary", 0),
    ("rscaffold.paths", 0),
    ("rscaffold.markdown", 0),
    ("rscaffold.config", 1),
    ("rscaffold.records", 1),
    ("rscaffold.store", 2),
    ("rscaffold.code_version", 2),
    # library parts, bottom up
    ("rscaffold.prompts", 3),
    ("rscaffold.segment", 3),
    ("rscaffold.models", 3),
    ("rscaffold.kv_cache", 3),
    ("rscaffold.llm", 3),
    ("rscaffold.evalsets", 3),
    ("rscaffold.student_format", 4),  # the training text format: training and scoring both use it
    ("rscaffold.student", 4),
    ("rscaffold.labeling", 4),
    ("rscaffold.dataset", 4),
    ("rscaffold.export", 5),  # the dataset stage's output as a Hugging Face dataset
    ("rscaffold.doctor", 5),  # preflight checks of a config (endpoints, GPU, disk)
    ("rscaffold.training", 4),
    ("rscaffold.serving", 3),  # student servers as child processes
    ("rscaffold.decoding", 5),  # plain and signal-guided decoding, in-process and served
    ("rscaffold.evaluation", 5),
    ("rscaffold.stages", 6),
    ("rscaffold.experiment", 7),  # grids of configs over the stages, their statistics and report
    ("rscaffold", 0),  # the package itself (its __init__)
    ("rscaffold_tasks", 7),
    ("rscaffold_flows", 8),
]


def layer_of(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """Every module an ``import`` statement of the file names (function-level imports included)."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


GRAPH = {m: imports_of(m, p) for m, p in modules().items()}
OURS = set(GRAPH)


def test_every_module_has_a_layer():
    for m in OURS:
        layer_of(m)  # raises on a module no layer covers


@pytest.mark.parametrize("module", sorted(m for m in OURS if m.startswith("rscaffold.") or m == "rscaffold"))
def test_library_never_imports_prefect_or_orchestration(module):
    bad = {
        i
        for i in GRAPH[module]
        if i.split(".")[0] in ("prefect", "rscaffold_tasks", "rscaffold_flows", "tasks", "flows")
    }
    assert not bad, f"{module} imports {sorted(bad)}"


def test_imports_run_one_way():
    upward = []
    for module, imported in GRAPH.items():
        for target in imported:
            if target not in OURS:
                continue  # a symbol (from x import name) or a third-party module
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) -> {target} (layer {layer_of(target)})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_stages_do_not_import_each_other_except_their_inputs_readers():
    """A stage's code version is its import closure, so a stage module imports another stage only
    for the reader of that stage's output (problems -> read_problems, training -> model_path)."""
    shared = {"rscaffold.stages.common", "rscaffold.stages.requests", "rscaffold.stages.declare"}  # not stages
    allowed = {
        "rscaffold.stages.teacher": {"rscaffold.stages.problems"},
        "rscaffold.stages.evaluation": {"rscaffold.stages.problems", "rscaffold.stages.training"},
        "rscaffold.stages.plan": None,  # plans every stage's fingerprint
        "rscaffold.stages.registry": None,  # lists every stage
    }
    for module, imported in GRAPH.items():
        if not module.startswith("rscaffold.stages.") or module in shared or allowed.get(module, 0) is None:
            continue
        stages = {i for i in imported if i in OURS and i.startswith("rscaffold.stages.") and i != module}
        extra = stages - shared - allowed.get(module, set())
        assert not extra, f"{module} imports {sorted(extra)}"


def test_the_student_owns_its_format_and_never_imports_training():
    """Scoring a student (the gate's calibration, inference) needs its text format and directory,
    never the trainer: ``rscaffold.student`` and ``rscaffold.student_format`` import nothing of
    ``rscaffold.training``."""
    for module in ("rscaffold.student", "rscaffold.student_format"):
        bad = {i for i in GRAPH[module] if i == "rscaffold.training" or i.startswith("rscaffold.training.")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_code_version_follows_the_import_closure():
    from rscaffold.code_version import import_closure

    teacher = import_closure("rscaffold.stages.teacher")
    # what the teacher stage really runs: the backends' registry, answer checking, its loaders
    assert {"rscaffold.llm", "rscaffold.evalsets.answers", "rscaffold.evalsets.verify_worker"} <= set(teacher)
    # and not what it does not: training, evaluation
    assert not any(m.startswith(("rscaffold.training", "rscaffold.evaluation", "rscaffold.decoding")) for m in teacher)
    problems = import_closure("rscaffold.stages.problems")
    assert "rscaffold.evalsets.answers" in problems  # the loaders import it


def test_every_library_package_is_packaged():
    """pyproject lists the packages for setuptools (the orchestration folders are remapped, which
    package discovery cannot do): every folder with an ``__init__.py`` must be in that list."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(["rscaffold", *p.parent.relative_to(ROOT / "rscaffold").parts]).rstrip(".")
        for p in (ROOT / "rscaffold").rglob("__init__.py")
    }
    assert found <= listed, f"not packaged: {sorted(found - listed)}"
    assert {"rscaffold_tasks", "rscaffold_flows", "rscaffold._data"} <= listed


STAGE_HELPERS = {"common", "requests", "declare", "registry", "plan"}


def test_every_stage_module_declares_its_stage_in_the_registry():
    from rscaffold.stages.registry import DECLARED
    from rscaffold.vocabulary import STAGES

    stage_modules = sorted(
        p.stem for p in (ROOT / "rscaffold" / "stages").glob("*.py") if p.stem not in STAGE_HELPERS | {"__init__"}
    )
    declared = {d.name: d for d in DECLARED}
    assert sorted(declared) == stage_modules, "a stage module without a registry entry (or the reverse)"
    assert tuple(declared) == STAGES
    for name, decl in declared.items():
        module = __import__(f"rscaffold.stages.{name}", fromlist=["STAGE"])
        assert module.STAGE is decl, f"rscaffold.stages.{name}.STAGE is not the registry's entry"
        assert decl.run.__module__ == f"rscaffold.stages.{name}", f"{name}: runs another module's function"


def test_the_flow_reaches_every_declared_stage():
    """The full run computes every stage (the final one needs each, transitively), and the flow has
    a Prefect task for each (and for each declared shard function)."""
    from rscaffold_flows import pipeline
    from rscaffold_tasks.stages import SHARD_TASKS, STAGE_TASKS

    from rscaffold.config import PipelineConfig
    from rscaffold.stages.registry import DECLARED, stages_to_run

    names = [d.name for d in DECLARED]
    assert stages_to_run(PipelineConfig(), names[-1]) == names
    assert set(STAGE_TASKS) == set(names) and all(STAGE_TASKS[n].name == n for n in names)
    assert set(SHARD_TASKS) == {d.name for d in DECLARED if d.shards is not None}
    assert pipeline.STAGE_TASKS is STAGE_TASKS


def test_the_flow_names_no_stage():
    """The flow loops over the declarations: no stage's name is written in it."""
    from rscaffold.vocabulary import STAGES

    tree = ast.parse((ROOT / "flows" / "pipeline.py").read_text())
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in STAGES}
    assert named <= {"evaluation"}, f"flows/pipeline.py names stages {sorted(named)}"
