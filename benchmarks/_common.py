"""Shared helpers of the benchmark scripts: interleaved timing, machine description, RESULTS.md.

Timing on a noisy, shared machine
    :func:`time_interleaved` runs every candidate once per *round*, round-robin (the starting
    candidate rotates from round to round), for many rounds, and keeps every sample. A slow
    spell (another process, thermal or frequency change) then hits all candidates of that round
    alike. :meth:`Timings.median` is the per-candidate median over rounds, and
    :meth:`Timings.ratio` the median over rounds of the *paired* per-round ratio, so ratios are
    always taken side by side within one run, never across runs. Candidates of different
    runtimes (JAX, PyTorch) go in separate groups with a pause between them, because one
    runtime's spinning worker threads slow down the other's next call.

RESULTS.md
    One file, one section per script, each between ``<!-- begin: NAME -->`` and
    ``<!-- end: NAME -->``. :func:`write_section` rewrites only its own section (appending it if
    new), leaves everything else byte for byte, and replaces the file atomically (temporary file
    in the same folder, then ``os.replace``). Every section records the date, the machine and the
    exact command that produced it (:func:`command_line`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "parse_shape",
    "RESULTS_PATH",
    "RESULTS_HEADER",
    "Timings",
    "time_interleaved",
    "num_cores",
    "load_average",
    "machine_description",
    "command_line",
    "markdown_table",
    "write_section",
]

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

RESULTS_HEADER = """# Benchmark results

Measured numbers from the scripts in `benchmarks/`. Each section below is written by one script
and says how it was produced; regenerate a section by running the command shown in it from the
repository root (`--help` lists the options). Do not edit between the markers by hand. The
machine is shared: trust the ratios (measured side by side) more than absolute times.
"""

# Environment variables that change what a benchmark measures; recorded with the command.
_RELEVANT_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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

  def ratio(self, numerator: str, denominator: str) -> float:
    """Median over rounds of ``t[numerator] / t[denominator]`` measured in the same round."""
    return statistics.median(n / d for n, d in zip(self.samples[numerator],
                                                   self.samples[denominator]))


def time_interleaved(*groups: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                     max_seconds: float | None = None, min_rounds: int = 3,
                     settle_seconds: float = 0.0) -> Timings:
  """Time candidates round-robin; each callable must block until its work is done.

  Args:
    groups: one or more mappings name -> zero-argument callable running one complete call
      (e.g. ending in ``jax.block_until_ready``). Names must be unique across groups. Every
      round runs the groups in order, each group's candidates round-robin with a start that
      rotates from round to round.
    rounds: number of timed rounds (one call of every candidate per round).
    warmup: untimed rounds first (first-call allocation, caches, lazy initialisation).
    max_seconds: stop early once the timed rounds have taken this long, after ``min_rounds``.
    min_rounds: rounds always run, whatever ``max_seconds`` says.
    settle_seconds: pause after each group. Runtimes whose worker threads spin-wait after a
      parallel region (libgomp under PyTorch, XLA's pool) otherwise steal cores from whatever
      runs next: on 2 cores a JAX call right after a torch call measured ~1.5x slower. Put each
      runtime in its own group and settle (0.2 s is enough) so that no candidate pays for
      another's threads.
  """
  names = [name for group in groups for name in group]
  if len(set(names)) != len(names):
    raise ValueError(f"candidate names must be unique across groups, got {names}")
  samples: dict[str, list[float]] = {name: [] for name in names}

  def run_round(i: int, record: bool) -> None:
    for group in groups:
      order = list(group)
      shift = i % len(order)
      for name in order[shift:] + order[:shift]:
        t0 = time.perf_counter()
        group[name]()
        if record:
          samples[name].append(time.perf_counter() - t0)
      if settle_seconds:
        time.sleep(settle_seconds)

  for i in range(warmup):
    run_round(i, record=False)
  start = time.perf_counter()
  gc_was_enabled = gc.isenabled()
  gc.collect()
  gc.disable()  # a collection inside one candidate's call would bias that sample only
  try:
    for i in range(rounds):
      run_round(i, record=True)
      gc.collect()
      if (max_seconds is not None and i + 1 >= min_rounds
          and time.perf_counter() - start > max_seconds):
        break
  finally:
    if gc_was_enabled:
      gc.enable()
  return Timings(samples)


def num_cores() -> int:
  """CPU cores this process may run on (what XLA's CPU thread pool sizes itself to)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def load_average() -> float:
  """The 1-minute load average (how busy the shared machine is); 0.0 where unavailable."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return 0.0


def machine_description(*, load_at_start: float | None = None,
                        torch_threads: int | None = None) -> str:
  """One line: CPU model, cores, load, JAX backend and threads, library versions (+ torch threads).

  Best called when the run ends with ``load_at_start`` (from :func:`load_average` at the start):
  it then reports the load at the start and now, which tells how busy the shared machine was.
  """
  import jax  # here, so that importing this module stays cheap

  cores = num_cores()
  load = (f"{load_average():.2f}" if load_at_start is None
          else f"{load_at_start:.2f} at start, {load_average():.2f} at end")
  parts = [f"{_cpu_model()} ({cores} usable of {os.cpu_count()} cores, 1-min load average "
           f"{load})",
           f"JAX backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
           f"XLA intra-op threads = {cores}"]
  if torch_threads is not None:
    parts.append(f"torch threads = {torch_threads}")
  versions = [f"python {platform.python_version()}"]
  for package in ("jax", "jaxlib", "flax", "numpy", "torch"):
    version = _version(package)
    if version is not None and (package != "torch" or torch_threads is not None):
      versions.append(f"{package} {version}")
  parts.append(", ".join(versions))
  return "; ".join(parts)


def command_line(module: str, argv: Sequence[str]) -> str:
  """The command that reproduces a run, from the repository root: env + ``python -m module args``."""
  env = [f"{name}={shlex.quote(os.environ[name])}" for name in _RELEVANT_ENV if name in os.environ]
  return " ".join(env + ["python", "-m", module] + [shlex.quote(a) for a in argv])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells are ``str()``-ed, numeric-looking columns right-aligned."""
  cells = [[str(c) for c in row] for row in rows]
  numeric = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?x?%?$|^n/a$|^-$")
  align = ["---:" if cells and all(numeric.match(r[i]) for r in cells) else ":---"
           for i in range(len(headers))]
  lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
  lines += ["| " + " | ".join(row) + " |" for row in cells]
  return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise ValueError(f"section name {name!r} must be letters, digits, '_', '.' or '-'.")
  return f"<!-- begin: {name} -->", f"<!-- end: {name} -->"


def write_section(name: str, title: str, body: str, *, command: str, machine: str,
                  path: Path = RESULTS_PATH) -> None:
  """Rewrite section ``name`` of ``path`` (RESULTS.md) atomically; other sections are untouched.

  The section is ``## title``, a line with the date, the command and the machine, then ``body``
  (markdown). A missing file is created with a short header; a missing section is appended.
  """
  begin, end = _markers(name)
  today = datetime.date.today().isoformat()
  section = (f"{begin}\n## {title}\n\n"
             f"Measured {today} with `{command}` on {machine}.\n\n"
             f"{body.strip()}\n{end}")
  text = path.read_text() if path.exists() else RESULTS_HEADER
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
  if len(pattern.findall(text)) > 1:
    raise ValueError(f"{path.name} has more than one '{name}' section; fix it by hand.")
  if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, mode)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def parse_ints(text: str) -> tuple[int, ...]:
  """``"2,4"`` -> ``(2, 4)``: a comma-separated list of ints given on a command line."""
  try:
    return tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated ints, e.g. 2,4") from None


def parse_shape(text: str) -> tuple[int, int]:
  """``"1024x1536"`` -> ``(1024, 1536)``: an ``in x out`` kernel shape given on a command line."""
  try:
    n_in, n_out = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"shape {text!r} must look like 1024x1536 (in x out)") from None
  return n_in, n_out


def publish(section: str, title: str, body: str, *, module: str, argv: Sequence[str],
            machine: str, write: bool) -> None:
  """Print a benchmark's ``body`` and machine line; with ``write``, rewrite its RESULTS.md section
  (:func:`write_section`) with the command that reproduces it."""
  print(body)
  print(f"machine: {machine}")
  if write:
    write_section(section, title, body, command=command_line(module, argv), machine=machine)
    print(f"updated {RESULTS_PATH.name}")
