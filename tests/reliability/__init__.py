"""The reliability probe suite: bad input, faults, and nothing lost.

Every probe is a test function decorated with :func:`probe`, which records the situation and the
outcome the test asserts. ``docs/reliability.md`` is rendered from these records by
``python -m tests.reliability.render`` and ``test_docs_table_is_current`` fails when it drifts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["PROBES", "Probe", "probe", "probe_cases"]


@dataclasses.dataclass(frozen=True)
class Probe:
  area: str
  situation: str
  outcome: str
  test: str


PROBES: list[Probe] = []


def probe(area: str, situation: str, outcome: str) -> Callable:
  """Register the decorated test as the probe for ``situation`` in ``area``."""

  def register(fn: Callable) -> Callable:
    PROBES.append(Probe(area, situation, outcome, f"{fn.__module__.rsplit('.', 1)[-1]}::{fn.__name__}"))
    return fn

  return register


def probe_cases(area: str, cases: dict[str, tuple[str, str]]) -> Callable:
  """Register a parametrized test: ``cases`` maps each case id to ``(situation, outcome)``."""

  def register(fn: Callable) -> Callable:
    name = f"{fn.__module__.rsplit('.', 1)[-1]}::{fn.__name__}"
    PROBES.extend(Probe(area, situation, outcome, f"{name}[{case}]")
                  for case, (situation, outcome) in cases.items())
    return fn

  return register
