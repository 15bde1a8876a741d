"""Subprocess of tests/test_benchmarks.py: a benchmark worker (:mod:`benchmarks._procs`) with two
instant candidates, a command that fails, and one that says which runtimes it imported.

Usage: ``benchmarks._procs.Worker("tests.support.bench_worker")``.
"""

from __future__ import annotations

import sys

from benchmarks import _procs


def main() -> None:
  calls: list[str] = []
  group = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
  _procs.serve({
      "round": _procs.round_handler(group),
      "calls": lambda: calls,
      "imported": lambda: sorted(m for m in ("jax", "torch") if m in sys.modules),
      "fail": lambda: 1 / 0,
  })


if __name__ == "__main__":
  main()
