"""from_hf / to_hf: round trips through transformers, adapter folding, sharding, loader errors."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import smoa_jax
from smoa_jax.models import hf as convert
from smoa_jax.models.hf import from_hf, to_hf
from tests.support.hf import LLAMA, randomize

# llama_dir (tests/conftest.py) is a saved LLAMA with a stand-in tokenizer.json; read-only.
VOCAB, LENGTH = LLAMA["vocab_size"], 8


def ids() -> np.ndarray:
  return np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))


def logits(model) -> np.ndarray:
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids())))


def hf_logits(path) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  with torch.no_grad():
    return model(torch.tensor(ids())).logits.numpy()


# -- round trips -----------------------------------------------------------------------------------
ROUND_TRIPS = {
    "llama_untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, LLAMA),
    "qwen3_tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        LLAMA, tie_word_embeddings=True, attention_bias=True)),
    "gpt2_tied": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        vocab_size=VOCAB, n_positions=32, n_embd=40, n_layer=2, n_head=5, bos_token_id=0,
        eos_token_id=0)),
}


@pytest.mark.parametrize("case", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_export_loads_in_transformers_with_equal_logits(case, tmp_path):
  config_cls, model_cls, config = case
  hf = randomize(model_cls(config_cls(**config)))
  hf.save_pretrained(tmp_path / "src")
  model = from_hf(tmp_path / "src")
  to_hf(model, tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors"]
  np.testing.assert_allclose(hf_logits(tmp_path / "out"), logits(model), atol=1e-4, rtol=0)


def test_sharded_export_and_reload(llama_dir, tmp_path):
  model = from_hf(llama_dir)
  to_hf(model, tmp_path / "out", max_shard_size="20KB")
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert not (tmp_path / "out" / "model.safetensors").exists()
  assert (tmp_path / "out" / "tokenizer.json").is_file()  # copied from the source directory
  np.testing.assert_allclose(hf_logits(tmp_path / "out"), logits(model), atol=1e-4, rtol=0)
  np.testing.assert_array_equal(logits(from_hf(tmp_path / "out")), logits(model))


@pytest.mark.parametrize("method", ["smoa", "lora"])
def test_adapted_model_exports_folded_kernels(method, llama_dir, tmp_path):
  model = from_hf(llama_dir)
  base = logits(model)
  config = (smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8) if method == "smoa"
            else smoa_jax.LoRAConfig(r=4, alpha=8))
  layer_cls = smoa_jax.adapter_class(config)
  attn0, mlp1 = model.model.layers[0].self_attn, model.model.layers[1].mlp
  rngs = nnx.Rngs(1)
  attn0.q_proj = layer_cls.from_linear(attn0.q_proj, config, rngs=rngs)
  attn0.v_proj = layer_cls.from_linear(attn0.v_proj, config, rngs=rngs)
  mlp1.down_proj = layer_cls.from_linear(mlp1.down_proj, config, rngs=rngs)
  for layer in (attn0.q_proj, attn0.v_proj, mlp1.down_proj):
    b = layer.lora_b[...]
    layer.lora_b[...] = 0.3 * np.random.RandomState(2).standard_normal(b.shape).astype(b.dtype)
  adapted = logits(model)
  assert np.abs(adapted - base).max() > 1e-3  # the adapters change the function
  to_hf(model, tmp_path / "out")
  tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert not any("lora" in k or "perm" in k for k in tensors)
  np.testing.assert_allclose(tensors["model.layers.0.self_attn.q_proj.weight"],
                             np.asarray(attn0.q_proj.folded_kernel()).T, atol=1e-7)
  np.testing.assert_allclose(hf_logits(tmp_path / "out"), adapted, atol=1e-4, rtol=0)


def test_fully_finetuned_kernel_exports_like_any_kernel(llama_dir, tmp_path):
  model = from_hf(llama_dir)
  q_proj = model.model.layers[1].self_attn.q_proj
  q_proj.kernel = smoa_jax.TrainableParam(q_proj.kernel[...] + 0.01)
  to_hf(model, tmp_path / "out")
  tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
  np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"],
                                np.asarray(q_proj.kernel[...]).T)


def test_pytorch_bin_checkpoint_and_bfloat16_round_trip(llama_dir, tmp_path):
  hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
  state = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
  (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
  torch.save(state, tmp_path / "pytorch_model.bin")
  model = from_hf(tmp_path)
  np.testing.assert_array_equal(np.asarray(model.model.layers[0].mlp.up_proj.kernel[...]),
                                state["model.layers.0.mlp.up_proj.weight"].float().numpy().T)
  bf16 = from_hf(tmp_path, dtype=jnp.bfloat16)
  assert bf16.model.embed_tokens.embedding.dtype == jnp.bfloat16
  to_hf(bf16, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert reloaded.dtype == torch.bfloat16
  assert torch.equal(reloaded.state_dict()["model.layers.0.mlp.up_proj.weight"],
                     state["model.layers.0.mlp.up_proj.weight"])


def test_num_labels_on_a_causal_lm_is_refused(llama_dir):
  with pytest.raises(smoa_jax.CheckpointError, match="only BERT checkpoints"):
    from_hf(llama_dir, num_labels=2)


def test_param_bytes_counts_abstract_models(llama_dir):
  model = from_hf(llama_dir)
  expected = sum(v.size * 4 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert convert.param_bytes(model) == expected


# -- export errors and atomicity -------------------------------------------------------------------
def test_failed_export_leaves_nothing(llama_dir, tmp_path, monkeypatch):
  model = from_hf(llama_dir)
  real = convert._write_shards

  def fail_after_writing(entries, directory, limit):
    real(entries, directory, limit)
    raise OSError("disk full")

  monkeypatch.setattr(convert, "_write_shards", fail_after_writing)
  with pytest.raises(OSError, match="disk full"):
    to_hf(model, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_export_replaces_an_earlier_export_but_not_other_directories(llama_dir, tmp_path):
  model = from_hf(llama_dir)
  to_hf(model, tmp_path / "out", max_shard_size="20KB")
  to_hf(model, tmp_path / "out")  # now a single file: the old shards must be gone
  assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  umask = os.umask(0)
  os.umask(umask)
  assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "notes.txt").write_text("keep me")
  with pytest.raises(smoa_jax.CheckpointError, match="refusing to overwrite"):
    to_hf(model, tmp_path / "docs")
  assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_explicit_tokenizer_dir(llama_dir, tmp_path):
  model = from_hf(llama_dir)
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "vocab.txt").write_text("a\nb\n")
  to_hf(model, tmp_path / "out", tokenizer_dir=tmp_path / "tok")
  assert (tmp_path / "out" / "vocab.txt").is_file() and not (tmp_path / "out" / "tokenizer.json").exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(smoa_jax.CheckpointError, match="holds no tokenizer files"):
    to_hf(model, tmp_path / "out2", tokenizer_dir=tmp_path / "empty")
  assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("size,expected", [(1234, 1234), ("2GB", 2 * 10**9), ("500MB", 5 * 10**8),
                                           ("1GiB", 2**30), ("20 kb", 20_000)])
def test_shard_size_strings(size, expected):
  assert convert._parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "-1GB", "2XB", 0])
def test_bad_shard_sizes(size):
  with pytest.raises(smoa_jax.CheckpointError, match="max_shard_size"):
    convert._parse_size(size)
