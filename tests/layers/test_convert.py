"""Tests for smoa_jax/layers/convert.py: SMoA and HiRA adapters as truncated-SVD LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from tests.support.toy import ToyLM, token_data

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _ids():
  return jnp.asarray(token_data(4)["input_ids"])


def _trained(config, seed=0, name=None, model=None):
  model = model or ToyLM()
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1), verbose=False, name=name)
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + i), layer.lora_b.shape)
  model.eval()
  return model


def _deltas(model):
  return {path: np.asarray(layer.delta_weight(), np.float64)
          for path, layer in smoa_jax.adapter_layers(model)}


def test_full_rank_conversion_is_exact_and_keeps_the_kernels():
  model = _trained(smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS))
  logits = model(_ids())
  kernel = model.layers[0].self_attn.q_proj.kernel
  report = smoa_jax.to_lora(model, rank=10_000)
  assert isinstance(model.layers[0].self_attn.q_proj, smoa_jax.AdaptedDense)
  assert model.layers[0].self_attn.q_proj.kernel is kernel
  assert {l.config.method for _, l in smoa_jax.adapter_layers(model)} == {"lora"}
  assert report.max_error < 1e-5 and len(report.layers) == 8
  assert {c.rank for c in report.layers if c.path.endswith("q_proj")} == {16}
  np.testing.assert_allclose(model(_ids()), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["smoa", "hira"])
def test_fixed_rank_is_the_best_rank_k_approximation(method):
  config = (smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS) if method == "smoa"
            else smoa_jax.HiRAConfig(r=4, alpha=8.0, target_modules=TARGETS))
  model = _trained(config)
  before = _deltas(model)
  report = smoa_jax.to_lora(model, rank=3)
  after = _deltas(model)
  for row in report.layers:
    u, s, vt = np.linalg.svd(before[row.path], full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    assert row.rank == 3 and row.method == method
    np.testing.assert_allclose(after[row.path], best, atol=1e-5)
    expected = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2))
    assert row.relative_error == pytest.approx(expected, rel=1e-4)
    # SMoA / HiRA updates are high-rank: rank 3 must lose something, and not everything.
    assert 0.01 < row.relative_error < 1.0


def test_energy_picks_the_smallest_rank_per_layer():
  model = _trained(smoa_jax.SMoAConfig(8, 2, 8.0, target_modules=TARGETS))
  before = _deltas(model)
  report = smoa_jax.to_lora(model, energy=0.9)
  ranks = {c.rank for c in report.layers}
  assert len(ranks) > 1  # chosen per layer
  for row in report.layers:
    s2 = np.linalg.svd(before[row.path], compute_uv=False) ** 2
    kept = np.cumsum(s2) / s2.sum()
    assert kept[row.rank - 1] >= 0.9 - 1e-6 and (row.rank == 1 or kept[row.rank - 2] < 0.9)
    assert row.relative_error <= np.sqrt(0.1) + 1e-6
  assert "relative error" in str(report) and "mean rank" in report.summary()


def test_lora_layers_and_other_adapters_are_left_alone():
  model = _trained(smoa_jax.LoRAConfig(r=2, alpha=4.0, target_modules=["v_proj"]))
  lora_v = np.asarray(model.layers[0].self_attn.v_proj.lora_a[...])
  _trained(smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj"]), model=model)
  _trained(smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj"]), name="other", seed=5,
           model=model)
  other = model(_ids())
  smoa_jax.set_adapter(model, "default")
  report = smoa_jax.to_lora(model, rank=2)
  assert {c.path for c in report.layers} == {f"layers/{i}/self_attn/q_proj" for i in (0, 1)}
  assert model.layers[0].self_attn.q_proj.adapter_names == ("default", "other")
  np.testing.assert_array_equal(model.layers[0].self_attn.v_proj.lora_a[...], lora_v)
  smoa_jax.set_adapter(model, "other")
  np.testing.assert_array_equal(model(_ids()), other)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"), (dict(rank=2, energy=0.5), "exactly one"), (dict(rank=0), "rank=0"),
    (dict(energy=1.5), "energy=1.5"), (dict(energy=0.0), "energy=0.0")])
def test_bad_arguments(kwargs, match):
  with pytest.raises(smoa_jax.ConfigError, match=match):
    smoa_jax.to_lora(_trained(smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS)), **kwargs)


def test_merged_layers_are_refused():
  model = _trained(smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS))
  smoa_jax.merge_adapters(model)
  with pytest.raises(smoa_jax.ConfigError, match="unmerge"):
    smoa_jax.to_lora(model, rank=2)
