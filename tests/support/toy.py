"""Tiny NNX models with Hugging Face-like module names, for fast tests of injection and training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import smoa_jax


class Attention(nnx.Module):
  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.q_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.k_proj = nnx.Linear(dim, dim // 2, rngs=rngs)
    self.v_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.o_proj = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, h, mask):
    # A causal, single-head attention: enough structure for gradients to flow everywhere.
    q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
    k = jnp.concatenate([k, k], axis=-1)
    scores = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(q.shape[-1])
    t = h.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (mask[:, None, :] > 0)
    scores = jnp.where(allowed, scores, -1e9)
    return self.o_proj(jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1), v))


class Block(nnx.Module):
  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.self_attn = Attention(dim, rngs)
    self.mlp = nnx.Dict(up_proj=nnx.Linear(dim, 2 * dim + 1, rngs=rngs),
                        down_proj=nnx.Linear(2 * dim + 1, dim, rngs=rngs))

  def __call__(self, h, mask):
    h = h + self.self_attn(h, mask)
    return h + self.mlp["down_proj"](jax.nn.gelu(self.mlp["up_proj"](h)))


class ToyLM(nnx.Module):
  """``model(input_ids (B, T), attention_mask) -> logits (B, T, vocab)``."""

  def __init__(self, vocab: int = 31, dim: int = 16, layers: int = 2, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.embed_tokens = nnx.Embed(vocab, dim, rngs=rngs)
    self.layers = nnx.List([Block(dim, rngs) for _ in range(layers)])
    self.lm_head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None):
    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    h = self.embed_tokens(input_ids)
    for layer in self.layers:
      h = layer(h, mask)
    return self.lm_head(h)


class ToyClassifier(nnx.Module):
  """``model(input_ids, attention_mask) -> logits (B, num_labels)`` over mean-pooled states."""

  def __init__(self, vocab: int = 31, dim: int = 16, num_labels: int = 3, *, seed: int = 0):
    self.body = ToyLM(vocab, dim, 1, seed=seed)
    self.classifier = nnx.Linear(dim, num_labels, rngs=nnx.Rngs(seed + 100))

  def __call__(self, input_ids, attention_mask=None):
    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    h = self.body.embed_tokens(input_ids)
    for layer in self.body.layers:
      h = layer(h, mask)
    pooled = (h * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
    return self.classifier(pooled)


def token_data(n: int = 32, seq_len: int = 12, vocab: int = 31, seed: int = 0) -> dict:
  """Learnable synthetic sequences (an arithmetic progression mod vocab) with ragged padding."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, vocab, n)
  step = rng.integers(1, 4, n)
  ids = (start[:, None] + step[:, None] * np.arange(seq_len)[None]) % vocab
  lengths = rng.integers(seq_len // 2, seq_len + 1, n)
  mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": (ids * mask).astype(np.int32), "attention_mask": mask}


def lm_run(output_dir, *, steps: int = 6, dropout: float = 0.1, resume: bool = False,
           on_save=None, **train_kwargs):
  """A small, fully seeded SMoA training run of ToyLM (used in-process and by
  tests/support/kill_run.py)."""
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0, dropout=dropout,
                                                    target_modules=["q_proj", "v_proj", "up_proj"]),
                         rngs=nnx.Rngs(params=1, dropout=2), verbose=False)
  config = smoa_jax.TrainConfig(**{"steps": steps, "batch_size": 8, "learning_rate": 3e-2,
                                   "warmup_steps": 2, "save_every": 2, "log_every": 1, "seed": 3,
                                   "progress": False, **train_kwargs})
  result = smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(40), config,
                          output_dir=output_dir, resume=resume, on_save=on_save)
  return model, result


TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
# K = 3 with uneven branch ranks and a rank-0 (frozen) block: every layout rule of the adapters.
SMOA = smoa_jax.SMoAConfig(6, 3, 8.0, branch_ranks=(3, 3, 0), dropout=0.05, target_modules=TARGETS)


def trained(config=None, seed: int = 0) -> ToyLM:
  """ToyLM(seed) with ``config``'s adapters (default :data:`SMOA`) whose ``b`` factors hold random
  values, as after training; in eval mode."""
  model = ToyLM(seed=seed)
  smoa_jax.apply_adapter(model, config or SMOA, rngs=nnx.Rngs(1), verbose=False)
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    # Padding entries of b carry no information (they meet masked ranks or zero anchors).
    layer.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
  model.eval()
  return model
