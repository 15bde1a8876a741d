"""Tests for smoa_jax/layers/linen_dense.py: the Linen twins equal the NNX layers and drop in for linen.Dense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax import linen as smoa_linen

CASES = {
    "smoa": (smoa_linen.SMoADense, smoa_jax.SMoADense, smoa_jax.SMoAConfig(r=6, num_blocks=3, alpha=12.0)),
    "hira": (smoa_linen.HiRADense, smoa_jax.HiRADense, smoa_jax.HiRAConfig(r=4, alpha=8.0)),
    "lora": (smoa_linen.LoRADense, smoa_jax.LoRADense, smoa_jax.LoRAConfig(r=4, alpha=8.0)),
}


def _pair(name):
  linen_cls, nnx_cls, config = CASES[name]
  x = jax.random.normal(jax.random.key(0), (3, 4, 13))
  module = linen_cls(features=22, config=config)
  variables = module.init(jax.random.key(1), x)
  params = dict(variables["params"])
  params["lora_b"] = 0.3 * jax.random.normal(jax.random.key(2), params["lora_b"].shape)
  variables = {**variables, "params": params}
  layer = nnx_cls(13, 22, config, kernel=params["kernel"], bias=params["bias"], rngs=nnx.Rngs(3))
  layer.lora_a[...] = params["lora_a"]
  layer.lora_b[...] = params["lora_b"]
  return module, variables, layer, x


@pytest.mark.parametrize("name", CASES)
def test_same_params_as_dense_plus_adapter(name):
  module, variables, _, x = _pair(name)
  dense_params = nn.Dense(22).init(jax.random.key(1), x)["params"]
  assert set(dense_params) | {"lora_a", "lora_b"} == set(variables["params"])
  assert variables["params"]["kernel"].shape == dense_params["kernel"].shape


@pytest.mark.parametrize("name", CASES)
def test_linen_and_nnx_give_same_outputs_and_gradients(name):
  module, variables, layer, x = _pair(name)
  if name == "smoa":  # the same kernel gives the same spectral order
    np.testing.assert_array_equal(variables["spectral"]["in_perm"], layer.in_perm[...])
    np.testing.assert_array_equal(variables["spectral"]["out_perm"], layer.out_perm[...])
  y_linen = module.apply(variables, x)
  np.testing.assert_allclose(y_linen, layer(x), rtol=1e-6, atol=1e-6)

  def linen_loss(adapter, x):
    params = {**variables["params"], **adapter}
    return jnp.sum(jnp.tanh(module.apply({**variables, "params": params}, x)))

  adapter = {"lora_a": variables["params"]["lora_a"], "lora_b": variables["params"]["lora_b"]}
  g_linen = jax.grad(linen_loss, argnums=(0, 1))(adapter, x)

  def nnx_loss(layer, x):
    return jnp.sum(jnp.tanh(layer(x)))

  g_layer, g_x = nnx.grad(nnx_loss, argnums=(nnx.DiffState(0, smoa_jax.TrainableParam), 1))(layer, x)
  np.testing.assert_allclose(g_linen[0]["lora_a"], g_layer["lora_a"][...], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_linen[0]["lora_b"], g_layer["lora_b"][...], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_linen[1], g_x, rtol=1e-5, atol=1e-6)


def test_refresh_spectral_follows_loaded_kernels():
  module, variables, _, x = _pair("smoa")
  new_kernel = jax.random.normal(jax.random.key(5), variables["params"]["kernel"].shape)
  loaded = {**variables, "params": {**variables["params"], "kernel": new_kernel}}
  refreshed = smoa_linen.refresh_spectral(module, loaded, x)
  expected = smoa_jax.spectral_blocks(new_kernel, 3)
  np.testing.assert_array_equal(refreshed["spectral"]["in_perm"], expected.in_perm)
  np.testing.assert_array_equal(refreshed["spectral"]["out_perm"], expected.out_perm)
  assert refreshed["params"] is loaded["params"]
  assert not np.array_equal(refreshed["spectral"]["in_perm"], variables["spectral"]["in_perm"])
  broken = {**variables, "params": {}}
  with pytest.raises(smoa_jax.ConfigError, match="no params"):
    smoa_linen.refresh_spectral(module, broken, x)


def test_refresh_spectral_uses_each_layers_spectral_method(monkeypatch):
  from smoa_jax.layers import linen_dense
  used = []
  original = linen_dense.spectral_orders
  monkeypatch.setattr(linen_dense, "spectral_orders",
                      lambda kernel, method: used.append(method) or original(kernel, method))
  config = smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8.0, spectral_method="svd")
  module = smoa_linen.SMoADense(6, config)
  x = jnp.ones((2, 5))
  variables = module.init(jax.random.key(0), x)
  used.clear()
  smoa_linen.refresh_spectral(module, variables, x)
  assert used == ["svd"]


def test_nested_model_and_dropout():
  config = smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8.0, dropout=0.5)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic):
      x = smoa_linen.SMoADense(16, config, name="up")(x, deterministic=deterministic)
      return smoa_linen.SMoADense(8, config, name="down")(nn.relu(x), deterministic=deterministic)

  x = jnp.ones((2, 12))
  variables = Model().init(jax.random.key(0), x, deterministic=True)
  assert set(variables["spectral"]) == {"up", "down"}
  refreshed = smoa_linen.refresh_spectral(Model(), variables, x, deterministic=True)
  np.testing.assert_array_equal(refreshed["spectral"]["up"]["in_perm"], variables["spectral"]["up"]["in_perm"])
  y_eval = Model().apply(variables, x, deterministic=True)
  y_train = Model().apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose(y_eval, y_train)  # b = 0: dropout on the adapter path changes nothing
  with pytest.raises(ValueError, match="deterministic"):
    smoa_linen.SMoADense(16, config).init(jax.random.key(0), x)


def test_wrong_config_type():
  with pytest.raises(smoa_jax.ConfigError, match="needs a LoRAConfig"):
    smoa_linen.LoRADense(4, smoa_jax.HiRAConfig()).init(jax.random.key(0), jnp.ones((1, 8)))
