"""The key/value cache of the causal LMs: one preallocated buffer, written in place.

A causal family plugs into generation (:mod:`smoa_jax.inference`) with two additions:

* ``model.init_cache(batch, max_length, *, dtype=None) -> KVCache`` -- zeros, allocated once;
* ``model(input_ids, attention_mask=..., position_ids=..., *, cache=cache) -> (logits, cache)``
  -- the ``T`` new tokens are written at slots ``cache.index .. cache.index + T - 1`` of every
  layer and attend to every valid slot up to their own (causal, sliding windows respected).

Layout (the same for unrolled and ``scan_layers=True`` models)::

    keys, values   (L, B, S, K, D)   L layers, B rows, S = max_length slots, K KV heads, D head dim
    mask           (B, S) bool       slot holds a real token (False: padding or not yet written)
    index          () int32          next slot to write (= slots written so far, shared by rows)

Slots are not positions: a batch of prompts of different lengths is left-padded, so every row's
last prompt token sits in the same slot and new tokens of all rows go to one slot per step,
while each row's RoPE / learned positions come from ``position_ids`` (its own count of real
tokens). Keys at padded slots are masked out. A sliding window ``w`` lets the query in slot ``t``
see slots ``s`` with ``t - s < w``; within one row real tokens are contiguous, so slot distance
equals position distance (Hugging Face's rule on its own cache positions).

The stacked ``(L, ...)`` buffers are threaded through the layers (a loop carry under
``nnx.scan``) and each layer writes only its ``T`` new slots with ``dynamic_update_slice``, so
under ``jit`` (and inside the decode loop) the cache is updated in place, never copied per step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax.typing import Dtype

__all__ = ["KVCache", "cache_attention_mask", "write_layer", "read_layer"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer; see the module docstring for the layout.

  A pytree (``jit`` arguments, ``lax.while_loop`` carries); ``dataclasses.replace`` makes the
  updated copy a forward pass returns.
  """

  keys: jax.Array
  values: jax.Array
  mask: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype: Dtype) -> "KVCache":
    """An empty cache: zero keys/values ``(L, B, S, K, D)``, no valid slot, index 0."""
    shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, max_length), bool), jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    """S, the number of slots."""
    return self.keys.shape[2]

  def advance(self, attention_mask: jax.Array | None, length: int) -> "KVCache":
    """The cache with ``length`` new slots marked valid per ``attention_mask (B, T)`` (default
    all) and ``index`` moved past them; keys and values are written by the layers."""
    batch = self.mask.shape[0]
    new = (jnp.ones((batch, length), bool) if attention_mask is None
           else jnp.broadcast_to(jnp.asarray(attention_mask).astype(bool), (batch, length)))
    mask = jax.lax.dynamic_update_slice(self.mask, new, (0, self.index))
    return dataclasses.replace(self, mask=mask, index=self.index + length)


def cache_attention_mask(cache: KVCache, length: int, sliding_window: int | None) -> jax.Array:
  """Boolean ``(B, 1, T, S)``: query ``j`` (slot ``t = index + j``) may attend slot ``s``.

  ``cache`` is the cache AFTER :meth:`KVCache.advance` (its ``index`` past the ``T`` new slots).
  True where ``s <= t``, slot ``s`` is valid and, with a window ``w``, ``t - s < w``.
  """
  t = cache.index - length + jnp.arange(length)[:, None]
  s = jnp.arange(cache.max_length)[None, :]
  visible = s <= t
  if sliding_window is not None:
    visible = visible & (t - s < sliding_window)
  return visible[None, None] & cache.mask[:, None, None, :]


def write_layer(cache: KVCache, layer: jax.Array | int, keys: jax.Array,
                values: jax.Array) -> KVCache:
  """Write one layer's new ``keys``/``values (B, T, K, D)`` at slots ``index - T ..`` (in place
  under jit); ``layer`` may be traced (the layer index inside ``nnx.scan``)."""
  start = (layer, 0, cache.index - keys.shape[1], 0, 0)
  dtype = cache.keys.dtype
  return dataclasses.replace(
      cache,
      keys=jax.lax.dynamic_update_slice(cache.keys, keys[None].astype(dtype), start),
      values=jax.lax.dynamic_update_slice(cache.values, values[None].astype(dtype), start))


def read_layer(cache: KVCache, layer: jax.Array | int, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
  """One layer's keys and values ``(B, S, K, D)``, cast to the compute ``dtype``."""
  keys = jax.lax.dynamic_index_in_dim(cache.keys, layer, keepdims=False)
  values = jax.lax.dynamic_index_in_dim(cache.values, layer, keepdims=False)
  return keys.astype(dtype), values.astype(dtype)
