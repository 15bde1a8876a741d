"""Tests for smoa_jax/io/portable.py: portable adapters, their checks, and atomic writes."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import smoa_jax
from smoa_jax.layers import inject
from tests.support.toy import SMOA, TARGETS, ToyLM, token_data, trained


def _ids():
  return jnp.asarray(token_data(4)["input_ids"])


# SMoA by default (the spectral order must travel); LoRA and HiRA with -m slow.
@pytest.mark.parametrize("config", [
    SMOA,
    pytest.param(smoa_jax.LoRAConfig(r=3, alpha=6.0, target_modules=TARGETS), marks=pytest.mark.slow),
    pytest.param(smoa_jax.HiRAConfig(r=3, alpha=6.0, target_modules=TARGETS), marks=pytest.mark.slow)],
    ids=["smoa", "lora", "hira"])
def test_round_trip_into_a_fresh_base_without_spectral_recomputation(tmp_path, monkeypatch, config):
  model = trained(config)
  logits = model(_ids())
  smoa_jax.save_adapter(model, tmp_path / "adapter")
  document = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert document["method"] == config.method and document["library"] == "smoa-jax"
  assert document["r"] == config.r and document["alpha"] == config.alpha
  assert "fingerprint" in document["modules"]["layers/0/self_attn/q_proj"]
  monkeypatch.setattr(inject, "spectral_blocks_batched",
                      lambda *a, **k: pytest.fail("spectral blocks must come from the file"))
  fresh = ToyLM(seed=0)
  smoa_jax.load_adapter(fresh, tmp_path / "adapter")
  fresh.eval()
  np.testing.assert_allclose(fresh(_ids()), logits, rtol=1e-6, atol=1e-6)


def test_peft_style_names_and_authors_block_layout(tmp_path):
  model = trained()
  smoa_jax.save_adapter(model, tmp_path / "a")
  tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
  name = "base_model.model.layers.0.self_attn.q_proj"
  layer = model.layers[0].self_attn.q_proj
  c0, r0 = layer.op.layout.in_sizes[0], layer.op.layout.out_sizes[0]
  assert tensors[f"{name}.lora_A.0.weight"].shape == (3, c0)  # (r_k, |C_k|)
  assert tensors[f"{name}.lora_B.0.weight"].shape == (r0, 3)  # (|R_k|, r_k)
  assert f"{name}.lora_A.2.weight" not in tensors  # rank-0 block: frozen, no tensors
  np.testing.assert_array_equal(tensors[f"{name}.smoa_in_perm"], layer.in_perm[...])
  np.testing.assert_array_equal(tensors[f"{name}.lora_A.1.weight"],
                                np.asarray(layer.lora_a[...])[1, :layer.op.layout.in_sizes[1], :3].T)


def test_load_into_already_adapted_model(tmp_path):
  model = trained()
  smoa_jax.save_adapter(model, tmp_path / "a")
  other = ToyLM(seed=0)
  smoa_jax.apply_adapter(other, SMOA, rngs=nnx.Rngs(7), verbose=False)
  smoa_jax.load_adapter(other, tmp_path / "a")
  other.eval()
  np.testing.assert_allclose(other(_ids()), model(_ids()), rtol=1e-6, atol=1e-6)


def test_bf16_copy_of_the_same_base_is_accepted(tmp_path):
  model = trained()
  smoa_jax.save_adapter(model, tmp_path / "a")
  base = ToyLM(seed=0)
  for _, v in list(nnx.iter_graph(base)):
    if isinstance(v, nnx.Param):
      v.set_value(v[...].astype(jnp.bfloat16))
  smoa_jax.load_adapter(base, tmp_path / "a")
  saved, loaded = dict(smoa_jax.adapter_layers(model)), dict(smoa_jax.adapter_layers(base))
  assert loaded.keys() == saved.keys() and len(saved) == 8
  for path, layer in saved.items():  # the same update, on W rounded to bfloat16 (8-bit mantissa)
    np.testing.assert_array_equal(loaded[path].in_perm[...], layer.in_perm[...], err_msg=path)
    np.testing.assert_array_equal(loaded[path].out_perm[...], layer.out_perm[...], err_msg=path)
    want = np.asarray(layer.delta_weight())
    assert np.abs(want).max() > 1e-3, path
    np.testing.assert_allclose(np.asarray(loaded[path].delta_weight(), np.float32), want,
                               rtol=1e-2, atol=1e-7, err_msg=path)


def test_full_fine_tuning_and_trainable_head_round_trip(tmp_path):
  model = ToyLM(seed=0)
  config = smoa_jax.FullFineTuneConfig(target_modules=["q_proj"])
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(0), verbose=False)
  smoa_jax.mark_trainable(model, "lm_head/kernel")
  model.layers[0].self_attn.q_proj.kernel[...] += 0.5
  model.lm_head.kernel[...] *= 2.0
  logits = model(_ids())
  with pytest.raises(smoa_jax.AdapterMismatchError, match="FullFineTuneConfig"):
    smoa_jax.save_adapter(model, tmp_path / "x")
  smoa_jax.save_adapter(model, tmp_path / "full", config=config)
  fresh = ToyLM(seed=0)
  smoa_jax.load_adapter(fresh, tmp_path / "full")
  assert isinstance(fresh.lm_head.kernel, smoa_jax.TrainableParam)
  np.testing.assert_allclose(fresh(_ids()), logits, rtol=1e-6, atol=1e-6)


def test_adapter_layers_and_a_trainable_head_together(tmp_path):
  model = trained()
  smoa_jax.mark_trainable(model, "lm_head/kernel")
  model.lm_head.kernel[...] *= 1.5
  logits = model(_ids())
  smoa_jax.save_adapter(model, tmp_path / "a")
  fresh = ToyLM(seed=0)
  smoa_jax.load_adapter(fresh, tmp_path / "a")
  fresh.eval()
  np.testing.assert_allclose(fresh(_ids()), logits, rtol=1e-6, atol=1e-6)
