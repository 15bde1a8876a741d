"""Subprocess of tests/test_benchmarks.py: a benchmark worker (:mod:`benchmarks._procs`) whose
``build`` adds two instant candidates (``round``), a command that lists the calls so far, and
one that fails.

Usage: ``benchmarks._procs.Worker("tests.support.bench_worker")``.
"""

from __future__ import annotations

from typing import Any, Callable

from benchmarks import _procs


def build(handlers: dict[str, Callable[..., Any]], *, names: list[str]) -> dict[str, Any]:
  calls: list[str] = []
  group = {name: (lambda name=name: calls.append(name)) for name in names}
  handlers.update({"round": _procs.round_handler(group), "calls": lambda: calls,
                   "fail": lambda: 1 / 0})
  return {name: {} for name in names}


if __name__ == "__main__":
  _procs.run_worker(build)
