"""Probes: broken, unsafe or oversized Hugging Face checkpoints given to ``from_hf``."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import smoa_jax
from smoa_jax.models import hf as convert
from smoa_jax.models.hf import from_hf
from tests.reliability import probe, probe_cases
from tests.support.files import copy_of


class _Payload:
  """Unpickling this would create a directory: what a malicious checkpoint could do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.makedirs, (self.path,))


@probe("checkpoints", "a `pytorch_model.bin` whose pickle would run code",
       "CheckpointError ('refused ... weights_only'); the payload never runs")
def test_pickle_that_runs_code_is_refused(llama_dir, tmp_path):
  (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
  witness = tmp_path / "pwned"
  torch.save({"model.norm.weight": _Payload(str(witness))}, tmp_path / "pytorch_model.bin")
  with pytest.raises(smoa_jax.CheckpointError, match="refused to load .*weights_only"):
    from_hf(tmp_path)
  assert not witness.exists()


def _truncate(path):
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt_header(path):
  data = bytearray((path / "model.safetensors").read_bytes())
  data[8:16] = b"{garbage"
  (path / "model.safetensors").write_bytes(bytes(data))


def _index_with_missing_shard(path):
  index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
  (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_config(**changes):
  def edit(path):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
  return edit


def _missing_and_unexpected(path):
  tensors = load_file(str(path / "model.safetensors"))
  tensors["model.layers.0.self_attn.q_proj.bias"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
  tensors["model.extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _integer_tensor(path):
  tensors = load_file(str(path / "model.safetensors"))
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


BROKEN = {
    "missing_directory": (lambda p: shutil.rmtree(p), "does not exist"),
    "missing_config": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "config_not_json": (lambda p: (p / "config.json").write_text("{oops"), "is not valid JSON"),
    "config_not_object": (lambda p: (p / "config.json").write_text("[1]"), "expected an object"),
    "no_weights": (lambda p: (p / "model.safetensors").unlink(), "holds no weights"),
    "truncated_safetensors": (_truncate, "not a readable safetensors file.*truncated"),
    "corrupted_header": (_corrupt_header, "not a readable safetensors file"),
    "index_names_missing_shard": (_index_with_missing_shard,
                                  r"names shard\(s\) missing.*model-00002-of-00002"),
    "unsupported_architecture": (_edit_config(architectures=["T5ForConditionalGeneration"]),
                                 r"T5ForConditionalGeneration is not supported; supported: .*"
                                 r"LlamaForCausalLM.*Qwen3ForCausalLM"),
    "unsupported_rope": (_edit_config(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
                         r'config.json has 1 invalid field:\n  rope_parameters.rope_type="yarn": '
                         "expected one of"),
    "absurd_size": (_edit_config(vocab_size=10**11),
                    r"needs 38400.00 GB .* available (host )?memory .*refusing to allocate"),
    # every mismatch in one report: gate/up/down of both layers
    "wrong_shapes": (_edit_config(intermediate_size=80), r"wrong shape or dtype \(6\):(.|\n)*"
                     r"model.layers.1.mlp.down_proj.weight: checkpoint \(48, 72\), model expects "
                     r"\(48, 80\)"),
    "wrong_dtype": (_integer_tensor, r"wrong shape or dtype \(1\):(.|\n)*model.norm.weight"),
    "missing_and_unexpected": (_missing_and_unexpected,
                               r"missing from the checkpoint \(1\):\s+model.layers.1.mlp.up_proj."
                               r"weight(.|\n)*unexpected in the checkpoint \(2\):\s+"
                               r"model.extra.weight\s+model.layers.0.self_attn.q_proj.bias"),
}


SITUATIONS = {
    "missing_directory": "model directory does not exist",
    "missing_config": "directory without config.json",
    "config_not_json": "config.json that is not JSON",
    "config_not_object": "config.json holding a list, not an object",
    "no_weights": "directory without any weights file",
    "truncated_safetensors": "safetensors file truncated to half",
    "corrupted_header": "safetensors file with a corrupted header",
    "index_names_missing_shard": "sharded index naming a shard that is missing",
    "unsupported_architecture": "unknown `architectures` entry (T5)",
    "unsupported_rope": "unsupported rope scaling type (yarn)",
    "absurd_size": "config whose sizes need ~38 TB (vocab 10^11)",
    "wrong_shapes": "tensors whose shapes disagree with config.json",
    "wrong_dtype": "a tensor stored with an integer dtype",
    "missing_and_unexpected": "a missing tensor plus unexpected ones",
}


@probe_cases("checkpoints", {case: (situation, "one CheckpointError listing every problem, "
                                                "raised before the model is built")
                             for case, situation in SITUATIONS.items()})
@pytest.mark.parametrize("damage,message", BROKEN.values(), ids=BROKEN.keys())
def test_bad_checkpoints_raise_one_clear_error(damage, message, llama_dir, tmp_path):
  path = copy_of(llama_dir, tmp_path)
  damage(path)
  with pytest.raises(smoa_jax.CheckpointError, match=message):
    from_hf(path)


@probe("checkpoints", "a model larger than the memory limit (`max_bytes`)",
       "CheckpointError with the needed and allowed GB; no weight file is opened")
def test_models_larger_than_the_limit_are_refused_before_allocating(llama_dir, monkeypatch):
  def no_reading(*_):
    raise AssertionError("weights were opened")
  monkeypatch.setattr(convert, "_open_checkpoint", no_reading)
  with pytest.raises(smoa_jax.CheckpointError, match=r"needs 0.00 GB.*max_bytes is 0.00 GB"):
    from_hf(llama_dir, max_bytes=1000)
