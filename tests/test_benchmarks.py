"""Smoke tests of the benchmark scripts, so that they cannot rot.

Each script's ``main`` runs in-process with ``--quick --no-write`` (tiny sizes, a few rounds);
the authors' PyTorch algorithm is checked against smoa_jax on a tiny layer, and the RESULTS.md
writer is checked to touch only its own section.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import smoa_jax

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of scripts at the repo root, not installed
  sys.path.insert(0, str(ROOT))

from benchmarks import _common, layer_step, quality_synthetic, spectral_prep  # noqa: E402
from benchmarks.authors_torch import compare_with_smoa_jax  # noqa: E402


def _results_text() -> str | None:
  return _common.RESULTS_PATH.read_text() if _common.RESULTS_PATH.exists() else None


def test_layer_step_quick_runs_and_does_not_write():
  before = _results_text()
  body = layer_step.main(["--quick", "--no-write"])
  assert "80x47" in body and "SMoA/LoRA" in body and "authors/SMoA" in body
  assert "merged/base" in body
  assert _results_text() == before


def test_spectral_prep_quick_runs_and_does_not_write():
  before = _results_text()
  body = spectral_prep.main(["--quick", "--no-write"])
  assert "48x96" in body and "same block K=2" in body
  assert _results_text() == before


def test_quality_synthetic_quick_runs_and_does_not_write():
  before = _results_text()
  body = quality_synthetic.main(["--quick", "--no-write"])
  rows = [line for line in body.splitlines() if line.startswith("| random 96x160 |")]
  assert len(rows) == len(quality_synthetic.TARGETS) * len(quality_synthetic.METHODS)
  assert sum("**best**" in row for row in rows) == len(quality_synthetic.TARGETS)
  assert _results_text() == before


@pytest.mark.parametrize("method", quality_synthetic.METHODS)
def test_quality_synthetic_fits_an_update_it_can_represent(method):
  # Each method's own dW at random factors is a target it can reach: the fit must get close,
  # starting from other factors, or the fitter (shared over seeds and learning rates) is broken.
  w = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
  delta_fn, init = quality_synthetic.method_delta(method, w, r=4, k=2)
  a, b = init(jax.random.key(0))
  target = np.asarray(delta_fn((a, jax.random.normal(jax.random.key(1), b.shape))))
  fit = quality_synthetic.make_fitter(delta_fn, steps=300)
  start, _ = quality_synthetic.run_fit(fit, init(jax.random.key(2)), target, 0.0)
  err, dw = quality_synthetic.run_fit(fit, init(jax.random.key(2)), target, 3e-2)
  assert start == pytest.approx(1.0) and err < 0.1, (start, err)
  assert dw.shape == w.shape


@pytest.mark.parametrize(
    "n_in, n_out, config",
    [
        pytest.param(24, 40, smoa_jax.SMoAConfig(r=5, num_blocks=3, alpha=8), id="uneven-blocks"),
        pytest.param(40, 24, smoa_jax.SMoAConfig(r=5, num_blocks=3, alpha=8,
                                                 branch_ranks=(3, 0, 2)), id="frozen-block"),
    ])
def test_authors_torch_matches_smoa_jax(n_in, n_out, config):
  linear = nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0))
  linear.bias[...] = jax.random.normal(jax.random.key(3), (n_out,))
  layer = smoa_jax.SMoADense.from_linear(linear, config, rngs=nnx.Rngs(1))
  # Non-zero b, so the adapter path really contributes (padding entries meet zero anchors).
  layer.lora_b[...] = jax.random.normal(jax.random.key(2), layer.lora_b.shape)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, n_in), dtype=np.float32)
  dy = rng.standard_normal((16, n_out), dtype=np.float32)
  diffs = compare_with_smoa_jax(layer, x, dy)
  assert all(v <= 1e-5 for v in diffs.values()), diffs


def test_write_section_rewrites_only_its_section(tmp_path):
  path = tmp_path / "RESULTS.md"
  kwargs = dict(command="python -m benchmarks.x --flag", machine="test machine", path=path)
  _common.write_section("a", "A", "first", **kwargs)
  _common.write_section("b", "B", "| t |\n| --- |", **kwargs)
  text = path.read_text()
  assert text.startswith(_common.RESULTS_HEADER)
  b_section = text[text.index("<!-- begin: b -->"):]
  _common.write_section("a", "A", "second", **kwargs)
  new = path.read_text()
  assert "second" in new and "first" not in new
  assert new.endswith(b_section) and new.count("<!-- begin: a -->") == 1
  assert "`python -m benchmarks.x --flag` on test machine" in new
  assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temp file left behind


def test_time_interleaved_rotates_within_groups():
  calls = []
  timings = _common.time_interleaved({"a": lambda: calls.append("a"),
                                      "b": lambda: calls.append("b")},
                                     {"c": lambda: calls.append("c")}, rounds=3, warmup=1)
  assert timings.rounds == 3 and len(calls) == 12
  # Groups run in order; the start rotates within each group from round to round.
  assert calls == ["a", "b", "c"] + ["a", "b", "c", "b", "a", "c", "a", "b", "c"]  # warmup first
  assert timings.ratio("a", "a") == 1.0
