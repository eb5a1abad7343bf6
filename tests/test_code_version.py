"""Code versions from the import closure, insensitive to comments, docstrings and the package version."""

from __future__ import annotations

import importlib

import rscaffold
from rscaffold import code_version as cv


def test_comments_and_docstrings_do_not_change_a_module_digest(tmp_path, monkeypatch):
    source = importlib.util.find_spec("rscaffold.evalsets.answers").origin
    text = open(source).read()
    edited = tmp_path / "answers.py"
    end = text.index('"""', 3) + 3  # the module docstring, replaced; comments added around
    edited.write_text('# a new comment\n"""A rewritten docstring."""' + text[end:] + "\n# a last comment\n")
    changed = tmp_path / "answers_changed.py"
    changed.write_text(text + "\nX = 1\n")
    real = cv._source_path

    def digest_of(path):
        cv.module_digest.cache_clear()
        monkeypatch.setattr(cv, "_source_path", lambda m: path if m == "rscaffold.evalsets.answers" else real(m))
        try:
            return cv.module_digest("rscaffold.evalsets.answers")
        finally:
            monkeypatch.setattr(cv, "_source_path", real)
            cv.module_digest.cache_clear()

    original = digest_of(real("rscaffold.evalsets.answers"))
    assert digest_of(edited) == original
    assert digest_of(changed) != original


def test_code_version_differs_between_stages_and_is_stable():
    assert cv.code_version("rscaffold.stages.dataset") != cv.code_version("rscaffold.stages.teacher")
    assert cv.code_version("rscaffold.stages.dataset") == cv.code_version("rscaffold.stages.dataset")


def test_the_package_version_is_not_part_of_a_code_version(monkeypatch):
    before = cv.code_version("rscaffold.stages.teacher")
    monkeypatch.setattr(rscaffold, "__version__", "99.0")
    assert cv.code_version("rscaffold.stages.teacher") == before


def test_closure_follows_lazy_imports_and_leaves_config_out():
    closure = cv.import_closure("rscaffold.stages.teacher")
    assert "rscaffold.llm" in closure  # imported inside run_teacher
    assert "rscaffold.config" in closure  # in the closure, but its digest is not hashed:
    assert "rscaffold.config" in cv.EXCLUDED  # its values are in every fingerprint already


def test_no_module_of_the_config_package_enters_a_code_version(monkeypatch):
    closure = cv.import_closure("rscaffold.stages.training")
    assert {"rscaffold.config.training", "rscaffold.config.load"} <= set(closure)  # through the package
    before = cv.code_version("rscaffold.stages.training")
    real = cv.module_digest
    monkeypatch.setattr(cv, "module_digest", lambda m: "edited" if m.startswith("rscaffold.config") else real(m))
    assert cv.code_version("rscaffold.stages.training") == before


def test_fingerprints_and_show_config_import_no_torch_transformers_or_trl(tmp_path):
    import subprocess
    import sys

    code = """
import sys
from typer.testing import CliRunner
from rscaffold_flows.cli import app
for command in (["fingerprints"], ["show-config"]):
    result = CliRunner().invoke(app, [*command, "--artifacts-dir", sys.argv[1]] if command == ["fingerprints"] else command)
    assert result.exit_code == 0, result.output
print(sorted(m for m in ("torch", "transformers", "trl", "vllm") if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_modules_resolve_to_their_files_by_name():
    assert cv._source_path("rscaffold.training.trainer").name == "trainer.py"
    assert cv._source_path("rscaffold.llm").name == "__init__.py"
    assert cv._source_path("rscaffold.llm.create_backend") is None  # a function, not a module
    assert cv._source_path("torch") is None  # not ours
    assert "rscaffold.training.trainer" in cv.import_closure("rscaffold.stages.training")
