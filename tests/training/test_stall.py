"""Tests for smoa_jax/training/stall.py: the warning about adapters that a learning rate leaves still."""

import warnings

import pytest
from flax import nnx

import smoa_jax
from smoa_jax.training import stall
from tests.support.toy import ToyLM, token_data

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _train(config, learning_rate, *, steps=8, warmup=4, seed=0):
  model = ToyLM(seed=seed)
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(seed), verbose=False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(24, seed=seed),
                            smoa_jax.TrainConfig(steps=steps, batch_size=8, warmup_steps=warmup,
                                                 learning_rate=learning_rate, progress=False))
  return result, [str(w.message) for w in caught if "adapters have changed" in str(w.message)]


def test_check_step_is_the_end_of_the_warmup_and_never_before_the_minimum():
  assert stall.check_step(0, 100) == stall.MIN_CHECK_STEP
  assert stall.check_step(20, 100) == 20
  assert stall.check_step(20, 19) is None and stall.check_step(0, stall.MIN_CHECK_STEP - 1) is None


def test_a_tiny_learning_rate_is_warned_about_and_the_default_is_not():
  config = smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS)
  # Measured on this toy over seeds 0-2: rho = 1.1-1.4 x the learning rate after 8 steps (4 of
  # warmup), i.e. 4e-2-5e-2 at SMoA's default 3e-2: both runs sit >= 30x away from the threshold.
  stalled, messages = _train(config, 1e-5)
  assert stalled.adapter_update_ratio < stall.STALL_RATIO / 30
  assert len(messages) == 1
  assert "learning rate 1e-05 (given)" in messages[0] and "smoa 0.03" in messages[0]
  moving, messages = _train(config, None)
  assert moving.adapter_update_ratio > 30 * stall.STALL_RATIO and messages == []


@pytest.mark.parametrize("config", [smoa_jax.LoRAConfig(2, 4.0, target_modules=TARGETS),
                                    smoa_jax.HiRAConfig(2, 4.0, target_modules=TARGETS)],
                         ids=["lora", "hira"])
def test_other_methods_at_their_defaults_are_not_warned_about(config):
  result, messages = _train(config, None)
  assert result.adapter_update_ratio > 10 * stall.STALL_RATIO and messages == []


def test_no_check_without_adapters_or_when_the_run_ends_first():
  model = ToyLM(seed=0)
  smoa_jax.mark_trainable(model, r".*q_proj/kernel")
  result = smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(16),
                          smoa_jax.TrainConfig(steps=8, batch_size=8, progress=False))
  assert result.adapter_update_ratio is None  # full fine-tuning: no frozen W to compare with
  short, messages = _train(smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=TARGETS), 1e-6, steps=3,
                           warmup=0)
  assert short.adapter_update_ratio is None and messages == []
