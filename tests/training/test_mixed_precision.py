"""Mixed precision: a bfloat16 base with float32 adapters, optimizer state, logits and loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.layers.variables import TrainableParam
from smoa_jax.training.config import make_optimizer
from tests.support.toy import token_data

TARGETS = ["q_proj", "v_proj", "up_proj"]


def adapted(path, dtype, **config):
  model = smoa_jax.from_hf(path, dtype=dtype)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS, **config),
                         rngs=nnx.Rngs(1), verbose=False)
  return model


def dtypes(model, kind) -> set[str]:
  return {v.dtype.name for _, v in nnx.to_flat_state(nnx.state(model, kind))}


def opt_state_dtypes(model) -> set[str]:
  tx, _ = make_optimizer(smoa_jax.TrainConfig(steps=1, learning_rate=1e-3), 1)
  state = tx.init(nnx.state(model, TrainableParam))
  return {x.dtype.name for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("adapter_dtype,expected", [(None, "float32"), ("bfloat16", "bfloat16")])
def test_bfloat16_base_keeps_adapters_and_optimizer_in_their_dtype(llama_dir, adapter_dtype,
                                                                  expected):
  model = adapted(llama_dir, jnp.bfloat16,
                  **({} if adapter_dtype is None else {"adapter_dtype": adapter_dtype}))
  frozen = nnx.Not(TrainableParam)
  assert dtypes(model, nnx.All(nnx.Param, frozen)) == {"bfloat16"}  # every base weight
  assert dtypes(model, TrainableParam) == {expected}  # SMoA's a and b
  assert opt_state_dtypes(model) == {expected}  # AdamW's moments follow the factors
  data = {k: jnp.asarray(v) for k, v in token_data(4, vocab=97).items()}

  @nnx.jit  # one program (op by op, the two forwards compiled every primitive)
  def forward_and_loss(model, data):
    logits = model(data["input_ids"], attention_mask=data["attention_mask"])
    return logits, smoa_jax.CausalLMTask().loss(model, data)

  logits, (loss, weight, _) = forward_and_loss(model, data)
  assert logits.dtype == jnp.float32 and loss.dtype == jnp.float32 and weight.dtype == jnp.float32


def test_param_dtype_still_overrides_the_adapter_dtype():
  config = smoa_jax.SMoAConfig(4, 2, 8.0, adapter_dtype="bfloat16", param_dtype="float32")
  assert (config.param_dtype, config.adapter_dtype) == ("float32", "bfloat16")
  assert smoa_jax.LoRAConfig(4, adapter_dtype=jnp.bfloat16).param_dtype == "bfloat16"
  assert smoa_jax.HiRAConfig(4).param_dtype == "float32"


def test_bfloat16_first_loss_is_close_to_float32(llama_dir):
  data = token_data(8, vocab=97)
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = adapted(llama_dir, dtype)
    config = smoa_jax.TrainConfig(steps=1, batch_size=8, learning_rate=1e-2, log_every=1,
                                  progress=False)
    losses[dtype] = smoa_jax.train(model, smoa_jax.CausalLMTask(), data, config).history[0]["loss"]
  # bfloat16 rounds every weight and activation to 8 significant bits (relative error <= 2^-9,
  # about 2e-3); the mean loss (about ln 97 = 4.6) averages those errors over 8 x 12 tokens, and
  # moved by 1.2e-4 relative when measured. 2e-3 is the size of one rounding (a bfloat16 loss
  # near 4.6 moves in steps of 0.03, 7e-3 relative).
  assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-3)
