"""rscaffold: Reasoning Scaffolding (arXiv 2509.23619) as a pipeline library.

The library is pure Python and never imports Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

__version__ = "0.1.0"
