"""Text-level generation (smoa_jax/inference/text.py): ``smoa_jax.generate`` returns the new text
of transformers' greedy generation, with plain prompts and with the chat template."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import smoa_jax
from smoa_jax.inference.text import encode_prompts, stop_token_ids

NEW = 8


@pytest.fixture(scope="module")
def chat(chat_llama):
  """``(model, tokenizer, transformers model)`` of a tiny Llama whose tokenizer has a chat
  template and whose EOS is ``</s>`` (id 3)."""
  path = chat_llama
  return (smoa_jax.from_hf(path), transformers.AutoTokenizer.from_pretrained(path),
          transformers.AutoModelForCausalLM.from_pretrained(path).eval())


def transformers_text(hf, tokenizer, ids: list[int]) -> str:
  with torch.no_grad():
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                      do_sample=False, max_new_tokens=NEW, pad_token_id=tokenizer.pad_token_id)
  return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_plain_prompts_give_the_new_text_of_transformers(chat):
  model, tokenizer, hf = chat
  prompts = ["the cat sat on the", "a dog ran"]
  ours = smoa_jax.generate(model, tokenizer, prompts, max_new_tokens=NEW)
  assert ours == [transformers_text(hf, tokenizer, tokenizer(p)["input_ids"]) for p in prompts]
  assert smoa_jax.generate(model, tokenizer, prompts[0], max_new_tokens=NEW) == ours[:1]


def test_chat_prompts_are_rendered_with_the_template(chat):
  model, tokenizer, hf = chat
  conversation = [{"role": "system", "content": "the bird"}, {"role": "user", "content": "a cat"},
                  {"role": "assistant", "content": "sat on"}, {"role": "user", "content": "the"}]
  prompts = ["a dog sat", conversation]
  ours = smoa_jax.generate(model, tokenizer, prompts, max_new_tokens=NEW, chat=True)
  rendered = [tokenizer.apply_chat_template(
      [{"role": "user", "content": p}] if isinstance(p, str) else p, add_generation_prompt=True,
      tokenize=True)["input_ids"] for p in prompts]
  assert encode_prompts(tokenizer, prompts, chat=True) == rendered
  assert rendered[0][-2:] == tokenizer.convert_tokens_to_ids(["<s>", "assistant"])
  assert ours == [transformers_text(hf, tokenizer, ids) for ids in rendered]


def test_stop_ids_join_generation_config_and_tokenizer(chat, tmp_path, monkeypatch):
  model, tokenizer, _ = chat
  assert stop_token_ids(model, tokenizer) == (3,)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
  monkeypatch.setattr(model, "source_dir", str(tmp_path))
  assert stop_token_ids(model, tokenizer) == (3, 5, 7)
