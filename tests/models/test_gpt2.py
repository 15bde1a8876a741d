"""GPT-2 parity with transformers on tiny random checkpoints (fp32, atol 1e-4)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from smoa_jax.models import GPT2LMHeadModel
from smoa_jax.models.hf import from_hf

VOCAB, LENGTH = 91, 9
CASES = {
    "tied_inverse_layer_scaling": dict(scale_attn_by_inverse_layer_idx=True),
    "untied_custom_inner": dict(tie_word_embeddings=False, n_inner=70),
}


def tiny_gpt2(**overrides) -> transformers.GPT2LMHeadModel:
  config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=40, n_layer=2, n_head=5,
                                   bos_token_id=0, eos_token_id=0, **overrides)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def inputs() -> tuple[np.ndarray, np.ndarray]:
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))
  mask = np.ones((2, LENGTH), np.int64)
  mask[1, 6:] = 0
  return ids, mask


def assert_parity(model, hf) -> None:
  ids, mask = inputs()
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(nnx.jit(lambda m, x, a: m(x, a))(model, jnp.asarray(ids), jnp.asarray(mask)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers(overrides, tmp_path):
  hf = tiny_gpt2(**overrides)
  hf.save_pretrained(tmp_path)
  model = from_hf(tmp_path)
  assert isinstance(model, GPT2LMHeadModel)
  assert (model.lm_head is None) == hf.config.tie_word_embeddings
  assert_parity(model, hf)


def test_paths_mirror_hf_names(tmp_path):
  hf = tiny_gpt2()
  hf.save_pretrained(tmp_path)
  model = from_hf(tmp_path)
  block = model.transformer.h[1]
  assert type(block.attn.c_attn) is nnx.Linear and block.attn.c_attn.kernel.shape == (40, 120)
  assert block.mlp.c_fc.kernel.shape == (40, 160) and block.mlp.c_proj.kernel.shape == (160, 40)
  # Conv1D weights are already (in, out): loaded without a transpose.
  np.testing.assert_array_equal(np.asarray(block.attn.c_attn.kernel[...]),
                                hf.transformer.h[1].attn.c_attn.weight.detach().numpy())


def test_legacy_checkpoint_without_prefix_and_with_buffers(tmp_path):
  """Old GPT-2 files name tensors without ``transformer.`` and carry attention-mask buffers."""
  hf = tiny_gpt2()
  state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
           if k != "lm_head.weight"}
  for i in range(2):
    state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
  assert_parity(from_hf(tmp_path), hf)
