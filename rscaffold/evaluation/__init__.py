"""Scoring students on benchmarks: the evaluation suites, answer scoring and metrics, consistency
checks, the signals students generate, and the report.

Modules: :mod:`.suites`, :mod:`.metrics`, :mod:`.consistency`, :mod:`.signals`, :mod:`.report`.
"""
