"""Tests for smoa_jax/app/analysis.py: block statistics, effective rank, direction energy, plots."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.app import analysis
from smoa_jax.core.spectral import identity_blocks


def random_matrix(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape)


def test_effective_rank_counts_equal_singular_values():
  assert analysis.effective_rank(np.eye(5)) == pytest.approx(5.0)
  assert analysis.effective_rank(np.outer(np.arange(1, 4), np.ones(6))) == pytest.approx(1.0)
  assert analysis.effective_rank(np.zeros((3, 4))) == 0.0
  skewed = np.diag([1.0, 1e-3, 1e-3])  # dominated by one direction: close to 1, above it
  assert 1.0 < analysis.effective_rank(skewed) < 1.1


def test_numerical_rank():
  low = random_matrix((20, 3)) @ random_matrix((3, 30), seed=1)
  assert analysis.numerical_rank(low) == 3
  assert analysis.numerical_rank(random_matrix((20, 30))) == 20
  assert analysis.numerical_rank(np.zeros((4, 4))) == 0


def test_direction_energy_of_w_itself_is_its_spectrum():
  w = random_matrix((12, 12))
  s = np.linalg.svd(w, compute_uv=False)
  np.testing.assert_allclose(analysis.direction_energy(w, w), np.cumsum(s**2) / np.sum(s**2))


def test_direction_energy_of_the_top_direction_and_of_noise():
  w = random_matrix((16, 10))
  p, _, qt = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(analysis.direction_energy(np.outer(p[:, 0], qt[0]), w), 1.0)
  bottom = np.outer(p[:, -1], qt[-1])
  energy = analysis.direction_energy(bottom, w)
  assert np.all(energy[:-1] < 1e-12) and energy[-1] == pytest.approx(1.0)
  noise = analysis.direction_energy(random_matrix((16, 10), seed=3), w)
  assert np.all(np.diff(noise) >= -1e-12) and noise[-1] <= 1.0 + 1e-12
  assert np.all(analysis.direction_energy(np.zeros((16, 10)), w) == 0)


def test_block_statistics_of_a_block_diagonal_kernel():
  w = np.zeros((6, 4))
  w[:3, :2] = 1.0
  w[3:, 2:] = 2.0
  stats = analysis.block_statistics(w, identity_blocks(6, 4, 2))
  assert stats.in_sizes == (3, 3) and stats.out_sizes == (2, 2)
  assert stats.entry_share == pytest.approx((0.25, 0.25))
  assert stats.energy_share == pytest.approx((6 / 30, 24 / 30))
  assert stats.concentration == pytest.approx(2.0)


class TwoLayers(nnx.Module):
  def __init__(self, rngs):
    self.up_proj = nnx.Linear(24, 40, rngs=rngs)
    self.down_proj = nnx.Linear(40, 24, rngs=rngs)


def adapted(config):
  model = TwoLayers(nnx.Rngs(0))
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1), verbose=False)
  for _, layer in smoa_jax.adapter_layers(model):
    layer.lora_b[...] = jnp.asarray(random_matrix(layer.lora_b.shape, seed=2), layer.lora_b.dtype)
  return model


def test_smoa_updates_exceed_rank_r_and_lora_updates_do_not():
  targets = ["up_proj", "down_proj"]
  smoa = analysis.delta_statistics(adapted(smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8,
                                                               target_modules=targets)))
  lora = analysis.delta_statistics(adapted(smoa_jax.LoRAConfig(r=4, alpha=8,
                                                               target_modules=targets)))
  assert [s.path for s in smoa] == ["down_proj", "up_proj"]  # tree order
  for s in smoa:
    assert s.method == "smoa" and s.num_blocks == 2 and s.shape in ((24, 40), (40, 24))
    assert s.numerical_rank > s.r and s.effective_rank > s.r
    assert len(s.energy) == 24 and 0 < s.top_energy <= 1 and s.norm_ratio > 0
  for s in lora:
    assert s.numerical_rank == 4 and s.effective_rank <= 4 + 1e-9


def test_inspect_model_and_plots(tmp_path):
  config = smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8, target_modules=["up_proj"])
  report = analysis.inspect_model(adapted(config), config, plot=tmp_path / "dw.png")
  assert report.trainable_params == 2 * 2 * (12 + 20)
  assert report.lora_params == 4 * (24 + 40)
  assert tuple(report.blocks[0]["in_sizes"]) == (12, 12) and report.deltas[0]["path"] == "up_proj"
  assert (tmp_path / "dw.png").read_bytes()[:4] == b"\x89PNG"
  assert set(report.to_dict()) == {"method", "modules", "trainable_params", "lora_params",
                                   "blocks", "deltas", "plot"}
  history = [{"step": 1, "split": "train", "loss": 1.0}, {"step": 2, "split": "train", "loss": 0.5},
             {"step": 2, "split": "eval", "loss": 0.6, "accuracy": 0.7}]
  path = analysis.plot_training_curves({"a": history, "b": history[:2]}, tmp_path / "curves.png",
                                       title="t")
  assert path.read_bytes()[:4] == b"\x89PNG"
