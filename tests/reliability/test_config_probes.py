"""Probes: invalid adapter configs and targets that select nothing or too much."""

import pytest
from flax import nnx

import smoa_jax
from tests.reliability import probe, probe_cases
from tests.support.toy import ToyLM

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]

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


IDS = [f"{c.__name__}-{m}" for c, _, m in BAD]


def _call(cls, kwargs) -> str:
  return f"`{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})`"


@probe_cases("configs", {i: (_call(c, k), "ConfigError (a ValueError) naming the field, the value "
                             "and the valid range") for i, (c, k, _) in zip(IDS, BAD)})
@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=IDS)
def test_invalid_fields_raise_value_error_naming_field_and_value(cls, kwargs, message):
  with pytest.raises(ValueError, match="invalid: expected") as info:
    cls(**kwargs)
  assert isinstance(info.value, smoa_jax.ConfigError)
  assert message in str(info.value)


@probe("configs", "`target_modules` matching no layer (and re-adapting adapted layers)",
       "TargetError listing every candidate linear layer path (and how many already hold an adapter "
       "of that name, with how to add another)")
def test_nothing_matched_lists_candidates():
  model = ToyLM()
  with pytest.raises(smoa_jax.TargetError) as info:
    smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(target_modules=["query"]), rngs=nnx.Rngs(0))
  assert "layers/0/self_attn/q_proj" in str(info.value) and "lm_head" in str(info.value)
  smoa_jax.apply_adapter(model, smoa_jax.LoRAConfig(target_modules=["q_proj"]), rngs=nnx.Rngs(0),
                         verbose=False)
  with pytest.raises(smoa_jax.TargetError,
                     match="2 modules already hold an adapter named 'default' .*another name="):
    smoa_jax.apply_adapter(model, smoa_jax.LoRAConfig(target_modules=["q_proj"]), rngs=nnx.Rngs(0))




@probe("configs", "`layers_to_transform` naming layers the model does not have",
       "TargetError naming the missing indices and the model's layer range")
def test_layers_to_transform_out_of_range():
  with pytest.raises(smoa_jax.TargetError, match=r"layers \[5\] do not exist.*0\.\.1"):
    smoa_jax.apply_adapter(ToyLM(), smoa_jax.SMoAConfig(target_modules=TARGETS, layers_to_transform=[1, 5]),
                           rngs=nnx.Rngs(0))




@probe("configs", "`num_blocks` larger than a targeted layer's min(in, out)",
       "ConfigError naming the module, its shape and the largest valid num_blocks")
def test_num_blocks_too_large_names_the_module():
  with pytest.raises(smoa_jax.ConfigError, match="layers/0/self_attn/k_proj"):
    smoa_jax.apply_adapter(ToyLM(), smoa_jax.SMoAConfig(r=9, num_blocks=9, target_modules=["k_proj"]),
                           rngs=nnx.Rngs(0))




@probe("configs", "a config that does not fit a layer built directly (`check_layer`)",
       "ConfigError naming the layer, its shape and the limit")
def test_num_blocks_larger_than_layer_is_refused_at_layer_build():
  config = smoa_jax.SMoAConfig(r=4, num_blocks=6)
  with pytest.raises(smoa_jax.ConfigError, match=r"num_blocks=6 is too large .* must be <= 5"):
    config.check_layer(5, 32, "model/q_proj")
