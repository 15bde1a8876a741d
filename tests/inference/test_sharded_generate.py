"""Generation with weights and adapters sharded on simulated 8-device CPU meshes equals the
single-device generation (the checks run in a subprocess: tests/support/sharded_generate.py).
Slow: six programs compiled for 8 simulated devices take minutes on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import xla

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.subprocess
def test_sharded_models_generate_the_single_device_ids():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla.with_devices(8)}
  proc = subprocess.run([sys.executable, "-m", "tests.support.sharded_generate"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=2400)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
  assert proc.stdout.count("same ids") == 2
