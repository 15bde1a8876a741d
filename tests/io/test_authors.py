"""Tests for smoa_jax/io/authors.py: adapters in the authors' PyTorch SMoA layout.

The other side is :mod:`tests.support.authors_reference`, a torch SMoA layer written from docs/design.md section 1
in torch layout (not the authors' code), put into tiny random ``transformers`` models: Llama
(``nn.Linear``, ``torch_weight (out, in)``) and GPT-2 (``Conv1D``, weight ``(in, out)``).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

import smoa_jax
from smoa_jax.io import authors
from smoa_jax.models.hf import from_hf
from tests.support import authors_reference as ref

VOCAB, LENGTH = 61, 7
# Llama: out < in and in < out; GPT-2: the fused Conv1D c_attn (the authors' default for gpt2).
TARGETS = {"llama": ["v_proj", "down_proj"], "gpt2": ["c_attn"]}
# K = 3 with a frozen (rank-0) middle block: every block-layout rule is exercised.
THEIR_CONFIG = {"r": 5, "num_blocks": 3, "lora_alpha": 10, "branch_ranks": [3, 0, 2]}


def _hf_model(family: str, zero_inputs: int = 0) -> transformers.PreTrainedModel:
  if family == "llama":
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attention_bias=True, tie_word_embeddings=False)
    cls = transformers.LlamaForCausalLM
  else:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0)
    cls = transformers.GPT2LMHeadModel
  torch.manual_seed(0)
  model = cls(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    if zero_inputs:  # exactly tied centroids: torch's argsort orders them its own way
      model.model.layers[0].self_attn.v_proj.weight[:, :zero_inputs] = 0.0
  return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """``family -> (transformers model, checkpoint directory)``, built once per case."""
  cache = {}

  def get(family: str, zero_inputs: int = 0):
    if (family, zero_inputs) not in cache:
      hf = _hf_model(family, zero_inputs)
      path = tmp_path_factory.mktemp(f"{family}{zero_inputs}")
      hf.save_pretrained(path)
      cache[family, zero_inputs] = hf, path
    return cache[family, zero_inputs]

  return get


def _ids() -> np.ndarray:
  return np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))


def _our_layers(model: nnx.Module) -> dict[str, smoa_jax.SMoADense]:
  """Adapter layers by Hugging Face module name (our paths use ``/`` where HF uses ``.``)."""
  return {path.replace("/", "."): layer for path, layer in smoa_jax.adapter_layers(model)}


def _assert_same(model: nnx.Module, torch_model: torch.nn.Module,
                 layers: dict[str, ref.ReferenceSMoALinear]) -> None:
  """Same dW, layer outputs and logits (atol 1e-5; measured: <= 2e-8, 4e-7, 5e-7)."""
  ours = _our_layers(model)
  assert set(ours) == set(layers)
  for name, layer in layers.items():
    with torch.no_grad():
      dw = layer.delta_weight().numpy()
      xi = np.random.RandomState(1).randn(3, 5, dw.shape[1]).astype(np.float32)
      y = layer(torch.tensor(xi)).numpy()
    assert np.abs(dw).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(np.asarray(ours[name].delta_weight()).T, dw, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ours[name](jnp.asarray(xi))), y, atol=1e-5, rtol=0)
  with torch.no_grad():
    expected = torch_model(torch.tensor(_ids())).logits.numpy()
  model.eval()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(_ids()))), expected, atol=1e-5, rtol=0)


def _perturb(model: nnx.Module) -> None:
  rng = np.random.RandomState(3)
  for _, layer in smoa_jax.adapter_layers(model):
    layer.lora_a[...] = jnp.asarray(0.3 * rng.randn(*layer.lora_a.shape), jnp.float32)
    layer.lora_b[...] = jnp.asarray(0.3 * rng.randn(*layer.lora_b.shape), jnp.float32)


def _ours(path: Path, family: str, targets: list[str] | None = None, **overrides: Any
          ) -> nnx.Module:
  """Our adapter (the reference's config unless overridden) on a fresh model, perturbed."""
  model = from_hf(path)
  fields = {**dict(r=5, num_blocks=3, alpha=10, branch_ranks=(3, 0, 2)), **overrides}
  config = smoa_jax.SMoAConfig(target_modules=targets or TARGETS[family], **fields)
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1), verbose=False)
  _perturb(model)
  return model


def _theirs(hf: torch.nn.Module, family: str, directory: Path, targets: list[str] | None = None,
            binary: bool = False) -> tuple[torch.nn.Module, dict[str, ref.ReferenceSMoALinear]]:
  """The reference adapted and perturbed, saved in the authors' layout to ``directory``."""
  torch_model = copy.deepcopy(hf)
  config = {**THEIR_CONFIG, "target_modules": targets or TARGETS[family],
            "fan_in_fan_out": family == "gpt2"}
  layers = ref.inject(torch_model, config)
  torch.manual_seed(2)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn_like(p))
  ref.save_authors_directory(torch_model, config, directory, binary=binary)
  return torch_model, layers


def _load_reference(hf: torch.nn.Module, directory: Path
                    ) -> tuple[dict, torch.nn.Module, dict[str, ref.ReferenceSMoALinear]]:
  """A copy of ``hf`` adapted and loaded from ``directory`` the authors' way (their config's
  targets, their key names): ``(adapter_config, model, layers by HF module name)``."""
  torch_model = copy.deepcopy(hf)
  document = json.loads((directory / "adapter_config.json").read_text())
  layers = ref.inject(torch_model, document)
  ref.load_adapter_state_dict(torch_model, load_file(str(directory / "adapter_model.safetensors")))
  return document, torch_model, layers


# -- export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_means_the_same_in_the_reference(family, checkpoint, tmp_path):
  hf, path = checkpoint(family)
  model = _ours(path, family)
  authors.save_authors_adapter(model, tmp_path / "out")
  document, torch_model, layers = _load_reference(hf, tmp_path / "out")
  assert document["peft_type"] == "SMOA" and document["fan_in_fan_out"] == (family == "gpt2")
  assert (document["r"], document["num_blocks"], document["lora_alpha"]) == (5, 3, 10)
  assert document["branch_ranks"] == [3, 0, 2] and document["bias"] == "none"
  assert document["task_type"] == "CAUSAL_LM" and document["inference_mode"] is True
  first = sorted(layers)[0]
  tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
  assert f"base_model.model.{first}.lora_A.0.weight" in tensors
  assert f"base_model.model.{first}.lora_A.1.weight" not in tensors  # rank-0 block: no tensors
  _assert_same(model, torch_model, layers)


def test_export_reorders_within_blocks_and_refuses_a_change_of_block(checkpoint, tmp_path):
  hf, path = checkpoint("llama")
  model = _ours(path, "llama", targets=["v_proj"])
  layer = model.model.layers[1].self_attn.v_proj
  theirs = authors.authors_blocks(layer.kernel[...], 3)
  # Same blocks, our order of block 0 reversed: the factors are re-expressed exactly.
  in_perm = np.asarray(theirs.in_perm).copy()
  in_perm[:16] = in_perm[:16][::-1]
  layer.in_perm[...] = jnp.asarray(in_perm)
  authors.save_authors_adapter(model, tmp_path / "reordered")
  _, torch_model, layers = _load_reference(hf, tmp_path / "reordered")
  _assert_same(model, torch_model, layers)
  # One coordinate in another block: no factors in their layout give this dW.
  in_perm[[0, 20]] = in_perm[[20, 0]]
  layer.in_perm[...] = jnp.asarray(in_perm)
  with pytest.raises(smoa_jax.AdapterMismatchError, match="into other blocks"):
    authors.save_authors_adapter(model, tmp_path / "moved")
  assert not (tmp_path / "moved").exists()


def test_exactly_tied_centroids_both_ways(checkpoint, tmp_path):
  """20 all-zero input rows tie at centroid 0: torch orders them its own way (unstable argsort)."""
  hf, path = checkpoint("llama", zero_inputs=20)
  model = _ours(path, "llama", targets=["v_proj"])
  layer = model.model.layers[0].self_attn.v_proj
  theirs = authors.authors_blocks(layer.kernel[...], 3)
  check = authors.compare_blocks("v_proj", layer.blocks, theirs)
  assert check.in_positions > 0 and check.out_positions == 0, check
  # Export: the zero rows may change block (their dW is 0), the rest follows their order.
  authors.save_authors_adapter(model, tmp_path / "ours")
  _, torch_model, layers = _load_reference(hf, tmp_path / "ours")
  _assert_same(model, torch_model, layers)
  # Import: the check fires and the authors' permutation is adopted.
  torch_model, layers = _theirs(hf, "llama", tmp_path / "theirs", targets=["v_proj"])
  fresh = from_hf(path)
  with pytest.warns(UserWarning, match="differs from smoa_jax's in 1 of 2 modules"):
    result = authors.load_authors_adapter(fresh, tmp_path / "theirs")
  assert [c.module for c in result.mismatched] == ["model/layers/0/self_attn/v_proj"]
  adopted = fresh.model.layers[0].self_attn.v_proj
  reference = layers["model.layers.0.self_attn.v_proj"]
  np.testing.assert_array_equal(np.asarray(adopted.in_perm[...]), reference.col_order.numpy())
  np.testing.assert_array_equal(np.asarray(adopted.out_perm[...]), reference.row_order.numpy())
  _assert_same(fresh, torch_model, layers)


# -- import ----------------------------------------------------------------------------------------
def test_import_under_a_name_beside_another_adapter(checkpoint, tmp_path):
  hf, path = checkpoint("llama")
  torch_model, layers = _theirs(hf, "llama", tmp_path / "theirs")
  model = from_hf(path)
  smoa_jax.apply_adapter(model, smoa_jax.LoRAConfig(r=2, alpha=4.0, target_modules=["v_proj"]),
                         rngs=nnx.Rngs(0), verbose=False)
  _perturb(model)
  before = np.asarray(model(jnp.asarray(_ids())))
  authors.load_authors_adapter(model, tmp_path / "theirs", name="theirs")
  assert smoa_jax.list_adapters(model) == ["default", "theirs"]
  _assert_same(model, torch_model, layers)
  smoa_jax.set_adapter(model, "default")
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(_ids()))), before)


@pytest.mark.parametrize("family,binary", [("llama", False), ("gpt2", True)],
                         ids=["llama-safetensors", "gpt2-bin"])
def test_import_means_the_same_as_the_reference(family, binary, checkpoint, tmp_path):
  hf, path = checkpoint(family)
  torch_model, layers = _theirs(hf, family, tmp_path / "theirs", binary=binary)
  model = from_hf(path)
  result = authors.load_authors_adapter(model, tmp_path / "theirs")
  assert len(result.checks) == len(layers) == 2 * len(TARGETS[family]) and not result.mismatched
  assert result.config.scaling == 2.0 and result.config.block_ranks == (3, 0, 2)
  assert len(result.report.modules) == len(layers)
  _assert_same(model, torch_model, layers)
  # Round trip: our export of the imported adapter is the reference's adapter again.
  authors.save_authors_adapter(model, tmp_path / "again")
  _, again, again_layers = _load_reference(hf, tmp_path / "again")
  _assert_same(model, again, again_layers)


def test_import_replaces_a_doctored_permutation_of_an_existing_adapter(checkpoint, tmp_path):
  hf, path = checkpoint("llama")
  torch_model, layers = _theirs(hf, "llama", tmp_path / "theirs")
  model = _ours(path, "llama")
  layer = model.model.layers[1].mlp.down_proj
  in_perm = np.asarray(layer.in_perm[...]).copy()
  in_perm[[0, -1]] = in_perm[[-1, 0]]  # first and last block swap one coordinate
  layer.in_perm[...] = jnp.asarray(in_perm)
  with pytest.warns(UserWarning, match="Using the authors' permutation"):
    result = authors.load_authors_adapter(model, tmp_path / "theirs")
  assert result.report is None  # the layers were there already
  doctored = authors.PermutationCheck("model/layers/1/mlp/down_proj", 2, 0, 2, 0)
  assert result.mismatched == (doctored,)
  _assert_same(model, torch_model, layers)


# -- errors ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def theirs_dir(checkpoint, tmp_path_factory):
  hf, path = checkpoint("llama")
  directory = tmp_path_factory.mktemp("theirs")
  _theirs(hf, "llama", directory)
  return path, directory


def _edited(source: Path, target: Path, config: Callable | None = None,
            tensors: Callable | None = None) -> Path:
  """A copy of adapter directory ``source`` with its config and/or tensors rewritten."""
  shutil.copytree(source, target)
  if config is not None:
    document = json.loads((source / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps(config(document)))
  if tensors is not None:
    state = load_file(str(source / "adapter_model.safetensors"))
    save_file(tensors(state), str(target / "adapter_model.safetensors"))
  return target


KEY = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.0.weight"
BAD_FILES = {
    "not_smoa": (dict(config=lambda d: {**d, "peft_type": "LORA"}),
                 smoa_jax.CheckpointError, "peft_type='LORA'"),
    "branch_ranks_sum": (dict(config=lambda d: {**d, "branch_ranks": [3, 0, 3]}),
                         smoa_jax.CheckpointError, "summing to r=5"),
    "missing_key": (dict(tensors=lambda s: {k: v for k, v in s.items() if k != KEY}),
                    smoa_jax.AdapterMismatchError, "missing keys"),
    "other_base_model": (dict(tensors=lambda s: {**s, KEY.replace("v_proj", "qkv"): s[KEY].clone()}),
                         smoa_jax.AdapterMismatchError,
                         r"no linear module \['model.layers.0.self_attn.qkv'\]"),
    "trained_bias": (dict(tensors=lambda s: {**s, "base_model.model.lm_head.bias": torch.zeros(3)}),
                     smoa_jax.AdapterMismatchError, "not SMoA factors"),
    "wrong_shape": (dict(tensors=lambda s: {**s, KEY: s[KEY][:, :-1].contiguous()}),
                    smoa_jax.AdapterMismatchError, r"shape \(3, 15\), expected \(3, 16\)"),
    "no_target": (dict(config=lambda d: {**d, "target_modules": ["query"]}),
                  smoa_jax.AdapterMismatchError, "matches no linear module"),
    "smoa_jax_format": (dict(config=lambda d: {"library": "smoa-jax"}),
                        smoa_jax.CheckpointError, "smoa_jax.load_adapter"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_adapters_are_refused_before_touching_the_model(case, theirs_dir, tmp_path):
  path, directory = theirs_dir
  edits, error, message = BAD_FILES[case]
  model = from_hf(path)
  with pytest.raises(error, match=message):
    authors.load_authors_adapter(model, _edited(directory, tmp_path / case, **edits))
  assert not smoa_jax.adapter_layers(model)


def test_import_checks_the_files_the_flags_and_existing_adapters(theirs_dir, tmp_path):
  path, directory = theirs_dir
  with pytest.raises(smoa_jax.CheckpointError, match="does not exist"):
    authors.load_authors_adapter(from_hf(path), tmp_path / "nowhere")
  weightless = _edited(directory, tmp_path / "weightless")
  (weightless / "adapter_model.safetensors").unlink()
  with pytest.raises(smoa_jax.CheckpointError, match="no adapter weights"):
    authors.load_authors_adapter(from_hf(path), weightless)
  (weightless / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
  with pytest.raises(smoa_jax.CheckpointError, match="unreadable"):
    authors.load_authors_adapter(from_hf(path), weightless)
  with pytest.raises(smoa_jax.CheckpointError, match="load_authors_adapter"):
    smoa_jax.load_adapter(from_hf(path), directory)
  flipped = _edited(directory, tmp_path / "flipped", config=lambda d: {**d, "fan_in_fan_out": True})
  with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
    authors.load_authors_adapter(from_hf(path), flipped)
  model = _ours(path, "llama", targets=["v_proj"], alpha=20)  # scaling 4, the file's is 2
  with pytest.raises(smoa_jax.AdapterMismatchError, match="already carries"):
    authors.load_authors_adapter(model, directory)


def test_layers_to_transform_follows_the_authors_matching(theirs_dir, tmp_path):
  path, directory = theirs_dir
  one_layer = _edited(
      directory, tmp_path / "one", config=lambda d: {**d, "layers_to_transform": [1]},
      tensors=lambda s: {k: v for k, v in s.items() if ".layers.1." in k})
  model = from_hf(path)
  result = authors.load_authors_adapter(model, one_layer)
  assert {c.module.split("/")[2] for c in result.checks} == {"1"}
  assert len(result.checks) == 2


def test_export_refusals(checkpoint, tmp_path, monkeypatch):
  _, path = checkpoint("llama")
  with pytest.raises(smoa_jax.AdapterMismatchError, match="no adapter layers"):
    authors.save_authors_adapter(from_hf(path), tmp_path / "a")
  lora = from_hf(path)
  smoa_jax.apply_adapter(lora, smoa_jax.LoRAConfig(r=2, target_modules=["v_proj"]),
                         rngs=nnx.Rngs(0), verbose=False)
  with pytest.raises(smoa_jax.AdapterMismatchError, match="stores SMoA only"):
    authors.save_authors_adapter(lora, tmp_path / "a")
  with pytest.raises(smoa_jax.AdapterMismatchError, match="from smoa_jax.from_hf"):
    authors.save_authors_adapter(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path / "a")
  model = _ours(path, "llama", targets=["v_proj"])
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(smoa_jax.CheckpointError, match=r"smoa-jax\[torch\]"):
    authors.save_authors_adapter(model, tmp_path / "a")
  assert not (tmp_path / "a").exists()
  authors.save_authors_adapter(model, tmp_path / "unverified", verify=False)
  assert (tmp_path / "unverified" / "adapter_model.safetensors").is_file()
