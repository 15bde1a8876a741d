"""Shared helpers of the benchmark scripts: timing, sizes, machine description, CLI, RESULTS.md.

Timing on a noisy, shared machine
    :func:`time_interleaved` runs every candidate once per *round*, round-robin (the starting
    candidate rotates from round to round), for many rounds, and keeps every sample. A slow
    spell (another process, thermal or frequency change) then hits all candidates of that round
    alike. :meth:`Timings.median` is the per-candidate median over rounds, and
    :meth:`Timings.ratio` the median over rounds of the *paired* per-round ratio, so ratios are
    always taken side by side within one run, never across runs. Both live in
    :mod:`benchmarks._timing` (no JAX import), re-exported here. Candidates of different
    runtimes (JAX, PyTorch) run in separate processes (:mod:`benchmarks._procs`) with rounds
    interleaved across them: in one process, the other runtime's threads and allocator state
    slow some candidates down (benchmarks/model_step.py says how).

Compiling and sizing
    Every JAX candidate is compiled ahead of time (:func:`aot_compile`, never timed) and run
    through :func:`blocking_call`; :func:`allocated_bytes` reads what one call allocates from
    XLA's buffer assignment. :func:`tree_nbytes` and :func:`tree_size` count the bytes and scalars
    of any pytree of arrays (JAX, abstract ``ShapeDtypeStruct``, NumPy or torch);
    :func:`format_mib` prints bytes in MiB.

RESULTS.md
    One file, one section per script, each between ``<!-- begin: NAME -->`` and
    ``<!-- end: NAME -->``. :func:`write_section` rewrites only its own section (appending it if
    new), leaves everything else byte for byte, and replaces the file atomically (temporary file
    in the same folder, then ``os.replace``). Every section records the date, the machine and the
    exact command that produced it (:func:`command_line`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from benchmarks._timing import Timings, time_interleaved, time_rounds

__all__ = [
    "RESULTS_PATH",
    "RESULTS_HEADER",
    "MIB",
    "GIB",
    "Timings",
    "time_interleaved",
    "time_rounds",
    "aot_compile",
    "blocking_call",
    "allocated_bytes",
    "compiled_cost",
    "array_nbytes",
    "tree_nbytes",
    "tree_size",
    "format_mib",
    "num_cores",
    "set_torch_threads",
    "load_average",
    "machine_description",
    "command_line",
    "markdown_table",
    "write_section",
    "atomic_write_text",
    "cli_argv",
    "benchmark_parser",
    "add_run_flags",
    "parse_ints",
    "parse_shape",
    "publish",
]

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

RESULTS_HEADER = """# Benchmark results

Measured numbers from the scripts in `benchmarks/`. Each section below is written by one script
and says how it was produced; regenerate a section by running the command shown in it from the
repository root (`--help` lists the options). Do not edit between the markers by hand. The
machine is shared: trust the ratios (measured side by side) more than absolute times.
"""

MIB = 2**20
GIB = 2**30

# Environment variables that change what a benchmark measures; recorded with the command.
_RELEVANT_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# -- compiling and sizing --------------------------------------------------------------------------
def aot_compile(fn: Callable, *args: Any, **jit_options: Any) -> jax.stages.Compiled:
  """``jax.jit(fn, **jit_options)`` lowered and compiled for ``args`` ahead of time, so that no
  timed call pays for tracing or compiling."""
  return jax.jit(fn, **jit_options).lower(*args).compile()


def blocking_call(compiled: Callable, *args: Any) -> Callable[[], Any]:
  """A zero-argument ``compiled(*args)`` that waits for the result: what :func:`time_interleaved`
  runs (JAX dispatches asynchronously; an unblocked call would time only the dispatch)."""
  return lambda: jax.block_until_ready(compiled(*args))


def allocated_bytes(compiled: jax.stages.Compiled) -> int:
  """Bytes one call allocates beyond its arguments, from XLA's buffer assignment: temporary plus
  output buffers, less the outputs that reuse donated argument buffers."""
  stats = compiled.memory_analysis()
  return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes


def compiled_cost(compiled: jax.stages.Compiled) -> tuple[float, float]:
  """``(flops, bytes accessed)`` of one call by XLA's cost analysis of the compiled program (0.0
  where the backend gives none). A loop body (``scan``) is counted once, not once per iteration."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def array_nbytes(array: Any) -> int:
  """``size x itemsize`` of one array: JAX, NumPy, torch, or abstract (``jax.ShapeDtypeStruct``)."""
  return int(np.prod(array.shape)) * array.dtype.itemsize


def tree_nbytes(tree: Any) -> int:
  """Bytes of all arrays in a pytree (an ``nnx.State``, an optimizer state, a list of torch
  tensors, ...); leaves without a dtype (Python numbers, empty states) count 0."""
  return sum(array_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def tree_size(tree: Any) -> int:
  """Number of scalars in all arrays of a pytree (a parameter count)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def format_mib(nbytes: int, decimals: int = 1) -> str:
  """Bytes as MiB for a table cell: ``format_mib(3 * 2**19) == "1.5"``, thousands with ``,``."""
  return f"{nbytes / MIB:,.{decimals}f}"


# -- the machine -----------------------------------------------------------------------------------
def num_cores() -> int:
  """CPU cores this process may run on (what XLA's CPU thread pool sizes itself to)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def set_torch_threads() -> int:
  """Give PyTorch as many threads as XLA's CPU client uses (every usable core), so that JAX and
  torch candidates run on the same cores; returns that number."""
  import torch  # here: only the scripts that time PyTorch need it

  threads = num_cores()
  torch.set_num_threads(threads)
  return threads


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
  atomic_write_text(path, text)


def atomic_write_text(path: Path, text: str) -> None:
  """Replace ``path`` by ``text`` atomically: a temporary file in the same folder, then
  ``os.replace``; readers see the old file or the new one, never a half-written one. An existing
  file keeps its permissions, a new one gets 0644."""
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


# -- command line ----------------------------------------------------------------------------------
def cli_argv(argv: Sequence[str] | None) -> list[str]:
  """A script's arguments: ``argv`` when ``main`` is called from Python, else the command line."""
  return list(sys.argv[1:] if argv is None else argv)


def minutes_log(started: float) -> Callable[[str], None]:
  """A progress printer: each line prefixed by the minutes since ``started``
  (a ``time.perf_counter()`` value), flushed at once for long runs."""
  def log(text: str) -> None:
    print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {text}", flush=True)

  return log


def benchmark_parser(module: str, description: str, **options: Any) -> argparse.ArgumentParser:
  """The parser of ``python -m module`` (``--help`` shows the command to type)."""
  return argparse.ArgumentParser(prog=f"python -m {module}", description=description, **options)


def add_run_flags(parser: argparse.ArgumentParser, *, quick: str,
                  no_write: str = "do not update benchmarks/RESULTS.md") -> None:
  """``--quick`` (a smoke run; help text ``quick``) and ``--no-write``, the last two options of
  every benchmark. A quick run must never write: the caller sets ``no_write`` when ``quick``."""
  parser.add_argument("--quick", action="store_true", help=quick)
  parser.add_argument("--no-write", action="store_true", help=no_write)


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


# -- the end of a run ------------------------------------------------------------------------------
def publish(section: str, title: str, body: str, *, module: str, argv: Sequence[str], write: bool,
            load_at_start: float, torch_threads: int | None = None) -> None:
  """Print a benchmark's ``body`` and machine line (:func:`machine_description`); with ``write``,
  rewrite its RESULTS.md section (:func:`write_section`) with the command that reproduces it."""
  machine = machine_description(load_at_start=load_at_start, torch_threads=torch_threads)
  print(body)
  print(f"machine: {machine}")
  if write:
    write_section(section, title, body, command=command_line(module, argv), machine=machine)
    print(f"updated {RESULTS_PATH.name}")
