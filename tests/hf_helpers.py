"""Helpers for tests that build tiny random Hugging Face models with transformers."""

import torch
import transformers


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Perturb every parameter (so zero biases and unit norms are exercised too); eval mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def tiny_causal_lm(family: str, vocab: int = 61, **overrides) -> transformers.PreTrainedModel:
  """A three-layer random Llama (``nn.Linear``, biased attention, untied head) or GPT-2
  (``Conv1D``), perturbed by :func:`randomize`; eval mode. ``overrides`` change config fields."""
  if family == "llama":
    config = transformers.LlamaConfig(**{
        "vocab_size": vocab, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
        "attention_bias": True, "tie_word_embeddings": False, **overrides})
    cls = transformers.LlamaForCausalLM
  else:
    config = transformers.GPT2Config(**{
        "vocab_size": vocab, "n_positions": 16, "n_embd": 32, "n_layer": 3, "n_head": 4,
        "bos_token_id": 0, "eos_token_id": 0, **overrides})
    cls = transformers.GPT2LMHeadModel
  torch.manual_seed(0)
  return randomize(cls(config))
