"""Probes: determinism. Same seed and data give bit-identical adapter parameters on CPU.

On GPUs, XLA's default reductions (e.g. scatter-add, some convolution and matmul algorithms)
may be non-deterministic; set ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` for reproducible
runs at some speed cost. TPUs are deterministic for a fixed program and topology. Changing the
mesh or the number of devices changes reduction orders, so results then match only to rounding
(``tests/parallel/test_sharding.py`` checks 1e-5).
"""

import numpy as np

from tests.reliability import probe
from tests.support.state import adapter_arrays
from tests.support.toy import lm_run


@probe("determinism", "two training runs with the same seed and data (dropout on), and one with "
       "another seed", "bit-identical adapter parameters; a different seed differs")
def test_two_runs_with_one_seed_are_bit_identical(toy_run, tmp_path):
  b, _ = lm_run(tmp_path / "b")  # toy_run is the other run, made with the same seed
  b = adapter_arrays(b)
  assert b.keys() == toy_run.keys()
  for k, x in toy_run.items():
    np.testing.assert_array_equal(b[k], x, err_msg=k)
  c, _ = lm_run(tmp_path / "c", seed=4)
  c = adapter_arrays(c)
  assert any(not np.array_equal(c[k], x) for k, x in toy_run.items())
