"""Fixtures of the backend tests: the tiny teacher and the real server live in tests/conftest.py."""
