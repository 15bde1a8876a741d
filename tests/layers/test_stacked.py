"""Scanned layers (``scan_layers=True``): stacked Params under ``nnx.scan`` equal the unrolled model,
with and without adapters, through loading, training and export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import smoa_jax
from smoa_jax.errors import ConfigError

VOCAB, LENGTH = 61, 9
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "intermediate/dense"],
}
# name -> (transformers config, model class, family)
CASES = {
    "qwen2_mixed_windows": (transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
        max_window_layers=1, tie_word_embeddings=False, max_position_embeddings=32),
        transformers.Qwen2ForCausalLM, "llama"),
    "gpt2": (transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4),
             transformers.GPT2LMHeadModel, "gpt2"),
    "bert": (transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=32),
             transformers.BertModel, "bert"),
}


# The Llama family runs by default; GPT-2 and BERT scan the same way (slow: more compiles).
@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=() if family == "llama" else pytest.mark.slow)
    for name, (_, _, family) in sorted(CASES.items())])
def pair(request, tmp_path_factory):
  """``(family, checkpoint dir, unrolled model, scanned model)`` with the same weights."""
  config, cls, family = CASES[request.param]
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp(request.param)
  cls(config).save_pretrained(path)
  return family, path, smoa_jax.from_hf(path), smoa_jax.from_hf(path, scan_layers=True)


def inputs() -> tuple[jax.Array, jax.Array]:
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))
  mask = np.ones((2, LENGTH), np.int32)
  mask[1, 6:] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def layer_of(unrolled: nnx.Module, stacked_path: str, i: int) -> smoa_jax.AdaptedDense:
  """The unrolled model's adapter layer that is layer ``i`` of a stacked adapter layer."""
  path = smoa_jax.layers.paths.layer_path(stacked_path + "/kernel", i).removesuffix("/kernel")
  return dict(smoa_jax.adapter_layers(unrolled))[path]


def copy_factors(scanned: nnx.Module, unrolled: nnx.Module) -> None:
  """Give the unrolled model's adapters layer i of the scanned model's (random, non-zero) factors."""
  for path, layer in smoa_jax.adapter_layers(scanned):
    keys = jax.random.split(jax.random.key(len(path)), 2)
    layer.lora_b[...] = 0.1 * jax.random.normal(keys[0], layer.lora_b.shape)
    for i in range(layer.num_layers):
      target = layer_of(unrolled, path, i)
      target.lora_a[...], target.lora_b[...] = layer.lora_a[...][i], layer.lora_b[...][i]


def test_scanned_model_is_the_unrolled_model(pair, tmp_path):
  family, _, unrolled, scanned = pair
  ids, mask = inputs()
  np.testing.assert_allclose(forward(scanned, ids, mask), forward(unrolled, ids, mask), atol=1e-6)
  kernels = [v for p, v in nnx.to_flat_state(nnx.state(scanned, nnx.Param)) if p[-1] == "kernel"]
  assert all(k.shape[0] == 2 for k in kernels if len(k.shape) == 3)

  config = smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS[family])
  report = smoa_jax.apply_adapter(scanned, config, rngs=nnx.Rngs(1), verbose=False)
  unrolled_report = smoa_jax.apply_adapter(unrolled, config, rngs=nnx.Rngs(1), verbose=False)
  assert report.trainable_params == unrolled_report.trainable_params
  # Per-layer spectral blocks: layer i of the stack has layer i's permutations.
  for path, layer in smoa_jax.adapter_layers(scanned):
    assert layer.in_perm.shape[0] == layer.lora_a.shape[0] == 2
    for i in range(2):
      other = layer_of(unrolled, path, i)
      np.testing.assert_array_equal(layer.in_perm[...][i], other.in_perm[...])
      np.testing.assert_array_equal(layer.out_perm[...][i], other.out_perm[...])
  copy_factors(scanned, unrolled)
  np.testing.assert_allclose(forward(scanned, ids, mask), forward(unrolled, ids, mask), atol=1e-5)
  name, layer = smoa_jax.adapter_layers(scanned)[0]
  np.testing.assert_allclose(layer.delta_weight()[1], layer_of(unrolled, name, 1).delta_weight(),
                             atol=1e-6)

  # Export folds every layer's adapter: the same files as the unrolled model's export.
  smoa_jax.to_hf(scanned, tmp_path / "scanned")
  smoa_jax.to_hf(unrolled, tmp_path / "unrolled")
  a, b = load_file(tmp_path / "scanned" / "model.safetensors"), load_file(
      tmp_path / "unrolled" / "model.safetensors")
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)

  # Merging works layer-wise on the stack.
  before = forward(scanned, ids, mask)
  smoa_jax.merge_and_unload(scanned)
  assert not smoa_jax.adapter_layers(scanned)
  np.testing.assert_allclose(forward(scanned, ids, mask), before, atol=1e-5)


def test_scanned_training_matches_unrolled(tmp_path):
  config, cls, _ = CASES["qwen2_mixed_windows"]
  torch.manual_seed(1)
  cls(config).save_pretrained(tmp_path)
  models = [smoa_jax.from_hf(tmp_path), smoa_jax.from_hf(tmp_path, scan_layers=True)]
  adapter = smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS["llama"])
  for model in models:
    smoa_jax.apply_adapter(model, adapter, rngs=nnx.Rngs(1), verbose=False)
  copy_factors(models[1], models[0])
  rng = np.random.default_rng(0)
  data = {"input_ids": rng.integers(0, VOCAB, (8, LENGTH)).astype(np.int32),
          "attention_mask": np.ones((8, LENGTH), np.int32)}
  train = smoa_jax.TrainConfig(steps=2, batch_size=4, learning_rate=1e-2, progress=False)
  losses = [[r["loss"] for r in smoa_jax.train(m, smoa_jax.CausalLMTask(), data, train).history]
            for m in models]
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
  for path, layer in smoa_jax.adapter_layers(models[1]):
    np.testing.assert_allclose(layer.lora_b[...][1], layer_of(models[0], path, 1).lora_b[...],
                               atol=1e-5, err_msg=path)


def test_scan_rejects_per_layer_attention_scale():
  config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                   scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
    smoa_jax.models.build_model(config.to_dict(), rngs=nnx.Rngs(0), scan_layers=True)


def test_portable_adapter_moves_between_scanned_and_unrolled_models(pair, tmp_path):
  """save_adapter on a scanned model writes per-layer names; it loads into either layout."""
  family, path, _, _ = pair
  scanned = smoa_jax.from_hf(path, scan_layers=True)  # not the shared fixture: it gets adapted
  config = smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS[family])
  smoa_jax.apply_adapter(scanned, config, rngs=nnx.Rngs(1), verbose=False)
  for _, layer in smoa_jax.adapter_layers(scanned):
    layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(3), layer.lora_b.shape)
  ids, mask = inputs()
  want = forward(scanned, ids, mask)
  smoa_jax.save_adapter(scanned, tmp_path / "adapter")
  names = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules"])
  assert all(smoa_jax.layers.paths.split_layer_path(n) is not None for n in names)
  unrolled = smoa_jax.from_hf(path)
  smoa_jax.load_adapter(unrolled, tmp_path / "adapter")
  np.testing.assert_allclose(forward(unrolled, ids, mask), want, rtol=1e-5, atol=1e-5)
  rescanned = smoa_jax.from_hf(path, scan_layers=True)
  smoa_jax.load_adapter(rescanned, tmp_path / "adapter")
  np.testing.assert_allclose(forward(rescanned, ids, mask), want, rtol=1e-5, atol=1e-5)
