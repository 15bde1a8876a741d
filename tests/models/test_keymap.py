"""The shared pieces: key-rule templates both ways, prefix handling, masks, activations."""

from __future__ import annotations

import numpy as np
import pytest

import smoa_jax
from smoa_jax.models.blocks import activation, make_attention_mask
from smoa_jax.models.keymap import KeyMap, KeyRule, linear_rules, prefixed


def test_key_rule_maps_both_ways_and_converts_separators():
  rule = KeyRule("encoder.layer.{i}.{b:attention\\.output|output}.dense.weight",
                 "encoder/layer/{i}/{b}/dense/kernel", transpose=True)
  assert rule.hf_to_path("encoder.layer.3.attention.output.dense.weight") == (
      "encoder/layer/3/attention/output/dense/kernel")
  assert rule.path_to_hf("encoder/layer/3/attention/output/dense/kernel") == (
      "encoder.layer.3.attention.output.dense.weight")
  assert rule.hf_to_path("encoder.layer.x.output.dense.weight") is None  # {i} is digits only
  assert rule.hf_to_path("encoder.layer.3.intermediate.dense.weight") is None


def test_prefix_is_added_to_bare_checkpoints_but_not_to_heads():
  key_map = KeyMap(prefixed(linear_rules("h.{i}.fc", "h/{i}/fc"), "transformer")
                   + (KeyRule("lm_head.weight", "lm_head/kernel", True),), prefix="transformer")
  assert key_map.normalize(["h.0.fc.weight", "lm_head.weight"]) == {
      "transformer.h.0.fc.weight": "h.0.fc.weight", "lm_head.weight": "lm_head.weight"}
  assert key_map.path_for("transformer.h.0.fc.weight") == ("transformer/h/0/fc/kernel", True)
  assert key_map.hf_for("transformer/h/0/fc/bias") == ("transformer.h.0.fc.bias", False)


def test_base_prefix_is_stripped_for_a_bare_model():
  key_map = KeyMap(linear_rules("pooler.dense", "pooler/dense"), base_prefix="bert")
  assert key_map.normalize(["bert.pooler.dense.weight", "cls.x"]) == {
      "pooler.dense.weight": "bert.pooler.dense.weight", "cls.x": "cls.x"}


def test_masks_follow_hf_rules():
  padding = np.array([[1, 1, 1, 0], [0, 1, 1, 1]])
  mask = np.asarray(make_attention_mask(padding, 4, causal=True, sliding_window=2))
  assert mask.shape == (2, 1, 4, 4)
  np.testing.assert_array_equal(mask[0, 0], [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0],
                                             [0, 0, 1, 0]])
  np.testing.assert_array_equal(mask[1, 0, :, 0], 0)  # the left pad is never attended
  bidirectional = np.asarray(make_attention_mask(padding, 4, causal=False))
  assert bidirectional.shape == (2, 1, 1, 4)
  assert make_attention_mask(None, 4, causal=False) is None


def test_unknown_activation_names_the_supported_ones():
  with pytest.raises(smoa_jax.ConfigError, match="'mish' is not supported.*gelu_new"):
    activation("mish")
