"""Benchmark worker processes: one runtime per process, asked for one round at a time over a pipe.

Why. On 2 cores, JAX candidates timed in a process that also held (and ran) the PyTorch models
measured up to 1.5x slower than in a JAX-only process (benchmarks/model_step.py and RESULTS.md
say what it was). With one process per runtime, neither runtime's thread pools, allocator or
memory state lives in the other's process, and the rounds are still interleaved, so a slow
spell of the shared machine hits both alike.

Protocol. The parent starts ``python -m <module>`` (:class:`Worker`) with a pipe on its stdin and
stdout; the worker calls :func:`serve` with its command handlers. Each request is one JSON line
``{"cmd": name, **arguments}``, each answer one JSON line (the handler's return value, or
``{"error": traceback}``). The worker's own output (logs, progress bars) goes to stderr, which it
shares with the parent. Only this module and :mod:`benchmarks._timing` are imported by every
process: neither imports JAX or PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from benchmarks._timing import paused_gc, run_round

__all__ = ["Worker", "WorkerError", "serve", "run_worker", "round_handler", "imported_runtimes"]

ROOT = Path(__file__).resolve().parents[1]  # the repository root: ``benchmarks`` is importable


class WorkerError(RuntimeError):
  """A worker process failed; the message holds its traceback."""


class Worker:
  """A worker process ``python -m module``; :meth:`call` sends one request and waits for the answer.

  Use as a context manager: leaving it asks the worker to quit and waits for it (killing it if
  it does not end within ``timeout`` seconds).
  """

  def __init__(self, module: str, *, timeout: float = 60.0):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    self.module = module
    self.timeout = timeout
    self.process = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def call(self, cmd: str, **arguments: Any) -> Any:
    """Send ``cmd`` with JSON-serialisable ``arguments``; return the worker's answer."""
    assert self.process.stdin is not None and self.process.stdout is not None
    try:
      self.process.stdin.write(json.dumps({"cmd": cmd, **arguments}) + "\n")
      self.process.stdin.flush()
    except BrokenPipeError:
      pass  # the worker died; readline below returns "" and the error says so
    line = self.process.stdout.readline()
    if not line:
      raise WorkerError(f"worker {self.module} ended (exit code {self.process.wait()}) during "
                        f"{cmd!r}; its output above says why.")
    answer = json.loads(line)
    if isinstance(answer, dict) and "error" in answer:
      raise WorkerError(f"worker {self.module} failed during {cmd!r}:\n{answer['error']}")
    return answer

  def round(self, i: int) -> dict[str, float]:
    """Time the worker's candidates for round ``i`` (:func:`round_handler`)."""
    return self.call("round", i=i)

  def __enter__(self) -> "Worker":
    return self

  def __exit__(self, *exc: Any) -> None:
    try:
      if self.process.poll() is None and self.process.stdin is not None:
        self.process.stdin.close()  # EOF: serve() returns
      self.process.wait(timeout=self.timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


def round_handler(group: Mapping[str, Callable[[], Any]]) -> Callable[..., dict[str, float]]:
  """The ``round`` command of a worker timing ``group``: one round, the collector paused."""
  def handle(i: int) -> dict[str, float]:
    with paused_gc():
      return run_round(group, i)

  return handle


def serve(handlers: Mapping[str, Callable[..., Any]]) -> None:
  """Answer requests from the parent until stdin closes (the worker's main loop).

  ``handlers`` maps a command name to a function taking the request's arguments as keywords and
  returning a JSON-serialisable answer. Commands may add handlers (e.g. ``build`` adds
  ``round``): pass a dict and mutate it. An exception is sent back as ``{"error": ...}`` and ends
  the worker.
  """
  answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints and C-level output -> stderr
  sys.stdout = sys.stderr
  for line in sys.stdin:
    request = json.loads(line)
    try:
      answer = handlers[request.pop("cmd")](**request)
    except BaseException:
      answers.write(json.dumps({"error": traceback.format_exc()}) + "\n")
      answers.flush()
      raise
    answers.write(json.dumps(answer) + "\n")
    answers.flush()


def imported_runtimes() -> list[str]:
  """Which of ``jax`` and ``torch`` this process has imported (the parent checks the split)."""
  return sorted(m for m in ("jax", "torch") if m in sys.modules)


def run_worker(build: Callable[..., Mapping[str, Any]]) -> None:
  """The main loop of a benchmark worker: ``build(handlers, **arguments)`` answers the ``build``
  command and adds the other commands (``round``, ...) to ``handlers``; its answer gets an
  ``"imported"`` entry, :func:`imported_runtimes` after building."""
  handlers: dict[str, Callable[..., Any]] = {}

  def handle_build(**arguments: Any) -> dict[str, Any]:
    answer = dict(build(handlers, **arguments))
    return {"imported": imported_runtimes(), **answer}

  handlers["build"] = handle_build
  serve(handlers)
