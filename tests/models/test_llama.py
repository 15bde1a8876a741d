"""Llama-family parity with transformers on tiny random checkpoints (fp32, atol 1e-4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import smoa_jax
from smoa_jax.models import LlamaForCausalLM, Phi3ForCausalLM, Qwen3ForCausalLM
from smoa_jax.models.hf import from_hf
from smoa_jax.models.llama import rope_inv_freq
from tests.support.hf import (assert_adapted_export_reloads, assert_logits_match, padded_batch,
                              randomize)

VOCAB, LENGTH = 97, 11
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
              max_position_embeddings=64)

# name -> (transformers config class, model class, config overrides)
CASES = {
    "llama_gqa_biases_untied_llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=10, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_tied_linear_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0))),
    "mistral_sliding_window": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_attention_heads=6, num_key_value_heads=3, sliding_window=4)),
    "qwen2_qkv_bias_sliding_layers": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, tie_word_embeddings=True)),
    "qwen3_qk_norm_head_dim": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=14, attention_bias=True,
        tie_word_embeddings=False)),
    "phi3_fused_sliding_window": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        num_attention_heads=6, num_key_value_heads=2, sliding_window=4, pad_token_id=0)),
}


def test_fused_kernels_adapt_merge_and_export(tmp_path):
  """Phi-3's fused qkv_proj / gate_up_proj take SMoA as one matrix each and export folded."""
  config_cls, model_cls, overrides = CASES["phi3_fused_sliding_window"]
  hf = randomize(model_cls(config_cls(**COMMON, **overrides)))
  hf.save_pretrained(tmp_path / "src")
  assert_adapted_export_reloads(tmp_path / "src", tmp_path / "out", VOCAB, LENGTH,
                                ["qkv_proj", "gate_up_proj"])


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  config_cls, model_cls, overrides = CASES[request.param]
  hf = randomize(model_cls(config_cls(**COMMON, **overrides)))
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return request.param, hf, path


def test_logits_match_transformers(checkpoint):
  _, hf, path = checkpoint
  assert_logits_match(hf, from_hf(path), *padded_batch(VOCAB, LENGTH))


def test_paths_mirror_hf_names(checkpoint):
  name, hf, path = checkpoint
  model = from_hf(path)
  cfg = hf.config
  fused = name.startswith("phi3")  # one qkv_proj (q, k, v outputs) and one gate_up_proj
  attn = model.model.layers[1].self_attn
  q_proj = attn.qkv_proj if fused else attn.q_proj
  assert type(q_proj) is nnx.Linear
  heads = cfg.num_attention_heads + (2 * cfg.num_key_value_heads if fused else 0)
  assert q_proj.kernel.shape == (cfg.hidden_size, heads * model.spec.head_dim)
  assert type(model.model.layers[0].mlp.down_proj) is nnx.Linear
  assert (model.lm_head is None) == cfg.tie_word_embeddings
  assert (model.model.layers[0].self_attn.q_norm is not None) == name.startswith("qwen3")
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert f"model/layers/1/self_attn/{'qkv' if fused else 'q'}_proj/kernel" in paths
  assert f"model/layers/0/mlp/{'gate_up' if fused else 'gate'}_proj/kernel" in paths
  assert "model/layers/0/mlp/down_proj/kernel" in paths
  hf_names = set(hf.state_dict())
  key_map = model.key_map()
  assert {key_map.hf_for(p)[0] for p in paths} <= hf_names
  assert model.hf_config["architectures"] == [type(model).architecture]


@pytest.mark.parametrize("params", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=64),
], ids=["default", "linear", "llama3"])
def test_rope_inv_freq_matches_transformers(params):
  config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=params)
  init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(params["rope_type"])
  ref = (init(config)[0] if init else
         transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
         .compute_default_rope_parameters(config)[0]).numpy()
  np.testing.assert_allclose(rope_inv_freq(config.to_dict(), 64), ref, rtol=1e-6)


def test_legacy_rope_fields_are_read():
  new = {"rope_parameters": {"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0}}
  old = {"rope_theta": 100.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
  np.testing.assert_array_equal(rope_inv_freq(new, 16), rope_inv_freq(old, 16))


def test_unsupported_rope_type_is_refused():
  with pytest.raises(smoa_jax.ConfigError, match="rope type 'yarn' is not supported"):
    rope_inv_freq({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, 16)


def test_partial_rotary_embeddings_are_refused():
  rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75)  # Phi-4-mini
  with pytest.raises(smoa_jax.ConfigError, match="expected partial_rotary_factor 1.0"):
    Phi3ForCausalLM(dict(COMMON, num_attention_heads=4, rope_parameters=rope), rngs=nnx.Rngs(0))


def test_bad_gqa_is_refused():
  config = dict(COMMON, num_attention_heads=6, num_key_value_heads=4)
  with pytest.raises(smoa_jax.ConfigError, match="num_attention_heads=6, num_key_value_heads=4: "
                     "expected num_attention_heads to be a multiple of num_key_value_heads"):
    LlamaForCausalLM(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cls", [LlamaForCausalLM, Qwen3ForCausalLM])
def test_dtypes_follow_arguments(cls):
  config = dict(COMMON, num_attention_heads=4, head_dim=12)
  ids = jnp.zeros((1, 5), jnp.int32)
  model = nnx.eval_shape(lambda: cls(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                     rngs=nnx.Rngs(0)))
  assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)}
  logits = nnx.eval_shape(lambda m: m(ids), model)
  assert logits.dtype == jnp.float32 and logits.shape == (1, 5, VOCAB)  # the head accumulates f32
  mixed = nnx.eval_shape(lambda: cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  assert mixed.model.norm.scale.dtype == jnp.float32  # float32 storage, bfloat16 compute
  assert nnx.eval_shape(lambda m: m(ids), mixed).dtype == jnp.float32
