"""SMoA in a Flax Linen model, trained with plain optax and the base frozen by smoa_jax.freeze_base.

``smoa_jax.linen.SMoADense`` is a drop-in for ``flax.linen.Dense``. After loading pretrained
kernels into ``params``, ``smoa_jax.linen.refresh_spectral`` recomputes the spectral permutations
from them. ``smoa_jax.freeze_base(tx, params)`` (optax.partition + set_to_zero) trains the
``lora_a``/``lora_b`` leaves only, and keeps no optimizer moments for the frozen ones; a bare
``optax.masked(tx, mask)`` would NOT freeze the base (it passes masked updates through). Run:

    python examples/linen_optax_masked.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import smoa_jax

CONFIG = smoa_jax.SMoAConfig(r=8, num_blocks=2, alpha=16.0)


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = smoa_jax.linen.SMoADense(64, CONFIG, name="up")(x)
    return smoa_jax.linen.SMoADense(4, CONFIG, name="down")(jax.nn.gelu(h))


def main(steps: int = 200) -> dict:
  x = jax.random.normal(jax.random.key(0), (256, 16))
  y = jnp.sin(x @ jax.random.normal(jax.random.key(1), (16, 4)))
  model = Model()
  variables = model.init(jax.random.key(2), x)
  # Stand-in for loading pretrained kernels, then refreshing the spectral order from them.
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 3.0 if path[-1].key == "kernel" else v, variables["params"])
  variables = smoa_jax.linen.refresh_spectral(model, {**variables, "params": params}, x)
  params = variables["params"]

  # SMoA's update (a b) * W is scaled by W's entries: ~10x the learning rate LoRA would take.
  tx = smoa_jax.freeze_base(optax.adam(3e-2), params)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      return jnp.mean((model.apply({**variables, "params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  for name in ("up", "down"):
    assert np.array_equal(params[name]["kernel"], variables["params"][name]["kernel"])
  print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} (kernels unchanged)")
  return {"first_loss": losses[0], "last_loss": losses[-1]}


if __name__ == "__main__":
  main()
