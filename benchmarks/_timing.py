"""Interleaved timing, free of JAX and PyTorch so that every benchmark process can import it.

:func:`time_interleaved` (re-exported by :mod:`benchmarks._common`) times candidates in one
process; :func:`time_rounds` is the same loop over *round functions*, each timing one group of
candidates for one round and returning ``{name: seconds}`` -- a group in this process
(:func:`run_round`) or a worker process asked over a pipe (:mod:`benchmarks._procs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import statistics
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = ["Timings", "paused_gc", "run_round", "time_rounds", "time_interleaved"]

RoundFn = Callable[[int], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class Timings:
  """Per-candidate wall times in seconds, one sample per round (same length for all candidates)."""

  samples: dict[str, list[float]]

  @property
  def rounds(self) -> int:
    return len(next(iter(self.samples.values())))

  def median(self, name: str) -> float:
    """Median seconds per call of ``name``."""
    return statistics.median(self.samples[name])

  def ratios(self, numerator: str, denominator: str) -> list[float]:
    """``t[numerator] / t[denominator]`` of every round (both measured in the same round)."""
    return [n / d for n, d in zip(self.samples[numerator], self.samples[denominator])]

  def ratio(self, numerator: str, denominator: str) -> float:
    """Median over rounds of ``t[numerator] / t[denominator]`` measured in the same round."""
    return statistics.median(self.ratios(numerator, denominator))

  def ratio_quartiles(self, numerator: str, denominator: str) -> tuple[float, float]:
    """First and third quartiles of the per-round ratios: the spread a ratio is read against."""
    ratios = self.ratios(numerator, denominator)
    if len(ratios) < 2:
      return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
  """Collect, then keep the garbage collector off inside: a collection inside one candidate's
  call would bias that sample only."""
  was_enabled = gc.isenabled()
  gc.collect()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


def run_round(group: Mapping[str, Callable[[], Any]], i: int) -> dict[str, float]:
  """Call every candidate of ``group`` once, round-robin starting at candidate ``i mod n`` (the
  start rotates from round to round); returns the wall seconds of each call."""
  order = list(group)
  shift = i % len(order)
  seconds = {}
  for name in order[shift:] + order[:shift]:
    t0 = time.perf_counter()
    group[name]()
    seconds[name] = time.perf_counter() - t0
  return seconds


def time_rounds(round_fns: Sequence[RoundFn], *, rounds: int, warmup: int = 1,
                max_seconds: float | None = None, min_rounds: int = 3,
                settle_seconds: float = 0.0,
               on_round: Callable[[int, dict[str, float]], None] | None = None
                ) -> Timings:
  """Run ``round_fns`` in order, once per round (``fn(i)`` times one group in round ``i``).

  Args:
    round_fns: one function per group of candidates; the names they return must be unique
      across groups and the same in every round.
    rounds: number of timed rounds; ``warmup`` untimed rounds come first (first-call
      allocation, caches, lazy initialisation).
    max_seconds: stop early once the timed rounds have taken this long, after ``min_rounds``.
    settle_seconds: pause after each group. Runtimes whose worker threads spin-wait after a
      parallel region (libgomp under PyTorch, XLA's pool) otherwise steal cores from whatever
      runs next, in this process or another one on the same cores.
    on_round: called after each timed round with the number of rounds done and that round's
      ``{name: seconds}`` (progress, and partial numbers should a long run be stopped).
  """
  samples: dict[str, list[float]] = {}

  def one(i: int, record: bool) -> None:
    seen: set[str] = set()
    for fn in round_fns:
      seconds = fn(i)
      if seen & set(seconds):
        raise ValueError(f"candidate names must be unique across groups, got {sorted(seconds)}")
      seen |= set(seconds)
      if record:
        for name, s in seconds.items():
          samples.setdefault(name, []).append(s)
      if settle_seconds:
        time.sleep(settle_seconds)

  for i in range(warmup):
    one(i, record=False)
  start = time.perf_counter()
  with paused_gc():
    for i in range(rounds):
      one(i, record=True)
      gc.collect()
      if on_round is not None:
        on_round(i + 1, {name: seconds[-1] for name, seconds in samples.items()})
      if (max_seconds is not None and i + 1 >= min_rounds
          and time.perf_counter() - start > max_seconds):
        break
  return Timings(samples)


def time_interleaved(*groups: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                     max_seconds: float | None = None, min_rounds: int = 3,
                     settle_seconds: float = 0.0) -> Timings:
  """Time candidates round-robin in this process; each callable must block until its work is done.

  ``groups``: one or more mappings name -> zero-argument callable running one complete call
  (e.g. ending in ``jax.block_until_ready``). Every round runs the groups in order, each group's
  candidates round-robin with a start that rotates from round to round (:func:`run_round`);
  the other arguments are those of :func:`time_rounds`. Put each runtime in its own group and
  settle (0.2 s is enough) so that no candidate pays for another's spinning threads; better,
  put each runtime in its own process (:mod:`benchmarks._procs`).
  """
  names = [name for group in groups for name in group]
  if len(set(names)) != len(names):
    raise ValueError(f"candidate names must be unique across groups, got {names}")
  return time_rounds([functools.partial(run_round, group) for group in groups], rounds=rounds,
                     warmup=warmup, max_seconds=max_seconds, min_rounds=min_rounds,
                     settle_seconds=settle_seconds)
