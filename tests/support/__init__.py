"""Shared helpers for the tests (no tests here): tiny models and data, Hugging Face checkpoints,
CLI helpers, reference implementations, and the entry points of test subprocesses.

Test modules import from here or take the session fixtures of ``tests/conftest.py``; no test
module imports another test module, and nothing imports from ``examples/``.
"""
