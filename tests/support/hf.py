"""Tiny random Hugging Face checkpoints for tests, built with transformers (torch on the CPU).

Every builder seeds torch before it initializes a model, so a checkpoint does not depend on what
ran before it in the process. ``tests/conftest.py`` builds the shared ones once per session.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0, 1, 2, 3
# An untied Llama with grouped-query attention and head_dim != hidden_size / heads.
LLAMA = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, head_dim=10, tie_word_embeddings=False,
             max_position_embeddings=64)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Perturb every parameter (so zero biases and unit norms are exercised too); eval mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def padded_batch(vocab: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Three rows of token ids ``(3, length)`` and a mask with right padding (row 1) and left
  padding (row 2)."""
  ids = np.random.RandomState(0).randint(0, vocab, (3, length))
  mask = np.ones((3, length), np.int64)
  mask[1, length - 4:] = 0
  mask[2, :3] = 0
  return ids, mask


def assert_logits_match(hf: torch.nn.Module, model, ids: np.ndarray, mask: np.ndarray,
                        atol: float = 1e-4) -> None:
  """Our ``model``'s logits equal transformers' ``hf``'s on ``ids (B, T)`` with the padding
  ``mask`` (at real tokens: padded query positions are undefined in both) and without it."""
  forward = nnx.jit(lambda m, x, a: m(x, a))
  for attention_mask in (mask, np.ones_like(mask)):
    with torch.no_grad():
      ref = hf(torch.tensor(ids), attention_mask=torch.tensor(attention_mask)).logits.numpy()
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(attention_mask)))
    valid = attention_mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=atol, rtol=0)


def assert_adapted_export_reloads(source: Path, out: Path, vocab: int, length: int,
                                  targets: list[str]) -> transformers.PreTrainedModel:
  """Load ``source``, put SMoA on ``targets`` with nonzero ``lora_b`` (as if trained), merge,
  export to ``out``: transformers reloads it with our adapted logits (atol 1e-4), which differ
  from the base model's. Returns the reloaded model."""
  import smoa_jax

  model = smoa_jax.from_hf(source)
  ids, _ = padded_batch(vocab, length)
  forward = nnx.jit(lambda m, x: m(x))
  base = np.asarray(forward(model, ids))
  config = smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8.0, target_modules=targets)
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(0), verbose=False, show_progress=False)
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    b = layer.lora_b[...]
    layer.lora_b[...] = 0.3 * np.random.default_rng(i).standard_normal(b.shape).astype(b.dtype)
  adapted = np.asarray(forward(model, ids))
  assert np.abs(adapted - base).max() > 1e-2  # the adapters change the function
  smoa_jax.to_hf(smoa_jax.merge_and_unload(model), out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = reloaded(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, adapted, atol=1e-4, rtol=0)
  return reloaded


def save_random(model_cls: type, config: transformers.PretrainedConfig, directory: Path,
                seed: int = 0) -> Path:
  """``model_cls(config)`` initialized from ``seed``, perturbed (:func:`randomize`), saved."""
  torch.manual_seed(seed)
  randomize(model_cls(config), seed).save_pretrained(directory)
  return directory


def word_tokenizer(vocabulary: Iterable[str],
                   directory: Path) -> transformers.PreTrainedTokenizerFast:
  """A whitespace word tokenizer over a fixed vocabulary, saved to ``directory``.

  Ids: the :data:`SPECIAL_TOKENS`, then the sorted words; other words are ``<unk>``. Every encoding
  starts with ``<s>``.
  """
  words = sorted(set(vocabulary) - set(SPECIAL_TOKENS))
  vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", vocab["<s>"])])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                              unk_token="<unk>", bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(directory)
  return fast


def word_llama(directory: Path, vocabulary: Iterable[str]) -> Path:
  """A two-layer Llama (GQA, hidden 64, MLP 96) with a word tokenizer for ``vocabulary``."""
  tokenizer = word_tokenizer(vocabulary, directory)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


def word_bert(directory: Path, vocabulary: Iterable[str]) -> Path:
  """A two-layer BERT encoder (hidden 32, MLP 37) with a word tokenizer for ``vocabulary``."""
  tokenizer = word_tokenizer(vocabulary, directory)
  config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37,
                                   max_position_embeddings=64, pad_token_id=0)
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(directory)
  return directory


# Tiny random causal LMs of every family that generates (odd sizes, GQA, biases, tied and untied
# embeddings, sliding windows, soft-capping), without BOS/EOS so that generation never stops early.
CAUSAL_VOCAB = 97
_LLAMA_LIKE = dict(vocab_size=CAUSAL_VOCAB, hidden_size=48, intermediate_size=72,
                   num_hidden_layers=2, max_position_embeddings=64, bos_token_id=None,
                   eos_token_id=None, pad_token_id=0)


def causal_families() -> dict[str, tuple[type, type, dict]]:
  """``family -> (transformers config class, model class, config fields)`` of the tiny causal
  models."""
  t = transformers
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
      "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, dict(
          _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          sliding_window=4, query_pre_attn_scalar=20, final_logit_softcapping=3.0,
          attn_logit_softcapping=2.0)),
      "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, dict(
          _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=1, head_dim=12,
          sliding_window=4, query_pre_attn_scalar=12, tie_word_embeddings=False,
          layer_types=["sliding_attention", "full_attention"], rope_parameters={
              "full_attention": dict(rope_type="default", rope_theta=1000.0),
              "sliding_attention": dict(rope_type="default", rope_theta=10.0)})),
      "phi3": (t.Phi3Config, t.Phi3ForCausalLM, dict(
          _LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, sliding_window=4)),
      "gpt2": (t.GPT2Config, t.GPT2LMHeadModel, dict(
          vocab_size=CAUSAL_VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
          bos_token_id=None, eos_token_id=None)),
  }


def family_params(default: Iterable[str]) -> list:
  """Every causal family as a pytest param; those outside ``default`` are marked slow, so the
  default run covers a few families and ``-m slow`` the rest."""
  default = set(default)
  assert default <= set(causal_families()), default
  return [pytest.param(name, marks=() if name in default else pytest.mark.slow)
          for name in sorted(causal_families())]


def tiny_causal_lm(name: str, directory: Path, seed: int = 0) -> torch.nn.Module:
  """A randomized tiny model of family ``name`` saved to ``directory``; returns the torch model."""
  config_cls, model_cls, fields = causal_families()[name]
  torch.manual_seed(seed)
  hf = randomize(model_cls(config_cls(**fields)), seed)
  hf.save_pretrained(directory)
  return hf


# A ChatML-like template over the word tokenizer's own tokens: every rendered word is in (or maps to
# ``<unk>`` of) the vocabulary, so the model can read any rendered conversation.
WORD_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> "
                      "{% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}")
ROLE_WORDS = ("system", "user", "assistant")


def chat_word_llama(directory: Path, vocabulary: Iterable[str]) -> Path:
  """:func:`word_llama` (128 positions, ``</s>`` id 3 = EOS) whose tokenizer has
  :data:`WORD_CHAT_TEMPLATE`; saved to ``directory``, which is returned."""
  word_llama(directory, [*vocabulary, *ROLE_WORDS])
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  tokenizer.chat_template = WORD_CHAT_TEMPLATE
  tokenizer.save_pretrained(directory)
  return directory


def adapter_base_lm(family: str, vocab: int = 61, **overrides) -> transformers.PreTrainedModel:
  """A three-layer random Llama (``nn.Linear``, biased attention, untied head) or GPT-2
  (``Conv1D``), perturbed by :func:`randomize`; eval mode, not saved. ``overrides`` change config
  fields. The base of the adapter round-trip tests (PEFT, named adapters)."""
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
