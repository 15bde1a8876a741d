"""Rematerialisation (:func:`smoa_jax.set_remat`, ``TrainConfig.remat``): the same losses and
gradients as without it, and a smaller compiled step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.core.spectral import SpectralBlocks, split_sizes
from smoa_jax.layers.sites import sites_by_name
from smoa_jax.layers.stacked import stack_blocks
from smoa_jax.layers.variables import TrainableParam
from smoa_jax.models import build_model
from smoa_jax.models.blocks import REMAT_POLICIES
from smoa_jax.training.tasks import CausalLMTask
from tests.support.toy import token_data

VOCAB = 61
LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=32,
             intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
GPT2 = dict(architectures=["GPT2LMHeadModel"], vocab_size=VOCAB, n_positions=64, n_embd=32,
            n_layer=3, n_head=4)
TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def random_blocks(model: nnx.Module) -> dict[str, SpectralBlocks]:
  """K=2 blocks over random permutations for every linear layer (what SMoA computes from W's
  spectrum would do as well; the layers only need some permutation, and this is fast)."""
  rng = np.random.default_rng(3)

  def blocks(n_in: int, n_out: int) -> SpectralBlocks:
    return SpectralBlocks(jnp.asarray(rng.permutation(n_in), jnp.int32),
                          jnp.asarray(rng.permutation(n_out), jnp.int32), split_sizes(n_in, 2),
                          split_sizes(n_out, 2))

  return {name: (stack_blocks([blocks(*site.shape) for _ in range(site.num_layers)])
                 if site.num_layers else blocks(*site.shape))
          for name, site in sites_by_name(model).items()}


def adapted_model(family: str, scan: bool, config: dict | None = None,
                  dropout: float = 0.0) -> nnx.Module:
  """A tiny random model with SMoA adapters whose factors are all random (b is zero at init,
  which would leave a's gradient zero and the comparison blind to it)."""
  model = build_model(config or (LLAMA if family == "llama" else GPT2), rngs=nnx.Rngs(0),
                      scan_layers=scan)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS[family],
                                                             dropout=dropout),
                         rngs=nnx.Rngs(1), verbose=False, blocks=random_blocks(model))
  params = nnx.state(model, TrainableParam)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  return model


def batch(rows: int, length: int) -> dict[str, jax.Array]:
  ids = np.random.RandomState(0).randint(0, VOCAB, (rows, length))
  mask = np.ones((rows, length), np.int32)
  mask[1, length // 2:] = 0  # padding in one row
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def loss_of(model: nnx.Module):
  """``(loss_fn(params, data) -> mean causal-LM loss, the trainable arrays params)``."""
  graphdef, params, rest = nnx.split(model, TrainableParam, ...)

  def loss_fn(params, data):
    loss, weight, _ = CausalLMTask().loss(nnx.merge(graphdef, params, rest, copy=True), data)
    return loss / weight

  return loss_fn, params


def loss_and_grad(model: nnx.Module):
  """``(jitted value_and_grad of the mean loss in the trainable arrays, those arrays)``."""
  loss_fn, params = loss_of(model)
  return jax.jit(jax.value_and_grad(loss_fn)), params


# By default scanned Llama and unrolled GPT-2 (both families, both layer stacks); the rest with
# -m slow.
@pytest.mark.parametrize("family,scan", [pytest.param("llama", False, marks=pytest.mark.slow),
                                         ("llama", True), ("gpt2", False),
                                         pytest.param("gpt2", True, marks=pytest.mark.slow)])
def test_remat_keeps_losses_and_gradients(family, scan):
  model = adapted_model(family, scan)
  data = batch(2, 12)
  step, params = loss_and_grad(model)
  loss, grads = step(params, data)
  for policy in ("full", "dots"):
    assert smoa_jax.set_remat(model, policy) == "none"
    step, params = loss_and_grad(model)
    remat_loss, remat_grads = step(params, data)
    smoa_jax.set_remat(model, "none")
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(remat_grads)):
      scale = np.abs(g).max()
      assert scale > 0, path  # every factor gets a gradient
      # Relative to the largest entry: SMoA's gradients scale with W's entries (std 0.02 here).
      np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{policy} {path}")


def compiled_and_saved(model: nnx.Module, data: dict[str, jax.Array]) -> tuple[int, int]:
  """``(temp bytes of the compiled step (XLA buffer assignment), bytes the backward pass saves)``."""
  step, params = loss_and_grad(model)
  temp = step.lower(params, data).compile().memory_analysis().temp_size_in_bytes
  loss_fn = loss_of(model)[0]
  # The leaves of the vjp function are what the backward pass keeps (the small weights too).
  saved = jax.eval_shape(lambda p: jax.vjp(lambda q: loss_fn(q, data), p)[1], params)
  return temp, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(saved))


@pytest.mark.slow  # six compilations of an 8-layer step
def test_remat_shrinks_the_compiled_step():
  # 8 layers at 256 tokens: without remat every layer keeps its (B, N, T, T) attention scores
  # and its MLP activations for the backward pass; with "full" only each layer's input.
  config = dict(LLAMA, num_hidden_layers=8, max_position_embeddings=256)
  data = batch(2, 256)
  stacked, unrolled = adapted_model("llama", True, config), adapted_model("llama", False, config)
  sizes = {}
  for policy in ("none", "dots", "full"):
    smoa_jax.set_remat(stacked, policy)
    smoa_jax.set_remat(unrolled, policy)
    sizes[policy] = compiled_and_saved(stacked, data)[0], compiled_and_saved(unrolled, data)[1]
  temp, saved = {k: v[0] for k, v in sizes.items()}, {k: v[1] for k, v in sizes.items()}
  # Under scan_layers the recomputation runs inside the backward loop: the compiled step needs
  # far less scratch memory (measured 0.19x on CPU).
  assert temp["full"] < 0.5 * temp["none"] and temp["dots"] < temp["none"], temp
  # Unrolled layers save far less for the backward pass (whether XLA's schedule turns that into
  # a smaller peak is the backend's choice: the CPU scheduler runs the recomputation early).
  assert saved["full"] < 0.25 * saved["none"] and saved["full"] < saved["dots"] < saved["none"], saved


def test_bad_policies_raise_config_errors():
  model = adapted_model("llama", False)
  with pytest.raises(smoa_jax.ConfigError, match="'none', 'full', 'dots'"):
    smoa_jax.set_remat(model, "partial")
  with pytest.raises(smoa_jax.ConfigError, match="needs a model from smoa_jax.models"):
    smoa_jax.set_remat(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "full")
  assert smoa_jax.set_remat(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "none") == "none"
  assert set(REMAT_POLICIES) == {"none", "full", "dots"}


def test_train_sets_the_policy_for_the_run_and_keeps_the_losses():
  # Adapter dropout draws from the model's rngs inside the rematerialised layers: the recomputed
  # forward pass must see the same masks, and the rng state must advance as without remat.
  model = adapted_model("llama", False, dropout=0.2)
  data, held_out = token_data(8, vocab=VOCAB), token_data(4, vocab=VOCAB, seed=1)

  def run(policy):
    copy = nnx.clone(model)
    config = smoa_jax.TrainConfig(steps=3, batch_size=4, learning_rate=1e-1, log_every=1,
                                  progress=False, remat=policy)
    result = smoa_jax.train(copy, CausalLMTask(), data, config, eval_data=held_out)
    assert copy.model.remat == "none"  # restored after the run
    return [r["loss"] for r in result.history]

  np.testing.assert_allclose(run("full"), run("none"), rtol=1e-5)
