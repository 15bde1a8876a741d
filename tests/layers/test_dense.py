"""Tests for smoa_jax/layers/dense.py: the NNX layers as drop-ins for nnx.Linear."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import smoa_jax

CONFIGS = {
    "smoa": smoa_jax.SMoAConfig(r=6, num_blocks=3, alpha=12.0),
    "smoa_uneven": smoa_jax.SMoAConfig(r=5, num_blocks=2, alpha=4.0, branch_ranks=(4, 1)),
    "hira": smoa_jax.HiRAConfig(r=4, alpha=8.0),
    "lora": smoa_jax.LoRAConfig(r=4, alpha=8.0),
}


def _layer(name, in_features=13, out_features=22, seed=0, perturb=True, **kwargs):
  linear = nnx.Linear(in_features, out_features, rngs=nnx.Rngs(seed), **kwargs)
  config = CONFIGS[name]
  layer = smoa_jax.adapter_class(config).from_linear(linear, config, rngs=nnx.Rngs(seed + 1))
  if perturb:  # b = 0 at init; give it values so the adapter does something
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + 2), layer.lora_b.shape)
  return linear, layer


def _x(shape=(2, 5, 13), seed=7):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("name", CONFIGS)
def test_drop_in_paths_and_types(name):
  linear, layer = _layer(name)
  assert layer.kernel is linear.kernel and layer.bias is linear.bias  # reused, not copied
  state = nnx.state(layer)
  assert {"kernel", "bias", "lora_a", "lora_b"} <= set(state.keys())
  assert isinstance(layer.lora_a, smoa_jax.TrainableParam) and issubclass(smoa_jax.TrainableParam, nnx.LoRAParam)
  assert smoa_jax.SMoAParam is smoa_jax.TrainableParam  # the first name stays an alias
  trainable = nnx.state(layer, smoa_jax.TrainableParam)
  assert set(trainable.keys()) == {"lora_a", "lora_b"}
  if name.startswith("smoa"):
    assert isinstance(layer.in_perm, smoa_jax.SpectralIndex)
    assert layer.in_perm.shape == (13,) and layer.out_perm.shape == (22,)


@pytest.mark.parametrize("name", CONFIGS)
def test_step_zero_is_the_base_layer(name):
  linear, layer = _layer(name, perturb=False)
  np.testing.assert_array_equal(layer(_x()), linear(_x()))


@pytest.mark.parametrize("name", CONFIGS)
def test_output_is_x_at_w_plus_dw_plus_bias(name):
  linear, layer = _layer(name)
  x = _x()
  want = x @ (linear.kernel[...] + layer.delta_weight()) + linear.bias[...]
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), want, rtol=1e-5, atol=1e-5)


class VariantsTest(chex.TestCase):
  """The same check under chex.variants: jitted and eager give x @ (W + dW) + b."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_smoa_layer(self):
    linear, layer = _layer("smoa")
    graphdef, state = nnx.split(layer)

    @self.variant
    def apply(state, x):
      return nnx.merge(graphdef, state)(x)

    x = _x()
    want = x @ (linear.kernel[...] + layer.delta_weight()) + linear.bias[...]
    np.testing.assert_allclose(apply(state, x), want, rtol=1e-5, atol=1e-5)


def test_delta_weight_is_zero_outside_blocks():
  _, layer = _layer("smoa")
  dw = np.asarray(layer.delta_weight())
  inside = np.zeros_like(dw, bool)
  for k in range(3):
    c, r = layer.blocks.block_indices(k)
    inside[np.ix_(c, r)] = True
  assert np.all(dw[~inside] == 0) and np.any(dw[inside] != 0)


@pytest.mark.parametrize("name", CONFIGS)
def test_merge_equals_unmerged_and_unmerge_restores(name):
  linear, layer = _layer(name)
  w0 = np.asarray(linear.kernel[...])
  x = _x()
  y = layer(x)
  dw = layer.delta_weight()
  layer.merge()
  assert layer.merged
  np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.delta_weight(), dw, rtol=1e-5, atol=1e-6)  # anchors from pristine W
  np.testing.assert_allclose(layer.kernel[...], w0 + dw, rtol=1e-6, atol=1e-6)
  layer.unmerge()
  np.testing.assert_allclose(layer.kernel[...], w0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_to_linear_and_disable(name):
  linear, layer = _layer(name)
  x = _x()
  base = x @ linear.kernel[...] + linear.bias[...]
  y = layer(x)
  with layer.disable():
    np.testing.assert_allclose(layer(x), base, rtol=1e-6, atol=1e-6)
    with layer.disable():
      pass
    np.testing.assert_allclose(layer(x), base, rtol=1e-6, atol=1e-6)  # nested exit keeps it off
  np.testing.assert_allclose(layer(x), y, rtol=1e-6, atol=1e-6)
  with pytest.raises(RuntimeError, match="boom"), layer.disable():
    raise RuntimeError("boom")
  assert not layer.disabled  # exception-safe
  plain = layer.to_linear()
  assert type(plain) is nnx.Linear
  np.testing.assert_allclose(plain(x), y, rtol=1e-5, atol=1e-5)
  layer.merge()
  with layer.disable():
    np.testing.assert_allclose(layer(x), base, rtol=1e-5, atol=1e-5)


def test_dropout_only_on_adapter_path():
  config = smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8.0, dropout=0.5)
  linear = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
  layer = smoa_jax.SMoADense.from_linear(linear, config, rngs=nnx.Rngs(params=1, dropout=2))
  layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
  x = _x((4, 12))
  key = jax.random.key(11)
  y = layer(x, rngs=key)
  x_dropped = nnx.Dropout(0.5)(x, deterministic=False, rngs=key)
  assert np.any(np.asarray(x_dropped) == 0)
  want = x @ linear.kernel[...] + linear.bias[...] + x_dropped @ layer.delta_weight()
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # Deterministic (eval) mode: no dropout, the folded path.
  want_eval = x @ (linear.kernel[...] + layer.delta_weight()) + linear.bias[...]
  np.testing.assert_allclose(layer(x, deterministic=True), want_eval, rtol=1e-5, atol=1e-5)
  layer.eval()
  np.testing.assert_allclose(layer(x), want_eval, rtol=1e-5, atol=1e-5)


def test_bf16_within_tolerance_of_float32():
  # bf16 weights and compute: the result stays within 3% (relative to the output scale) of fp32.
  _, layer32 = _layer("smoa")
  linear16 = nnx.Linear(13, 22, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  linear16.kernel[...] = layer32.kernel[...].astype(jnp.bfloat16)
  layer16 = smoa_jax.SMoADense.from_linear(linear16, CONFIGS["smoa"], rngs=nnx.Rngs(1))
  layer16.lora_b[...] = layer32.lora_b[...]
  x = _x()
  y16 = layer16(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  y32 = layer32(x)
  scale = float(jnp.abs(y32).max())
  assert float(jnp.abs(y16.astype(jnp.float32) - y32).max()) < 0.03 * scale
  assert layer16.delta_weight().dtype == jnp.float32  # the adapter computes in float32


def test_trainable_filter_trains_only_adapters_and_padding_stays_zero():
  _, layer = _layer("smoa_uneven", perturb=False)
  _, teacher = _layer("smoa_uneven")  # the same W and a, other b: a target the adapter can reach
  kernel0 = np.asarray(layer.kernel[...])
  # SMoA's update (a b) * W is scaled by W's entries: it wants ~10x LoRA's learning rate.
  optimizer = nnx.Optimizer(layer, optax.adam(1e-1), wrt=smoa_jax.TrainableParam)
  x = _x((8, 13))
  target = teacher(x)

  @nnx.jit
  def step(layer, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2),
                                     argnums=nnx.DiffState(0, smoa_jax.TrainableParam))(layer)
    optimizer.update(layer, grads)
    return loss

  losses = [float(step(layer, optimizer)) for _ in range(15)]
  assert losses[-1] < 0.25 * losses[0]  # x0.04-0.06 over seeds 0-9 (W, a, b*, x)
  np.testing.assert_array_equal(layer.kernel[...], kernel0)
  a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
  layout = layer.op.layout  # in 13 = 7 + 6, out 22 = 11 + 11, ranks (4, 1)
  assert np.all(a[1, 6:] == 0) and np.all(a[1, :, 1:] == 0) and np.all(b[1, 1:] == 0)
  assert layout.num_params == layer.num_trainable_params == 4 * (7 + 11) + 1 * (6 + 11)


def test_bad_construction():
  with pytest.raises(smoa_jax.ConfigError, match="too large"):
    smoa_jax.SMoADense(3, 40, smoa_jax.SMoAConfig(r=4, num_blocks=4), rngs=nnx.Rngs(0))
  with pytest.raises(smoa_jax.ConfigError, match="needs a SMoAConfig"):
    smoa_jax.SMoADense(8, 8, smoa_jax.LoRAConfig(r=2), rngs=nnx.Rngs(0))
  with pytest.raises(smoa_jax.KernelError, match="NaN"):
    smoa_jax.SMoADense(8, 8, smoa_jax.SMoAConfig(r=2), kernel=jnp.full((8, 8), jnp.nan), rngs=nnx.Rngs(0))
  with pytest.raises(smoa_jax.KernelError, match="expected"):
    smoa_jax.SMoADense(8, 8, smoa_jax.SMoAConfig(r=2), kernel=jnp.ones((8, 9)), rngs=nnx.Rngs(0))


def test_direct_construction_like_nnx_linear():
  layer = smoa_jax.SMoADense(16, 24, smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8), use_bias=False,
                             precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
  assert layer.bias is None and layer.kernel.shape == (16, 24)
  assert layer(jnp.ones((3, 16))).shape == (3, 24)
