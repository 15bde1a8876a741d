"""Probes: PEFT adapters that are damaged, use options smoa-jax cannot represent, or belong to
another base model; named adapters that do not exist."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.models.hf import from_hf
from tests.support.hf import adapter_base_lm
from tests.reliability import probe, probe_cases


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """Tiny Llama and GPT-2 checkpoints, and a PEFT LoRA adapter of the Llama."""
  root = tmp_path_factory.mktemp("peft_probes")
  for family in ("llama", "gpt2"):
    adapter_base_lm(family).save_pretrained(root / family)
  model = from_hf(root / "llama")
  smoa_jax.apply_adapter(model, smoa_jax.LoRAConfig(r=2, alpha=4.0), rngs=nnx.Rngs(0),
                         verbose=False)
  for _, layer in smoa_jax.adapter_layers(model):
    layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(0), layer.lora_b.shape)
  smoa_jax.save_peft_adapter(model, root / "adapter")
  return root


def _edited(bases, tmp_path, **fields):
  """A copy of the adapter with ``adapter_config.json`` fields replaced."""
  target = tmp_path / "edited"
  target.mkdir()
  document = json.loads((bases / "adapter" / "adapter_config.json").read_text())
  (target / "adapter_config.json").write_text(json.dumps({**document, **fields}))
  (target / "adapter_model.safetensors").write_bytes(
      (bases / "adapter" / "adapter_model.safetensors").read_bytes())
  return target


def _untouched(model) -> None:
  assert not smoa_jax.list_adapters(model)


@probe_cases("adapters", {
    "not_json": ("PEFT adapter_config.json that is not JSON",
                 "CheckpointError saying the file is not valid JSON; the model is untouched"),
    "bad_r": ("PEFT adapter_config.json with r = \"eight\"",
              "CheckpointError naming the field, its value and what is expected"),
    "bad_targets": ("PEFT adapter_config.json with target_modules = 5",
                    "CheckpointError naming the field, its value and what is expected"),
})
@pytest.mark.parametrize("case,edit,match", [
    ("not_json", None, "not valid JSON"),
    ("bad_r", {"r": "eight"}, "r='eight' is invalid: expected an int >= 1"),
    ("bad_targets", {"target_modules": 5}, "target_modules=5 is invalid"),
], ids=["not_json", "bad_r", "bad_targets"])
def test_corrupt_peft_config(bases, tmp_path, case, edit, match):
  target = _edited(bases, tmp_path, **(edit or {}))
  if case == "not_json":
    (target / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
  model = from_hf(bases / "llama")
  with pytest.raises(smoa_jax.CheckpointError, match=match):
    smoa_jax.load_peft_adapter(model, target)
  _untouched(model)


UNSUPPORTED = {
    "dora": ({"use_dora": True}, "use_dora=True"),
    "bias": ({"bias": "all"}, "bias='all'"),
    "pissa": ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*base weights"),
    "lora_bias": ({"lora_bias": True}, "lora_bias=True"),
    "unknown": ({"future_option": 3}, r"\['future_option'\] are unknown"),
    "loha": ({"peft_type": "LOHA"}, "peft_type='LOHA' is not supported"),
}


@probe_cases("adapters", {
    "dora": ("PEFT adapter trained with DoRA (use_dora)", "ConfigError naming use_dora"),
    "bias": ("PEFT adapter with trained biases (bias='all')", "ConfigError naming bias"),
    "pissa": ("PEFT adapter initialised with PiSSA (a modified base)",
              "ConfigError naming init_lora_weights and how to convert the adapter"),
    "lora_bias": ("PEFT adapter with a bias on lora_B (lora_bias)", "ConfigError naming lora_bias"),
    "unknown": ("PEFT config with an option smoa-jax does not know, set",
                "ConfigError naming the option"),
    "loha": ("PEFT adapter of another method (LoHa)",
             "ConfigError naming the peft_type and the supported ones"),
})
@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_peft_options_are_refused_by_name(bases, tmp_path, case):
  fields, match = UNSUPPORTED[case]
  model = from_hf(bases / "llama")
  with pytest.raises(smoa_jax.ConfigError, match=match):
    smoa_jax.load_peft_adapter(model, _edited(bases, tmp_path, **fields))
  _untouched(model)


@probe_cases("adapters", {
    "gpt2": ("PEFT adapter of a Llama loaded into GPT-2",
             "AdapterMismatchError: target_modules match no linear module (another base model?)"),
    "wider": ("PEFT adapter of a Llama loaded into a Llama of other sizes",
              "AdapterMismatchError naming the tensor and both shapes"),
})
@pytest.mark.parametrize("case", ["gpt2", "wider"])
def test_peft_adapter_for_another_base_model(bases, tmp_path, case):
  if case == "gpt2":
    model, match = from_hf(bases / "gpt2"), "matches no linear module.*is this the base model"
  else:
    adapter_base_lm("llama", hidden_size=64).save_pretrained(tmp_path / "wider")
    model, match = from_hf(tmp_path / "wider"), "has shape"
  with pytest.raises(smoa_jax.AdapterMismatchError, match=match):
    smoa_jax.load_peft_adapter(model, bases / "adapter")
  _untouched(model)


@probe("adapters", "switching to, saving, deleting or merging a named adapter that does not exist",
       "AdapterMismatchError listing the adapters the model holds; nothing changes")
def test_missing_named_adapter(bases, tmp_path):
  model = from_hf(bases / "llama")
  smoa_jax.load_peft_adapter(model, bases / "adapter", name="chat")
  logits = model(jnp.ones((1, 4), jnp.int32))
  for call in (lambda: smoa_jax.set_adapter(model, "code"),
               lambda: smoa_jax.save_adapter(model, tmp_path / "code", name="code"),
               lambda: smoa_jax.save_peft_adapter(model, tmp_path / "code", name="code"),
               lambda: smoa_jax.delete_adapter(model, "code"),
               lambda: smoa_jax.merge_and_unload(model, name="code")):
    with pytest.raises(smoa_jax.AdapterMismatchError, match=r"no adapter named 'code'.*\['chat'\]"):
      call()
  assert not (tmp_path / "code").exists() and smoa_jax.active_adapter(model) == "chat"
  assert bool(jnp.all(model(jnp.ones((1, 4), jnp.int32)) == logits))
