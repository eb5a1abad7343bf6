"""Prefect tasks, one module per stage: each wraps ``rscaffold.stages.<stage>.run_<stage>`` with its
cache key (the stage fingerprint), retries and UI artifacts, in a few lines.

Installed as the package ``rscaffold_tasks`` (a top-level ``tasks`` would collide with other
projects); see ``[tool.setuptools.package-dir]`` in pyproject.toml.
"""
