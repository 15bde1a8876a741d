"""XLA settings of the test run, kept by every subprocess a test starts.

The tests' programs are tiny and each is compiled once or twice, so compiling is most of a test
run: 70% of the wall time of ``tests/training`` (202 compilations). LLVM's optimization level 0
cuts that compile time by a third (measured side by side on the toy LM: 126 s against 190 s of
compilation for the same 120 programs, identical losses) while the programs stay fast enough for
models of this size. A user's own ``--xla_backend_optimization_level`` in ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["compile_fast", "share_compilations", "with_devices"]

_OPTIMIZATION = "--xla_backend_optimization_level"
_DEVICES = "--xla_force_host_platform_device_count"
_CACHE = "JAX_COMPILATION_CACHE_DIR"
_MIN_COMPILE_SECONDS = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
# Programs that compile faster than this are not worth a cache file (most eager single ops).
_CACHED_FROM_SECONDS = "0.3"


def compile_fast() -> None:
  """Add ``--xla_backend_optimization_level=0`` to ``XLA_FLAGS`` (before JAX starts)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if _OPTIMIZATION not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_OPTIMIZATION}=0".strip()


def share_compilations() -> str | None:
  """Give every process of the test run one JAX compilation cache in a new temporary directory.

  Both pytest workers build the same session fixtures, and the subprocess tests compile the steps
  their parent already compiled; with a shared cache each such program compiles once per run.
  Call before JAX starts. Returns the directory when this call created it (the caller removes it
  at the end of the run), ``None`` when ``JAX_COMPILATION_CACHE_DIR`` was already set (a worker
  inherits its controller's; a user's own cache is kept).
  """
  if os.environ.get(_CACHE):
    return None
  directory = tempfile.mkdtemp(prefix="smoa-jax-tests-xla-cache-")
  os.environ[_CACHE] = directory
  os.environ.setdefault(_MIN_COMPILE_SECONDS, _CACHED_FROM_SECONDS)
  return directory


def with_devices(count: int) -> str:
  """``XLA_FLAGS`` for a subprocess with ``count`` simulated CPU devices and the run's other
  flags (so that it compiles as the test process does)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
  return " ".join([*flags, f"{_DEVICES}={count}"])
