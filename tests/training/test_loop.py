"""Tests for smoa_jax/training/loop.py (and the orbax checkpoints of smoa_jax/io/checkpoint.py)."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.training.config import make_optimizer, resolve_learning_rate
from tests.support.state import adapter_arrays, base_arrays
from tests.support.toy import ToyClassifier, ToyLM, lm_run, token_data

ROOT = Path(__file__).resolve().parents[2]


def test_training_reduces_loss_and_writes_metrics_and_checkpoints(tmp_path):
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj", "v_proj", "up_proj"]),
                         rngs=nnx.Rngs(1), verbose=False)
  before = adapter_arrays(model)
  # SMoA's update (a b) * W is scaled by W's entries: it wants ~10x LoRA's learning rate.
  config = smoa_jax.TrainConfig(steps=30, batch_size=8, learning_rate=1e-1, log_every=5,
                                eval_every=10, save_every=10, keep_checkpoints=2, progress=False)
  result = smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(40), config,
                          eval_data=token_data(12, seed=1), output_dir=tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
  assert [r["step"] for r in evals] == [10, 20, 30]
  assert all({"loss", "learning_rate", "tokens_per_sec"} <= set(r) for r in train)
  assert "perplexity" in evals[-1]
  # Steps 26-30 against steps 1-5: a fall of 0.48-0.71 nats over seeds 0-9 (init, data, order).
  assert train[-1]["loss"] < train[0]["loss"] - 0.3
  assert result.step == 30 and result.eval_metrics["loss"] == evals[-1]["loss"]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30]
  after = adapter_arrays(model)
  assert all(not np.array_equal(before[k], after[k]) for k in before)  # every factor trained
  # Every frozen weight (adapted kernels included: same paths) is bit-identical to the base model.
  trained, base = base_arrays(model), base_arrays(ToyLM(seed=0))
  assert trained.keys() == base.keys()
  for k in base:
    np.testing.assert_array_equal(trained[k], base[k], err_msg=k)


def test_gradient_accumulation_equals_the_big_batch_step():
  def one_step(accum):
    model = ToyLM(seed=0)
    smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj", "up_proj"]),
                           rngs=nnx.Rngs(1), verbose=False)
    for _, layer in smoa_jax.adapter_layers(model):
      layer.lora_b[...] = 0.1 * jnp.ones_like(layer.lora_b[...])
    config = smoa_jax.TrainConfig(steps=1, batch_size=8, grad_accum_steps=accum, learning_rate=1e-2,
                                  progress=False, max_grad_norm=None)
    smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(8), config)
    return adapter_arrays(model)

  big, small = one_step(1), one_step(4)
  for k in big:
    np.testing.assert_allclose(small[k], big[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_schedule_warmup_then_cosine_and_linear():
  config = smoa_jax.TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10)
  _, schedule = make_optimizer(config, 100)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(55)) == pytest.approx(0.5, abs=0.02) and float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
  linear = smoa_jax.TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, schedule="linear")
  _, schedule = make_optimizer(linear, 100)
  assert float(schedule(55)) == pytest.approx(0.5, abs=0.02)


@pytest.mark.subprocess
def test_resume_after_sigkill_matches_an_uninterrupted_run(toy_run, tmp_path):
  killed = tmp_path / "killed"
  proc = subprocess.run([sys.executable, "-m", "tests.support.kill_run", str(killed), "4"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert max(logged) == 4
  resumed, result = lm_run(killed, resume=True)
  assert result.step == 6
  resumed = adapter_arrays(resumed)
  assert resumed.keys() == toy_run.keys()
  for k, x in toy_run.items():  # the uninterrupted run
    np.testing.assert_array_equal(resumed[k], x, err_msg=k)
  logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2, 3, 4, 5, 6]


def test_classification_with_a_trainable_head():
  model = ToyClassifier(num_labels=3)
  smoa_jax.apply_adapter(model, smoa_jax.LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"]),
                         rngs=nnx.Rngs(1), verbose=False)
  smoa_jax.mark_trainable(model, "classifier/.*")
  data = token_data(48)
  data["labels"] = (data["input_ids"][:, 1] % 3).astype(np.int32)
  before = smoa_jax.evaluate(model, smoa_jax.ClassificationTask(), data)
  config = smoa_jax.TrainConfig(steps=80, batch_size=16, learning_rate=3e-2, progress=False)
  smoa_jax.train(model, smoa_jax.ClassificationTask(), data, config)
  after = smoa_jax.evaluate(model, smoa_jax.ClassificationTask(), data)
  # Over seeds 0-9 (init, data, order): loss x0.12-0.63, accuracy 0.73-0.96 (chance 1/3).
  assert after["loss"] < 0.75 * before["loss"]
  assert after["accuracy"] > 0.6


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of steps or epochs"),
    (dict(steps=0), "steps=0"),
    (dict(steps=5, epochs=1), "exactly one"),
    (dict(steps=5, batch_size=6, grad_accum_steps=4), "grad_accum_steps"),
    (dict(steps=5, learning_rate=-1.0), "learning_rate"),
    (dict(steps=5, schedule="step"), "schedule"),
    (dict(steps=5, save_every=0), "save_every"),
    (dict(steps=5, remat="partial"), "TrainConfig.remat='partial'.*'none', 'full', 'dots'"),
])
def test_train_config_validation(kwargs, match):
  with pytest.raises(smoa_jax.ConfigError, match=match):
    smoa_jax.TrainConfig(**kwargs)


def test_training_needs_trainable_arrays_and_resume_needs_a_checkpoint(tmp_path):
  config = smoa_jax.TrainConfig(steps=1, progress=False)
  with pytest.raises(smoa_jax.ConfigError, match="no trainable"):
    smoa_jax.train(ToyLM(), smoa_jax.CausalLMTask(), token_data(8), config)
  model = ToyLM()
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(target_modules=["q_proj"]), rngs=nnx.Rngs(0),
                         verbose=False)
  with pytest.raises(smoa_jax.ConfigError, match="no checkpoint"):
    smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(8), config, output_dir=tmp_path,
                   resume=True)


# -- per-method default learning rates --------------------------------------------------------------
@pytest.mark.parametrize("config,expected", [
    (smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj"]), 3e-2),
    (smoa_jax.HiRAConfig(4, 8.0, target_modules=["q_proj"]), 2e-2),
    (smoa_jax.LoRAConfig(4, 8.0, target_modules=["q_proj"]), 5e-3),
    (smoa_jax.FullFineTuneConfig(target_modules=["q_proj"]), 3e-4),
])
def test_learning_rate_defaults_to_the_methods_own(config, expected):
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1), verbose=False)
  unset = smoa_jax.TrainConfig(steps=2, progress=False)
  assert resolve_learning_rate(unset, model) == (expected, f"the default of {config.method}")
  given = smoa_jax.TrainConfig(steps=2, learning_rate=0.5, progress=False)
  assert resolve_learning_rate(given, model) == (0.5, "given")
  # train() uses it: the first logged step's learning rate is the default's (constant schedule).
  result = smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(16),
                          smoa_jax.TrainConfig(steps=1, batch_size=8, schedule="constant",
                                               log_every=1, progress=False))
  assert result.history[0]["learning_rate"] == pytest.approx(expected)


def test_mixed_methods_need_an_explicit_learning_rate():
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj"]),
                         rngs=nnx.Rngs(1), verbose=False)
  smoa_jax.apply_adapter(model, smoa_jax.LoRAConfig(4, 8.0, target_modules=["v_proj"]),
                         rngs=nnx.Rngs(2), verbose=False)
  with pytest.raises(smoa_jax.ConfigError, match="lora, smoa.*give learning_rate"):
    resolve_learning_rate(smoa_jax.TrainConfig(steps=2), model)
  with pytest.raises(smoa_jax.ConfigError, match="resolve"):
    make_optimizer(smoa_jax.TrainConfig(steps=2), 2)
