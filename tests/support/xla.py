"""XLA settings of the test run, kept by every subprocess a test starts.

The tests' programs are tiny and each is compiled once or twice, so compiling is most of a test
run: 70% of the wall time of ``tests/training`` (202 compilations). LLVM's optimization level 0
cuts that compile time by a third (measured side by side on the toy LM: 126 s against 190 s of
compilation for the same 120 programs, identical losses) while the programs stay fast enough for
models of this size. A user's own ``--xla_backend_optimization_level`` in ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import os

__all__ = ["compile_fast", "with_devices"]

_OPTIMIZATION = "--xla_backend_optimization_level"
_DEVICES = "--xla_force_host_platform_device_count"


def compile_fast() -> None:
  """Add ``--xla_backend_optimization_level=0`` to ``XLA_FLAGS`` (before JAX starts)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if _OPTIMIZATION not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_OPTIMIZATION}=0".strip()


def with_devices(count: int) -> str:
  """``XLA_FLAGS`` for a subprocess with ``count`` simulated CPU devices and the run's other
  flags (so that it compiles as the test process does)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
  return " ".join([*flags, f"{_DEVICES}={count}"])
