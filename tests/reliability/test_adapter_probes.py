"""Probes: adapters that do not belong to the model, damaged adapter files, failed saves."""

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import smoa_jax
from smoa_jax.io import portable as adapter_io
from tests.reliability import probe, probe_cases
from tests.support.toy import TARGETS, ToyLM, trained


@probe("adapters", "loading an adapter onto a different base model",
       "AdapterMismatchError naming the first module whose kernel fingerprint differs")
def test_different_base_is_refused_naming_the_module(tmp_path):
  smoa_jax.save_adapter(trained(), tmp_path / "a")
  with pytest.raises(smoa_jax.AdapterMismatchError, match="layers/0/mlp/down_proj.*different base"):
    smoa_jax.load_adapter(ToyLM(seed=5), tmp_path / "a")


@probe_cases("adapters", {
    "lora": ("loading an SMoA adapter into a model carrying LoRA layers",
             "AdapterMismatchError naming the module and both methods"),
    "k2": ("loading a K=3 adapter into K=2 SMoA layers", "AdapterMismatchError with both block structures"),
    "r4": ("loading an r=6 adapter into r=4 SMoA layers", "AdapterMismatchError with both rank splits"),
})
@pytest.mark.parametrize("other,match", [
    (smoa_jax.LoRAConfig(r=6, alpha=8.0, target_modules=TARGETS), "carries a lora adapter"),
    (smoa_jax.SMoAConfig(6, 2, 8.0, target_modules=TARGETS), "different r, num_blocks"),
    (smoa_jax.SMoAConfig(4, 3, 8.0, target_modules=TARGETS), "different r, num_blocks"),
], ids=["lora", "k2", "r4"])
def test_wrong_method_or_structure_is_refused(tmp_path, other, match):
  smoa_jax.save_adapter(trained(), tmp_path / "a")
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, other, rngs=nnx.Rngs(0), verbose=False)
  with pytest.raises(smoa_jax.AdapterMismatchError, match=match):
    smoa_jax.load_adapter(model, tmp_path / "a")


def _edit_tensors(path, edit):
  file = path / "adapter_model.safetensors"
  tensors = load_file(str(file))
  edit(tensors)
  save_file(tensors, str(file))


@probe("adapters", "adapter file with a missing tensor, an unexpected tensor, or a wrong shape",
       "AdapterMismatchError listing the missing / unexpected keys, or the tensor and both shapes")
def test_missing_and_unexpected_keys_are_errors(tmp_path):
  smoa_jax.save_adapter(trained(), tmp_path / "a")
  key = "base_model.model.layers.1.mlp.up_proj.lora_B.1.weight"
  _edit_tensors(tmp_path / "a", lambda t: t.pop(key))
  with pytest.raises(smoa_jax.AdapterMismatchError, match=r"missing keys \['" + key.replace(".", r"\.")):
    smoa_jax.load_adapter(ToyLM(seed=0), tmp_path / "a")
  smoa_jax.save_adapter(trained(), tmp_path / "b")
  _edit_tensors(tmp_path / "b", lambda t: t.update({"base_model.model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(smoa_jax.AdapterMismatchError, match="unexpected keys.*extra"):
    smoa_jax.load_adapter(ToyLM(seed=0), tmp_path / "b")
  smoa_jax.save_adapter(trained(), tmp_path / "c")
  bad = "base_model.model.layers.0.self_attn.q_proj.lora_A.0.weight"
  _edit_tensors(tmp_path / "c", lambda t: t.update({bad: np.zeros((2, 2), np.float32)}))
  with pytest.raises(smoa_jax.AdapterMismatchError, match="has shape"):
    smoa_jax.load_adapter(ToyLM(seed=0), tmp_path / "c")


@probe("adapters", "adapter directory missing, without config, with bad JSON, or truncated weights",
       "CheckpointError saying which file is missing or unreadable")
def test_bad_directories(tmp_path):
  with pytest.raises(smoa_jax.CheckpointError, match="does not exist"):
    smoa_jax.load_adapter(ToyLM(), tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(smoa_jax.CheckpointError, match="adapter_config.json is missing"):
    smoa_jax.load_adapter(ToyLM(), tmp_path / "empty")
  smoa_jax.save_adapter(trained(), tmp_path / "a")
  (tmp_path / "a" / "adapter_config.json").write_text("{not json")
  with pytest.raises(smoa_jax.CheckpointError, match="not valid JSON"):
    smoa_jax.load_adapter(ToyLM(), tmp_path / "a")
  smoa_jax.save_adapter(trained(), tmp_path / "b")
  weights = tmp_path / "b" / "adapter_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(smoa_jax.CheckpointError, match="truncated or corrupted"):
    smoa_jax.load_adapter(ToyLM(), tmp_path / "b")


@probe("runs", "disk write failure (ENOSPC) while saving an adapter",
       "the OSError propagates; the previous adapter directory is intact, no temp files remain")
def test_save_is_atomic(tmp_path, monkeypatch):
  model = trained()
  smoa_jax.save_adapter(model, tmp_path / "a")
  before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

  def failing_save(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(adapter_io, "save_file", failing_save)
  with pytest.raises(OSError, match="No space left"):
    smoa_jax.save_adapter(model, tmp_path / "a")
  with pytest.raises(OSError, match="No space left"):
    smoa_jax.save_adapter(model, tmp_path / "new")
  assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or partial directories


@probe("adapters", "saving a model that has no adapter",
       "AdapterMismatchError telling to call apply_adapter first")
def test_nothing_to_save():
  with pytest.raises(smoa_jax.AdapterMismatchError, match="apply_adapter first"):
    smoa_jax.save_adapter(ToyLM(), "unused")
