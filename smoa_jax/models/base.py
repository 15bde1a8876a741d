"""The base of every model family: :class:`HFModel` (config, key map, sharding rules) and the
:class:`LayerFactory` that builds HF-initialized layers. What a family reads from its config, and
the checks of it, are in :mod:`smoa_jax.models.config_schema`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from smoa_jax.models.blocks import UnitOffsetRMSNorm, softcap
from smoa_jax.models.cache import KVCache
from smoa_jax.models.keymap import KeyMap

__all__ = ["ShardingRule", "compute_dtype", "HFModel", "CausalLM", "LayerFactory"]

# (regex over a Variable path, mesh axis or None per array axis); see smoa_jax.parallel.spmd.
ShardingRule = tuple[str, tuple[str | None, ...]]

def compute_dtype(layer: nnx.Module) -> Dtype:
  """The dtype a Flax layer computes in: its ``dtype``, else that of its parameters."""
  if getattr(layer, "dtype", None) is not None:
    return layer.dtype
  return layer.param_dtype


class HFModel(nnx.Module):
  """Base of every model family: keeps the HF config and knows its key map.

  Subclasses set ``architecture`` (the HF class name written to ``config.json``) and
  ``sharding_rules`` (Megatron-style partitioning, :mod:`smoa_jax.parallel.spmd`) and implement
  :meth:`key_map`. ``scan_layers`` is True when the layers are stacked (:func:`stack_layers`).
  ``hf_config`` is a copy of the Hugging Face config dict (stored as JSON so the module stays
  hashable under ``nnx.jit``); ``fresh_params`` the parameter paths the checkpoint lacked (freshly
  initialized, e.g. a new head); ``source_dir`` is the directory the weights came from (set by
  :func:`smoa_jax.from_hf`) so an export can copy its tokenizer files.

  Causal LMs derive from :class:`CausalLM`, which adds the LM head and the KV cache.
  """

  architecture: ClassVar[str] = ""
  sharding_rules: ClassVar[tuple[ShardingRule, ...]] = ()
  scan_layers: bool = False

  def _set_hf_config(self, hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Store the config (a dict or a ``transformers`` config object); returns it as a dict."""
    if hasattr(hf_config, "to_dict"):
      hf_config = hf_config.to_dict()
    config = json.loads(json.dumps(dict(hf_config), default=str))
    config["architectures"] = [self.architecture]
    self._hf_config_json = json.dumps(config, sort_keys=True)
    self.source_dir: str | None = None
    self.fresh_params: tuple[str, ...] = ()
    return config

  @property
  def hf_config(self) -> dict[str, Any]:
    """A fresh copy of the Hugging Face config dict (editing it does not change the model)."""
    return json.loads(self._hf_config_json)

  @property
  def context_length(self) -> int | None:
    """Positions the model knows (``max_position_embeddings`` / ``n_positions``), None if unset."""
    config = json.loads(self._hf_config_json)
    return config.get("max_position_embeddings") or config.get("n_positions")

  def key_map(self) -> KeyMap:
    raise NotImplementedError


class CausalLM(HFModel):
  """Base of the decoder-only families: a decoder under an LM head, with a KV cache to generate.

  A family builds its decoder (hidden states ``(B, T, hidden)`` from ids) and sets ``lm_head`` (an
  ``nnx.Linear`` with ``kernel (hidden, vocab)``, or None when the head is tied to the input
  embedding); it names both in ``decoder_parts() -> (decoder, embedding)`` and says the cache layout
    logits = softcap(self.logits(hidden, embedding), self.logit_softcap)
  """

  lm_head: nnx.Linear | None = None
  logit_softcap: float | None = None  # final logits soft-capped (Gemma 2): cap * tanh(z / cap)

  def decoder_parts(self) -> tuple[nnx.Module, nnx.Embed]:
    """The decoder and its input embedding (which a tied head reads)."""
    raise NotImplementedError

  def cache_layout(self) -> tuple[int, int, int]:
    raise NotImplementedError

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               logits_to_keep: int | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """``input_ids (B, T)`` int, ``attention_mask (B, T)`` 1 = token / 0 = padding, optional
    ``position_ids (B | 1, T)`` (default ``0..T-1``) -> logits ``(B, T, vocab)`` float32.

    Packed sequences (:func:`smoa_jax.data.pack`) pass ``segment_ids (B, T)`` (1, 2, ... per
    example, 0 for padding: no attention across examples) and ``position_ids`` restarting at 0
    for each example; each example's logits then equal those of the example alone.
    ``cache`` (from :meth:`init_cache`): the tokens are appended to it and ``(logits, cache)`` is
    returned. ``logits_to_keep=n``: logits of the last n positions only ``(B, n, vocab)``.
    """
    decoder, embedding = self.decoder_parts()
    body = decoder(input_ids, attention_mask, position_ids, segment_ids=segment_ids, cache=cache)
    hidden, cache = body if cache is not None else (body, None)
    if logits_to_keep is not None:
      hidden = hidden[:, -logits_to_keep:]
    logits = softcap(self.logits(hidden, embedding), self.logit_softcap)
    return logits if cache is None else (logits, cache)

  def logits(self, hidden: jax.Array, embedding: nnx.Embed) -> jax.Array:
    """The LM head on ``hidden (B, T, hidden)`` -> ``(B, T, vocab)`` float32.

    The head multiplies in its compute dtype and accumulates and returns float32
    (``preferred_element_type``): bfloat16 logits (8 bits of mantissa) would be off by about
    0.03-0.1 at the usual magnitudes of 4-30, which the softmax and the loss would inherit. A
    tied head reads ``embedding (vocab, hidden)``; a head holding an adapter computes as its
    layer does and is cast.
    """
    head = self.lm_head
    if head is None:
      table = embedding.embedding[...]
      dtype = compute_dtype(embedding)
      return jnp.einsum("...h,vh->...v", hidden.astype(dtype), table.astype(dtype),
                        preferred_element_type=jnp.float32)
    if type(head) is not nnx.Linear:
      return head(hidden).astype(jnp.float32)
    dtype = compute_dtype(head)
    logits = jnp.matmul(hidden.astype(dtype), head.kernel[...].astype(dtype),
                        preferred_element_type=jnp.float32)
    return logits if head.bias is None else logits + head.bias[...].astype(jnp.float32)

  def init_cache(self, batch: int, max_length: int, *, dtype: Dtype | None = None) -> KVCache:
    """An empty :class:`~smoa_jax.models.cache.KVCache` of ``max_length`` slots for ``batch``
    rows: keys/values ``(B * kv_heads, S, head_dim)`` per layer (:meth:`cache_layout`; one
    stacked ``(layers, ...)`` buffer when ``scan_layers``) in ``dtype`` (default: the compute
    dtype of the input embedding)."""
    layers, kv_heads, head_dim = self.cache_layout()
    return KVCache.create(layers, batch, max_length, kv_heads, head_dim,
                          dtype or compute_dtype(self.decoder_parts()[1]),
                          stacked=self.scan_layers)


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """Builds the ``nnx`` layers of one model with shared dtypes and HF-style initialization.

  ``dtype`` is the compute dtype (None: from the inputs and params), ``param_dtype`` the storage
  dtype; weights are ``normal(std)`` like Hugging Face's ``initializer_range``, biases zero and
  norm scales one.
  """

  dtype: Dtype | None
  param_dtype: Dtype
  std: float
  rngs: nnx.Rngs

  def linear(self, in_features: int, out_features: int, use_bias: bool) -> nnx.Linear:
    """``nnx.Linear`` with ``kernel (in, out)``."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, kernel_init=nnx.initializers.normal(self.std),
                      rngs=self.rngs)

  def embed(self, num_embeddings: int, features: int) -> nnx.Embed:
    """``nnx.Embed`` with ``embedding (num, features)``."""
    return nnx.Embed(num_embeddings, features, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nnx.initializers.normal(self.std), rngs=self.rngs)

  def rms_norm(self, features: int, eps: float,
               unit_offset: bool = False) -> nnx.RMSNorm | UnitOffsetRMSNorm:
    """``nnx.RMSNorm`` (``scale (features,)``); ``unit_offset``: Gemma's ``* (1 + scale)``."""
    norm = UnitOffsetRMSNorm if unit_offset else nnx.RMSNorm
    return norm(features, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                rngs=self.rngs)

  def layer_norm(self, features: int, eps: float) -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         use_fast_variance=False, rngs=self.rngs)
