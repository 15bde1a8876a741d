"""Tests for smoa_jax/layers/partition.py: labels, masks, freeze_base, and the optax.masked trap."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import smoa_jax

CONFIG = smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8.0)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = smoa_jax.linen.SMoADense(24, CONFIG, name="up")(x)
    h = nn.Dense(24, name="mid")(jax.nn.gelu(h))
    return smoa_jax.linen.SMoADense(6, CONFIG, name="down")(jax.nn.gelu(h))


class NNXMLP(nnx.Module):
  def __init__(self, linen_params, linen_spectral):
    p, s = linen_params, linen_spectral
    blocks = lambda name, w: smoa_jax.SpectralBlocks(
        s[name]["in_perm"], s[name]["out_perm"],
        smoa_jax.spectral_blocks(w, 2).in_sizes, smoa_jax.spectral_blocks(w, 2).out_sizes)
    self.up = smoa_jax.SMoADense(10, 24, CONFIG, kernel=p["up"]["kernel"], bias=p["up"]["bias"],
                                 blocks=blocks("up", p["up"]["kernel"]), rngs=nnx.Rngs(0))
    self.mid = nnx.Linear(24, 24, rngs=nnx.Rngs(0))
    self.mid.kernel[...], self.mid.bias[...] = p["mid"]["kernel"], p["mid"]["bias"]
    self.down = smoa_jax.SMoADense(24, 6, CONFIG, kernel=p["down"]["kernel"], bias=p["down"]["bias"],
                                   blocks=blocks("down", p["down"]["kernel"]), rngs=nnx.Rngs(0))
    for name in ("up", "down"):
      getattr(self, name).lora_a[...] = p[name]["lora_a"]
      getattr(self, name).lora_b[...] = p[name]["lora_b"]

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.mid(jax.nn.gelu(self.up(x)))))


def _data():
  x = jax.random.normal(jax.random.key(0), (32, 10))
  y = jnp.sin(x @ jax.random.normal(jax.random.key(1), (10, 6)))
  return x, y


def test_labels_for_linen_params_nnx_state_and_dicts():
  variables = LinenMLP().init(jax.random.key(0), jnp.ones((1, 10)))
  labels = smoa_jax.trainable_labels(variables["params"])
  assert labels["up"]["lora_a"] == "trainable" and labels["up"]["kernel"] == "frozen"
  assert labels["mid"]["kernel"] == "frozen"
  mask = smoa_jax.trainable_mask(variables["params"], extra="mid/bias")
  assert mask["mid"]["bias"] and not mask["mid"]["kernel"] and mask["down"]["lora_b"]
  layer = smoa_jax.SMoADense(8, 8, CONFIG, rngs=nnx.Rngs(0))
  state_labels = smoa_jax.trainable_labels(nnx.state(layer))
  assert state_labels["lora_a"] == "trainable" and state_labels["kernel"] == "frozen"
  assert state_labels["in_perm"] == "frozen"


def _optimizer_state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def test_freeze_base_zeroes_frozen_updates_and_keeps_no_moments():
  variables = LinenMLP().init(jax.random.key(0), jnp.ones((1, 10)))
  params = variables["params"]
  tx = smoa_jax.freeze_base(optax.adam(1e-2), params)
  state = tx.init(params)
  adapter_bytes = sum(v.nbytes for path, v in jax.tree_util.tree_leaves_with_path(params)
                      if str(path[-1].key).startswith("lora_"))
  # Adam keeps two moments per trainable array (+ a step count): nothing for frozen ones.
  assert _optimizer_state_bytes(state) <= 2 * adapter_bytes + 16
  assert _optimizer_state_bytes(optax.adam(1e-2).init(params)) > 4 * adapter_bytes
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.abs(updates["mid"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(updates["up"]["lora_a"]).max()) > 0.0


def test_bare_optax_masked_is_a_trap_and_the_recipe_is_not():
  params = {"kernel": jnp.ones((3, 3)), "lora_a": jnp.ones((3, 2))}
  grads = jax.tree.map(jnp.ones_like, params)
  mask = smoa_jax.trainable_mask(params)
  bare = optax.masked(optax.adam(1e-3), mask)
  updates, _ = bare.update(grads, bare.init(params), params)
  np.testing.assert_array_equal(updates["kernel"], grads["kernel"])  # frozen weight would move!
  recipe = smoa_jax.masked_recipe(optax.adam(1e-3), mask)
  updates, _ = recipe.update(grads, recipe.init(params), params)
  assert float(jnp.abs(updates["kernel"]).max()) == 0.0


def test_linen_optax_and_nnx_optimizer_train_identically():
  x, y = _data()
  module = LinenMLP()
  variables = module.init(jax.random.key(0), x)
  params = dict(variables["params"])
  for name in ("up", "down"):  # start from a non-trivial adapter so both factors get gradients
    params[name] = {**params[name], "lora_b": 0.1 * jnp.ones_like(params[name]["lora_b"])}
  variables = {**variables, "params": params}
  model = NNXMLP(params, variables["spectral"])

  # SMoA's update (a b) * W is scaled by W's entries: it wants ~10x LoRA's learning rate.
  tx = smoa_jax.freeze_base(optax.adam(1e-1), params)
  opt_state = tx.init(params)

  @jax.jit
  def linen_step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((module.apply({**variables, "params": p}, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=smoa_jax.TrainableParam)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                     argnums=nnx.DiffState(0, smoa_jax.TrainableParam))(model)
    optimizer.update(model, grads)
    return loss

  linen_losses, nnx_losses = [], []
  for _ in range(12):
    params, opt_state, loss = linen_step(params, opt_state)
    linen_losses.append(float(loss))
    nnx_losses.append(float(nnx_step(model, optimizer)))
  np.testing.assert_allclose(linen_losses, nnx_losses, rtol=1e-5)
  assert linen_losses[-1] < 0.8 * linen_losses[0]  # x0.50-0.68 over seeds 0-9 (init, data)
  for name in ("up", "down"):
    np.testing.assert_allclose(params[name]["lora_a"], getattr(model, name).lora_a[...], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params[name]["lora_b"], getattr(model, name).lora_b[...], rtol=1e-4, atol=1e-6)
    # The frozen base is bit-identical after training, on both sides; the adapter moved.
    np.testing.assert_array_equal(params[name]["kernel"], variables["params"][name]["kernel"])
    np.testing.assert_array_equal(getattr(model, name).kernel[...], variables["params"][name]["kernel"])
    assert not np.allclose(params[name]["lora_a"], variables["params"][name]["lora_a"])
  np.testing.assert_array_equal(params["mid"]["kernel"], variables["params"]["mid"]["kernel"])
