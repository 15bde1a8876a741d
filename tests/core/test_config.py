"""Tests for smoa_jax/core/config.py: validation, defaults, JSON round trip."""

import json

import numpy as np
import pytest

import smoa_jax
from smoa_jax.core.config import config_from_dict, split_sizes


@pytest.mark.parametrize("total,pieces,expected", [(10, 3, (4, 3, 3)), (8, 2, (4, 4)), (5, 5, (1,) * 5),
                                                   (7, 1, (7,)), (2, 4, (1, 1, 0, 0))])
def test_split_sizes_is_array_split(total, pieces, expected):
  assert split_sizes(total, pieces) == expected
  assert expected == tuple(len(p) for p in np.array_split(np.arange(total), pieces))


def test_positional_and_keyword_construction():
  a = smoa_jax.SMoAConfig(8, 4, 16)
  b = smoa_jax.SMoAConfig(r=8, num_blocks=4, alpha=16.0)
  assert a == b and a.scaling == 2.0 and a.block_ranks == (2, 2, 2, 2)
  assert smoa_jax.SMoAConfig(r=5, num_blocks=2).block_ranks == (3, 2)
  assert smoa_jax.SMoAConfig(r=4, num_blocks=2, branch_ranks=[4, 0]).block_ranks == (4, 0)
  assert smoa_jax.LoRAConfig(4, 8).scaling == 2.0
  assert smoa_jax.HiRAConfig(r=4, alpha=8, target_modules="q_proj").target_modules == "q_proj"


@pytest.mark.parametrize("config", [
    smoa_jax.SMoAConfig(8, 4, 16, branch_ranks=[4, 4, 0, 0], dropout=0.1, layers_to_transform=3,
                        exclude_modules="lm_head", adapter_dtype="bfloat16"),
    smoa_jax.LoRAConfig(r=2, alpha=4, target_modules=["query", "value"]),
    smoa_jax.HiRAConfig(r=2, alpha=4),
    smoa_jax.FullFineTuneConfig(target_modules=".*dense"),
])
def test_json_round_trip(config):
  data = json.loads(json.dumps(config.to_dict()))
  assert config_from_dict(data) == config


def test_from_dict_rejects_unknown_method_and_fields():
  with pytest.raises(smoa_jax.ConfigError, match="method"):
    config_from_dict({"method": "dora", "r": 4})
  with pytest.raises(smoa_jax.ConfigError, match="unknown fields"):
    config_from_dict({"method": "lora", "r": 4, "rank": 3})
  with pytest.raises(smoa_jax.ConfigError, match="JSON object"):
    config_from_dict(["lora"])


def test_configs_are_frozen_and_hashable():
  config = smoa_jax.SMoAConfig()
  with pytest.raises(AttributeError, match="cannot assign to field 'r'"):
    config.r = 3
  assert hash(config) == hash(smoa_jax.SMoAConfig())
