"""Soak: a 1,000-step run SIGKILLed at three random points and resumed each time ends bit-identical
to a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.reliability import probe

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 1000, 100


def _soak(output: Path, *extra: str) -> subprocess.Popen:
  # The processes share XLA's compilation cache: a resumed run does not compile the step again.
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(output.parent / "xla_cache")}
  return subprocess.Popen([sys.executable, "-m", "tests.support.soak_run", str(output), str(STEPS),
                           str(SAVE_EVERY), *extra], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _last_step(metrics: Path) -> int:
  """The last training step logged so far (a half-written last line is skipped)."""
  step = 0
  if metrics.exists():
    for line in metrics.read_text().splitlines():
      try:
        step = max(step, json.loads(line)["step"])
      except (ValueError, KeyError):
        pass
  return step


def _adapter(output: Path) -> dict[str, np.ndarray]:
  return load_file(str(output / "adapter" / "adapter_model.safetensors"))


@probe("runs", "a 1,000-step run SIGKILLed at 3 random points (mid-step or mid-save), resumed "
       "after each kill", "the final adapter is bit-identical to an uninterrupted run's")
@pytest.mark.slow
@pytest.mark.subprocess
def test_a_run_killed_three_times_ends_bit_identical(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  reference = _soak(whole)
  # Kill when the log passes a random step, one in each third of the run: the SIGKILL then lands
  # anywhere in a step or a save (every draw must pass; the message names the draw).
  targets = [int(np.random.default_rng().integers(lo, lo + 250)) for lo in (150, 450, 750)]
  for i, target in enumerate(targets):
    proc = _soak(killed, *(["--resume"] if i else []))
    deadline = time.monotonic() + 600
    while _last_step(killed / "metrics.jsonl") < target:
      assert proc.poll() is None, f"kills at {targets}: ended before {target}: {proc.stderr.read()}"
      assert time.monotonic() < deadline, f"kills at {targets}: never reached step {target}"
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  resumed = _soak(killed, "--resume")
  for proc in (resumed, reference):
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
  assert _last_step(killed / "metrics.jsonl") == STEPS
  expected, got = _adapter(whole), _adapter(killed)
  assert expected.keys() == got.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key} (kills at {targets})")
