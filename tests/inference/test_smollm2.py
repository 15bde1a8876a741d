"""Real weights: greedy generation of SmolLM2-135M-Instruct equals transformers' ``generate`` token
for token on chat prompts, for the base model and with a trained, unmerged SMoA adapter (against
transformers on the merged export). Slow: compiling for a 30-layer model takes minutes on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from flax import nnx

import smoa_jax
from smoa_jax.app import assets
from smoa_jax.inference.text import encode_prompts, stop_token_ids
from smoa_jax.training import data

pytestmark = [
    pytest.mark.assets, pytest.mark.slow,
    pytest.mark.skipif(not assets.is_cached("smollm2"),
                       reason="SmolLM2 not cached (run 'smoa-jax fetch-assets')"),
]

PROMPTS = ["What is the capital of France?", "Give me three tips to sleep better.",
           "Write a short poem about the sea.", "Explain what a neural network is."]
NEW = 32


@pytest.fixture(scope="module")
def smollm2():
  path = assets.fetch_smollm2()
  return path, transformers.AutoTokenizer.from_pretrained(path)


def transformers_ids(model_dir, tokenizer, prompts: list[list[int]],
                     stops: tuple[int, ...]) -> list[list[int]]:
  """transformers' greedy new ids of every prompt, cut after the first stop id."""
  hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  out = []
  for ids in prompts:
    with torch.no_grad():
      new = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                        do_sample=False, max_new_tokens=NEW, eos_token_id=list(stops),
                        pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
    out.append(new[:cut])
  return out


def ours_ids(model, tokenizer, prompts: list[list[int]], stops) -> list[list[int]]:
  return smoa_jax.generate_ids(model, prompts, max_new_tokens=NEW, eos_token_ids=stops,
                               pad_token_id=tokenizer.pad_token_id)


def test_base_model_greedy_equals_transformers(smollm2):
  path, tokenizer = smollm2
  model = smoa_jax.from_hf(path)
  prompts = encode_prompts(tokenizer, PROMPTS, chat=True)
  stops = stop_token_ids(model, tokenizer)
  ours = ours_ids(model, tokenizer, prompts, stops)
  assert ours == transformers_ids(path, tokenizer, prompts, stops)
  assert sum(len(ids) for ids in ours) >= 3 * NEW  # most answers run the full 32 tokens
  texts = smoa_jax.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=NEW, chat=True)
  assert "Paris" in texts[0]


def test_trained_unmerged_smoa_adapter_equals_transformers_on_the_merged_export(smollm2,
                                                                                 tmp_path):
  path, tokenizer = smollm2
  model = smoa_jax.from_hf(path)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(r=8, num_blocks=2, alpha=16.0,
                                                    target_modules=["q_proj", "v_proj"]),
                         rngs=nnx.Rngs(0), verbose=False)
  answers = ["Arr, the capital be Paris, matey!", "Arr, sleep in yer hammock, matey!",
             "Arr, the sea be me home, matey!", "Arr, a net o' neurons, matey!"]
  texts = [tokenizer.apply_chat_template([{"role": "user", "content": p},
                                          {"role": "assistant", "content": a}], tokenize=False)
           for p, a in zip(PROMPTS, answers)]
  tokens = data.tokenize(data.Records(texts * 4, None, None, "pirate"), tokenizer, 48,
                         add_eos=True)
  smoa_jax.train(model, smoa_jax.CausalLMTask(), tokens.arrays,
                 smoa_jax.TrainConfig(steps=6, batch_size=4, learning_rate=5e-3, progress=False))
  assert all(float(abs(layer.lora_b[...]).max()) > 0 for _, layer in smoa_jax.adapter_layers(model))
  smoa_jax.to_hf(model, tmp_path / "merged")
  prompts = encode_prompts(tokenizer, PROMPTS, chat=True)
  stops = stop_token_ids(model, tokenizer)
  ours = ours_ids(model, tokenizer, prompts, stops)
  assert ours == transformers_ids(tmp_path / "merged", tokenizer, prompts, stops)
  assert not any(layer.merged for _, layer in smoa_jax.adapter_layers(model))
