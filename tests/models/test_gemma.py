"""Gemma 2 / Gemma 3 text (smoa_jax/models/gemma.py) against transformers on tiny random
checkpoints: logits (fp32, atol 1e-4) on sequences longer than the sliding window, and an SMoA
adapter merged, exported and reloaded in transformers. Cached decoding and greedy generation
are checked with every other causal family (tests/models/test_cache.py,
tests/inference/test_decode.py, over tests.support.hf.causal_families)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import smoa_jax
from tests.support.hf import (assert_adapted_export_reloads, assert_logits_match, padded_batch,
                              randomize)

VOCAB, LENGTH, WINDOW = 97, 11, 4  # LENGTH > WINDOW: the sliding layers see only part of it
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, sliding_window=WINDOW, query_pre_attn_scalar=20)

DROP = object()  # a config.json edit: remove the key
G2, G3 = ((transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
          (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM))
GEMMA3_ROPES = {"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10.0)}
# name -> (classes, config overrides, edits of the saved config.json: older spellings)
CASES = {
    # Caps small enough to bind on these activations (|logits| reach the cap).
    "gemma2_softcaps_tied": (G2, dict(final_logit_softcapping=3.0, attn_logit_softcapping=2.0),
                             {}),
    # A config.json from before layer_types (every other layer global), biases, untied head.
    "gemma2_legacy_untied_biases": (G2, dict(
        final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=True,
        tie_word_embeddings=False), {"layer_types": DROP}),
    # Local and global RoPE differ in type and theta.
    "gemma3_two_ropes_tied": (G3, dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=GEMMA3_ROPES), {}),
    # transformers 4.x spelling: rope_theta + rope_scaling (global), rope_local_base_freq,
    # sliding_window_pattern instead of layer_types; soft-capping on, untied.
    "gemma3_legacy_untied_softcaps": (G3, dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=GEMMA3_ROPES, tie_word_embeddings=False, final_logit_softcapping=3.0,
        attn_logit_softcapping=2.0), {
            "layer_types": DROP, "rope_parameters": DROP, "sliding_window_pattern": 2,
            "rope_theta": 1000.0, "rope_scaling": dict(rope_type="linear", factor=2.0),
            "rope_local_base_freq": 10.0}),
}


def save_case(name: str, directory) -> torch.nn.Module:
  (config_cls, model_cls), overrides, edits = CASES[name]
  torch.manual_seed(0)
  hf = randomize(model_cls(config_cls(**COMMON, **overrides)))
  hf.save_pretrained(directory)
  config = {**json.loads((directory / "config.json").read_text()), **edits}
  (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                     if v is not DROP}))
  return hf


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  return request.param, save_case(request.param, path), path


def test_logits_match_transformers(checkpoint):
  _, hf, path = checkpoint
  model = smoa_jax.from_hf(path)
  assert any(w == WINDOW for w in model.spec.sliding_windows)
  assert None in model.spec.sliding_windows
  assert_logits_match(hf, model, *padded_batch(VOCAB, LENGTH))


def test_scanned_layers_give_the_same_logits(checkpoint):
  _, _, path = checkpoint
  ids, mask = padded_batch(VOCAB, LENGTH)
  forward = nnx.jit(lambda m, x, a: m(x, a))
  scanned = smoa_jax.from_hf(path, scan_layers=True)
  np.testing.assert_allclose(np.asarray(forward(scanned, ids, mask)),
                             np.asarray(forward(smoa_jax.from_hf(path), ids, mask)), atol=1e-5)


def test_paths_mirror_hf_names(checkpoint):
  name, hf, path = checkpoint
  model = smoa_jax.from_hf(path)
  layer = model.model.layers[1]
  assert type(layer.self_attn.q_proj) is nnx.Linear and type(layer.mlp.gate_proj) is nnx.Linear
  assert (model.lm_head is None) == hf.config.tie_word_embeddings
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {"model/layers/2/pre_feedforward_layernorm/scale",
          "model/layers/2/post_feedforward_layernorm/scale"} <= paths
  assert ("model/layers/0/self_attn/q_norm/scale" in paths) == name.startswith("gemma3")
  key_map = model.key_map()
  assert {key_map.hf_for(p)[0] for p in paths} == set(hf.state_dict()) - (
      {"lm_head.weight"} if model.lm_head is None else set())


def test_adapted_merged_export_reloads_in_transformers(checkpoint, tmp_path):
  _, hf, path = checkpoint
  reloaded = assert_adapted_export_reloads(path, tmp_path / "out", VOCAB, LENGTH,
                                           ["q_proj", "v_proj", "down_proj"])
  assert type(reloaded) is type(hf)
