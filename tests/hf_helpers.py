"""Helpers for tests that build tiny random Hugging Face models with transformers."""

import numpy as np
import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Perturb every parameter (so zero biases and unit norms are exercised too); eval mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


# Tiny random causal LMs of every family that generates (odd sizes, GQA, biases, tied and untied
# embeddings, sliding windows), without BOS/EOS so that generation never stops early.
# name -> (transformers config class, model class, config overrides)
CAUSAL_VOCAB = 97
_LLAMA_LIKE = dict(vocab_size=CAUSAL_VOCAB, hidden_size=48, intermediate_size=72,
                   num_hidden_layers=2, max_position_embeddings=64, bos_token_id=None,
                   eos_token_id=None, pad_token_id=0)


def causal_families():
  """The table of tiny causal families (imports transformers lazily)."""
  import transformers as t

  return {
      "llama": (t.LlamaConfig, t.LlamaForCausalLM, dict(
          _LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
          attention_bias=True, tie_word_embeddings=False)),
      "mistral": (t.MistralConfig, t.MistralForCausalLM, dict(
          _LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=3, sliding_window=4)),
      "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, dict(
          _LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True,
          sliding_window=4, max_window_layers=1, tie_word_embeddings=True)),
      "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, dict(
          _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2, head_dim=14,
          tie_word_embeddings=False)),
      "gpt2": (t.GPT2Config, t.GPT2LMHeadModel, dict(
          vocab_size=CAUSAL_VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
          bos_token_id=None, eos_token_id=None)),
  }


def tiny_causal_lm(name: str, directory, seed: int = 0):
  """A randomized tiny model of family ``name`` saved to ``directory``; returns the torch model."""
  config_cls, model_cls, overrides = causal_families()[name]
  torch.manual_seed(seed)
  hf = randomize(model_cls(config_cls(**overrides)), seed)
  hf.save_pretrained(directory)
  return hf


# A chat template in the style of ChatML for the word-level test tokenizers.
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")
CHAT_WORDS = "the a cat dog bird sat ran on mat hill tree and then system user assistant".split()


def add_chat_template(directory):
  """Give the tokenizer saved in ``directory`` :data:`CHAT_TEMPLATE`; returns ``directory``."""
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  tokenizer.chat_template = CHAT_TEMPLATE
  tokenizer.save_pretrained(directory)
  return directory


def tiny_chat_llama(directory):
  """A two-layer random Llama (128 positions) with a word-level tokenizer (``<pad>`` 0, ``</s>`` 3
  = EOS) that has a chat template; saved to ``directory``, which is returned."""
  from examples.hf_finetune import tiny_llama

  rng = np.random.default_rng(0)
  tiny_llama(directory, [" ".join(rng.choice(CHAT_WORDS, size=8)) for _ in range(32)])
  return add_chat_template(directory)
