"""Prefect tasks, made from the stage declarations (:mod:`rscaffold_tasks.stages`): each wraps a
stage's ``run_<stage>`` (or one of its shard functions) with its cache key (the stage fingerprint),
retries and UI artifacts.

Installed as the package ``rscaffold_tasks`` (a top-level ``tasks`` would collide with other
projects); see ``[tool.setuptools.package-dir]`` in pyproject.toml.
"""
