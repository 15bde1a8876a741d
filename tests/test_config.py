"""Tests for smoa_jax/config.py: validation, defaults, JSON round trip."""

import json

import numpy as np
import pytest

import smoa_jax
from smoa_jax.config import config_from_dict, split_sizes


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


BAD = [
    (smoa_jax.SMoAConfig, dict(r=0), "r=0"),
    (smoa_jax.SMoAConfig, dict(r=-3), "r=-3"),
    (smoa_jax.SMoAConfig, dict(r=2.5), "r=2.5"),
    (smoa_jax.SMoAConfig, dict(r=True), "r=True"),
    (smoa_jax.SMoAConfig, dict(num_blocks=0), "num_blocks=0"),
    (smoa_jax.SMoAConfig, dict(num_blocks="2"), "num_blocks='2'"),
    (smoa_jax.SMoAConfig, dict(branch_ranks=[8]), "exactly num_blocks=2"),
    (smoa_jax.SMoAConfig, dict(branch_ranks=[10, -2]), "non-negative"),
    (smoa_jax.SMoAConfig, dict(branch_ranks=[3, 3]), "summing to r=8"),
    (smoa_jax.SMoAConfig, dict(branch_ranks="44"), "branch_ranks"),
    (smoa_jax.SMoAConfig, dict(alpha=0), "alpha=0"),
    (smoa_jax.SMoAConfig, dict(alpha=-1.0), "alpha=-1.0"),
    (smoa_jax.SMoAConfig, dict(alpha=float("nan")), "alpha=nan"),
    (smoa_jax.SMoAConfig, dict(dropout=1.0), "dropout=1.0"),
    (smoa_jax.SMoAConfig, dict(dropout=-0.1), "dropout=-0.1"),
    (smoa_jax.SMoAConfig, dict(target_modules=[]), "target_modules"),
    (smoa_jax.SMoAConfig, dict(target_modules=["q_proj", ""]), "target_modules"),
    (smoa_jax.SMoAConfig, dict(target_modules="(unclosed"), "regular expression"),
    (smoa_jax.SMoAConfig, dict(target_modules=3), "target_modules"),
    (smoa_jax.SMoAConfig, dict(exclude_modules=[1]), "exclude_modules"),
    (smoa_jax.SMoAConfig, dict(layers_to_transform=[-1]), "layers_to_transform"),
    (smoa_jax.SMoAConfig, dict(layers_to_transform=[]), "layers_to_transform"),
    (smoa_jax.SMoAConfig, dict(param_dtype="int8"), "param_dtype"),
    (smoa_jax.SMoAConfig, dict(adapter_dtype="not-a-dtype"), "adapter_dtype"),
    (smoa_jax.SMoAConfig, dict(spectral_method="qr"), "spectral_method"),
    (smoa_jax.LoRAConfig, dict(r=0), "LoRAConfig.r=0"),
    (smoa_jax.LoRAConfig, dict(alpha=0), "LoRAConfig.alpha=0"),
    (smoa_jax.HiRAConfig, dict(dropout=2), "HiRAConfig.dropout=2"),
    (smoa_jax.FullFineTuneConfig, dict(target_modules=()), "target_modules"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=[f"{c.__name__}-{m}" for c, _, m in BAD])
def test_invalid_fields_raise_value_error_naming_field_and_value(cls, kwargs, message):
  with pytest.raises(ValueError, match="invalid: expected") as info:
    cls(**kwargs)
  assert isinstance(info.value, smoa_jax.ConfigError)
  assert message in str(info.value)


def test_num_blocks_larger_than_layer_is_refused_at_layer_build():
  config = smoa_jax.SMoAConfig(r=4, num_blocks=6)
  with pytest.raises(smoa_jax.ConfigError, match=r"num_blocks=6 is too large .* must be <= 5"):
    config.check_layer(5, 32, "model/q_proj")


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
  with pytest.raises(AttributeError):
    config.r = 3
  assert hash(config) == hash(smoa_jax.SMoAConfig())
