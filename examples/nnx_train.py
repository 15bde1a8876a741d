"""Train SMoA adapters inside an NNX model with nnx.Optimizer(wrt=smoa_jax.TrainableParam).

A small two-layer MLP regression stands in for a pretrained network: we adapt its layers with
``smoa_jax.apply_adapter`` and train only the adapter factors; the frozen kernels stay
bit-identical. Runs in a few seconds on a CPU:

    python examples/nnx_train.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import smoa_jax


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up_proj = nnx.Linear(32, 96, rngs=rngs)
    self.down_proj = nnx.Linear(96, 8, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.gelu(self.up_proj(x)))


def main(steps: int = 200) -> dict:
  model = MLP(nnx.Rngs(0))
  frozen_kernel = np.asarray(model.up_proj.kernel[...])
  config = smoa_jax.SMoAConfig(r=8, num_blocks=4, alpha=16.0, target_modules=["up_proj", "down_proj"])
  report = smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1))

  # A target the frozen model cannot fit: a random smooth function of the input.
  x = jax.random.normal(jax.random.key(2), (256, 32))
  y = jnp.tanh(x @ jax.random.normal(jax.random.key(3), (32, 8)) / 4)

  # SMoA's update (a b) * W is scaled by W's entries: ~10x the learning rate LoRA would take.
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=smoa_jax.TrainableParam)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    # DiffState(0, TrainableParam): gradients of the adapter factors only; frozen kernels get none.
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, smoa_jax.TrainableParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  assert np.array_equal(model.up_proj.kernel[...], frozen_kernel), "the base must stay frozen"
  print(f"{report.summary()}\nloss: {losses[0]:.4f} -> {losses[-1]:.4f}")
  smoa_jax.merge_and_unload(model)  # plain nnx.Linear layers again: inference costs the base model
  merged_loss = float(jnp.mean((model(x) - y) ** 2))
  print(f"merged model loss: {merged_loss:.4f}")
  return {"first_loss": losses[0], "last_loss": losses[-1], "merged_loss": merged_loss}


if __name__ == "__main__":
  main()
