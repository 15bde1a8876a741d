"""Tests for smoa_jax/io/peft.py against the real ``peft`` (pinned in the test extra).

Both directions on tiny random ``transformers`` models: a Llama (``nn.Linear``) and GPT-2
(``Conv1D``, PEFT's ``fan_in_fan_out``). Export: our adapter -> ``save_peft_adapter`` ->
``peft.PeftModel.from_pretrained`` gives our logits. Import: ``peft.get_peft_model`` with random
factors -> ``save_pretrained`` -> ``load_peft_adapter`` gives PEFT's logits. fp32, atol 1e-4
(measured max differences are printed with ``-s``).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import smoa_jax
from smoa_jax.models.hf import from_hf
from tests.support.hf import adapter_base_lm

peft = pytest.importorskip("peft")

VOCAB, LENGTH = 61, 7
ATOL = 1e-4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """``family -> checkpoint directory`` of the tiny base model, built once per family."""
  cache = {}

  def get(family: str) -> Path:
    if family not in cache:
      path = tmp_path_factory.mktemp(family)
      adapter_base_lm(family, VOCAB).save_pretrained(path)
      cache[family] = path
    return cache[family]

  return get


def _ids() -> np.ndarray:
  return np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))


def _torch_base(path: Path) -> transformers.PreTrainedModel:
  return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _torch_logits(model: torch.nn.Module) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(_ids())).logits.numpy()


def _our_logits(model: nnx.Module) -> np.ndarray:
  model.eval()
  return np.asarray(model(jnp.asarray(_ids())))


def _same(ours: np.ndarray, theirs: np.ndarray, base: np.ndarray, what: str) -> float:
  """Assert equal logits (atol 1e-4) and that the adapter changes them; the max difference."""
  diff = float(np.abs(ours - theirs).max())
  print(f"{what}: max |logit difference| {diff:.2e}")
  assert float(np.abs(theirs - base).max()) > 1e-2, "the adapter must change the logits"
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
  return diff


def _perturb(model: nnx.Module, seed: int = 3) -> None:
  rng = np.random.RandomState(seed)
  for _, layer in smoa_jax.adapter_layers(model):
    layer.lora_a[...] = jnp.asarray(0.3 * rng.randn(*layer.lora_a.shape), jnp.float32)
    layer.lora_b[...] = jnp.asarray(0.3 * rng.randn(*layer.lora_b.shape), jnp.float32)


def _peft_of(base_path: Path, config: "peft.PeftConfig", directory: Path, scale: float = 0.3,
             seed: int = 1) -> np.ndarray:
  """A PEFT adapter with random factors (and random saved modules) saved to ``directory``;
  returns PEFT's logits."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(_torch_base(base_path), config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(k in name for k in ("lora_", "hira_")):
        p.copy_(scale * torch.randn_like(p))
      elif "modules_to_save" in name:
        p.mul_(1.5)
  model.save_pretrained(directory)
  return _torch_logits(model.eval())


# -- export: ours -> PEFT --------------------------------------------------------------------------
def _export_case(base_dir, tmp_path, family, method):
  model = from_hf(base_dir(family))
  base = _our_logits(model)
  cls = smoa_jax.LoRAConfig if method == "lora" else smoa_jax.HiRAConfig
  if family == "llama":  # two groups of another rank and alpha: rank_pattern / alpha_pattern
    groups = [cls(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
              cls(r=2, alpha=3.0, target_modules=["down_proj"])]
  else:  # GPT-2's fused Conv1D layers
    groups = [cls(r=3, alpha=5.0, target_modules=["c_attn", "c_fc"])]
  for config in groups:
    smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1), verbose=False)
  _perturb(model)
  if family == "llama":
    smoa_jax.mark_trainable(model, "lm_head/kernel")
    model.lm_head.kernel[...] *= 1.5
  ours = _our_logits(model)
  smoa_jax.save_peft_adapter(model, tmp_path / "peft")
  theirs = _torch_logits(peft.PeftModel.from_pretrained(_torch_base(base_dir(family)),
                                                        tmp_path / "peft").eval())
  _same(ours, theirs, base, f"export {method} {family}")
  return json.loads((tmp_path / "peft" / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", ["lora", "hira"])
def test_export_llama_loads_in_peft_with_the_same_logits(base_dir, tmp_path, method):
  document = _export_case(base_dir, tmp_path, "llama", method)
  assert document["peft_type"] == method.upper() and document["modules_to_save"] == ["lm_head"]
  assert "model.layers.0.self_attn.q_proj" in document["target_modules"]
  assert not document["fan_in_fan_out"]
  if method == "lora":
    assert document["r"] == 4 and document["lora_alpha"] == 8
    assert document["rank_pattern"] == {r"model\.layers\.2\.mlp\.down_proj": 2,
                                        r"model\.layers\.0\.mlp\.down_proj": 2,
                                        r"model\.layers\.1\.mlp\.down_proj": 2}
    assert set(document["alpha_pattern"].values()) == {3}
  else:  # PEFT's HiRA has one rank: the rank-2 modules are zero-padded to 4
    assert document["r"] == 4 and document["rank_pattern"] == {}


@pytest.mark.parametrize("method", ["lora", "hira"])
def test_export_gpt2_conv1d_loads_in_peft_with_the_same_logits(base_dir, tmp_path, method):
  document = _export_case(base_dir, tmp_path, "gpt2", method)
  assert document["fan_in_fan_out"] and document["task_type"] == "CAUSAL_LM"


def test_export_refuses_smoa_and_names_to_lora(base_dir, tmp_path):
  model = from_hf(base_dir("llama"))
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0), rngs=nnx.Rngs(1), verbose=False)
  with pytest.raises(smoa_jax.AdapterMismatchError, match="to_lora"):
    smoa_jax.save_peft_adapter(model, tmp_path / "x")
  assert not (tmp_path / "x").exists()


# -- import: PEFT -> ours --------------------------------------------------------------------------
LLAMA_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "regex": dict(target_modules=r".*\.(k_proj|up_proj)"),
    "layers": dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 2],
                   layers_pattern="layers"),
    "exclude": dict(target_modules=["q_proj", "v_proj"],
                    exclude_modules=["layers.1.self_attn.v_proj"]),
    "patterns": dict(target_modules=["q_proj", "v_proj", "gate_proj"],
                     rank_pattern={"v_proj": 2, r"model\.layers\.1\.mlp\.gate_proj": 5},
                     alpha_pattern={"gate_proj": 3}),
    "rslora": dict(target_modules=["q_proj", "up_proj"], use_rslora=True,
                   rank_pattern={"up_proj": 6}),
    "modules_to_save": dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "dropout": dict(target_modules=["q_proj"], lora_dropout=0.1),
}


def _import_case(base_dir, tmp_path, family, config, case=""):
  theirs = _peft_of(base_dir(family), config, tmp_path / "peft")
  model = from_hf(base_dir(family))
  base = _our_logits(model)
  result = smoa_jax.load_peft_adapter(model, tmp_path / "peft")
  _same(_our_logits(model), theirs, base, f"import {result.method} {family} {case}")
  return model, result, theirs


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_import_lora_llama_options(base_dir, tmp_path, case):
  config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **LLAMA_CASES[case])
  model, result, _ = _import_case(base_dir, tmp_path, "llama", config, case)
  paths = set(result.configs)
  expected = {
      "list": 9, "regex": 6, "layers": 4, "exclude": 5, "patterns": 9, "rslora": 6,
      "modules_to_save": 3, "dropout": 3}[case]
  assert len(paths) == expected and {p for p, _ in smoa_jax.adapter_layers(model)} == paths
  if case == "layers":
    assert not any("/layers/1/" in p for p in paths)
  if case == "exclude":
    assert "model/layers/1/self_attn/v_proj" not in paths
  if case == "patterns":
    configs = result.configs
    assert configs["model/layers/0/self_attn/v_proj"].r == 2
    assert configs["model/layers/1/mlp/gate_proj"].r == 5
    assert configs["model/layers/0/mlp/gate_proj"].scaling == pytest.approx(3 / 4)
    assert configs["model/layers/1/mlp/gate_proj"].scaling == pytest.approx(3 / 5)
  if case == "rslora":
    assert result.configs["model/layers/0/mlp/up_proj"].scaling == pytest.approx(8 / np.sqrt(6))
  if case == "modules_to_save":
    assert result.trainable_arrays == ("lm_head/kernel",)
    assert isinstance(model.lm_head.kernel, smoa_jax.TrainableParam)
  if case == "dropout":
    assert result.configs["model/layers/0/self_attn/q_proj"].dropout == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["lora", "hira"])
def test_import_gpt2_conv1d_fan_in_fan_out(base_dir, tmp_path, method):
  fields = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
  config = (peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **fields)
            if method == "lora" else peft.HiraConfig(r=4, init_weights=False, **fields))
  _, result, _ = _import_case(base_dir, tmp_path, "gpt2", config, "fan_in_fan_out")
  assert len(result.configs) == 9  # attn.c_attn, attn.c_proj, mlp.c_proj in 3 layers


def test_import_hira_llama_with_peft_ignoring_rank_pattern(base_dir, tmp_path):
  config = peft.HiraConfig(r=4, target_modules=["q_proj", "down_proj"],
                           rank_pattern={"down_proj": 2}, init_weights=False)
  _, result, _ = _import_case(base_dir, tmp_path, "llama", config, "rank_pattern")
  # PEFT 0.21.2's HiRA gives every module r (it ignores rank_pattern); the tensors say so.
  assert {c.r for c in result.configs.values()} == {4}
  assert {c.scaling for c in result.configs.values()} == {1.0}


@pytest.mark.parametrize("method", ["lora", "hira"])
def test_round_trip_peft_ours_peft(base_dir, tmp_path, method):
  fields = dict(target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"])
  config = (peft.LoraConfig(r=4, lora_alpha=6, rank_pattern={"up_proj": 2}, use_rslora=True,
                            init_lora_weights=False, **fields)
            if method == "lora" else peft.HiraConfig(r=3, init_weights=False, **fields))
  model, _, theirs = _import_case(base_dir, tmp_path, "llama", config, "round trip")
  smoa_jax.save_peft_adapter(model, tmp_path / "again")
  again = _torch_logits(peft.PeftModel.from_pretrained(_torch_base(base_dir("llama")),
                                                       tmp_path / "again").eval())
  print(f"round trip {method}: max |logit difference| {np.abs(again - theirs).max():.2e}")
  np.testing.assert_allclose(again, theirs, atol=ATOL, rtol=0)


def test_named_peft_adapters_switch_on_one_base(base_dir, tmp_path):
  first = _peft_of(base_dir("llama"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["q_proj"]), tmp_path / "a")
  second = _peft_of(base_dir("llama"), peft.HiraConfig(r=2, init_weights=False,
                                                       target_modules=["q_proj", "v_proj"]),
                    tmp_path / "b", seed=2)
  model = from_hf(base_dir("llama"))
  smoa_jax.load_peft_adapter(model, tmp_path / "a", name="first")
  smoa_jax.load_peft_adapter(model, tmp_path / "b", name="second")
  assert smoa_jax.list_adapters(model) == ["first", "second"]
  np.testing.assert_allclose(_our_logits(model), second, atol=ATOL, rtol=0)
  smoa_jax.set_adapter(model, "first")
  np.testing.assert_allclose(_our_logits(model), first, atol=ATOL, rtol=0)
  assert jax.tree.leaves(nnx.state(model, smoa_jax.TrainableParam))
