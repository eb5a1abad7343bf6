"""The orchestration level: the Prefect flows (the pipeline, one stage, serving), the command line
and the multi-GPU training launcher. These may import Prefect and ``rscaffold_tasks``; the library
(``rscaffold``) never imports them.

Installed as the package ``rscaffold_flows`` (a top-level ``flows`` would collide with other
projects); see ``[tool.setuptools.package-dir]`` in pyproject.toml.
"""
