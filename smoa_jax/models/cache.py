"""The key/value cache of the causal LMs: preallocated buffers, written in place.

A causal family plugs into generation (:mod:`smoa_jax.inference`) with two additions:

* ``model.init_cache(batch, max_length, *, dtype=None) -> KVCache`` -- zeros, allocated once;
* ``model(input_ids, attention_mask=..., position_ids=..., *, cache=cache) -> (logits, cache)``
  -- the ``T`` new tokens are written at slots ``cache.index .. cache.index + T - 1`` of every
  layer and attend to every valid slot up to their own (causal, sliding windows respected).

Layout::

    keys, values   unrolled models: a tuple of L arrays (B * K, S, D), one buffer per layer;
                   scan_layers=True: one stacked array (L, B * K, S, D)
                   L layers, B rows, K KV heads (row b's head k at b * K + k),
                   S = max_length slots, D head dim
    mask           (B, S) bool       slot holds a real token (False: padding or not yet written)
    index          () int32          next slot to write (= slots written so far, shared by rows)

Slots are not positions: a batch of prompts of different lengths is left-padded, so every row's
last prompt token sits in the same slot and new tokens of all rows go to one slot per step,
while each row's RoPE / learned positions come from ``position_ids`` (its own count of real
tokens). Keys at padded slots are masked out. A sliding window ``w`` lets the query in slot ``t``
see slots ``s`` with ``t - s < w``; within one row real tokens are contiguous, so slot distance
equals position distance (Hugging Face's rule on its own cache positions).

The buffers are threaded through the layers (a loop carry under ``nnx.scan``) and each layer
writes only its ``T`` new slots with ``dynamic_update_slice``, so under ``jit`` (and inside the
decode loop) the cache is updated in place, never copied per step.

Why this layout: a decode step is bound by reading the cache, so the attention's two dots
(:func:`smoa_jax.models.blocks.attention` with ``cached=True``) must read each layer's buffer
where it lies. XLA's CPU dots want one leading batch dimension and the slots next to the head
dim. With the former ``(L, B, S, K, D)`` buffer every layer's keys and values were sliced out
and transposed into temporaries at every step: on SmolLM2-135M (30 layers, 2 CPU cores) the step
at a context of 1,024 cost 1.55-2.2x the step at 64 where the bytes it must read predict 1.08x.
A ``(B, K, S, D)`` buffer still needs a reshape to ``(B * K, S, D)`` before the dots, and XLA
fuses the in-place write into that reshape as well -- two writes to one buffer, so it copies the
buffer twice per layer and step; hence the flat ``B * K`` axis. (With ``B * K == 1`` the dots
drop the axis and the copy may come back.) A scanned model indexes its layer with a traced
index, so it keeps one stacked buffer (and XLA's copy of the layer's slice).
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

  keys: jax.Array | tuple[jax.Array, ...]
  values: jax.Array | tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype: Dtype, *, stacked: bool = False) -> "KVCache":
    """An empty cache: zero keys/values (``L`` buffers ``(B * K, S, D)``, or one ``(L, B * K,
    S, D)`` if ``stacked``), no valid slot, index 0."""
    shape = (batch * num_kv_heads, max_length, head_dim)
    if stacked:
      keys, values = (jnp.zeros((num_layers,) + shape, dtype) for _ in range(2))
    else:
      keys, values = (tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
                      for _ in range(2))
    return cls(keys, values, jnp.zeros((batch, max_length), bool), jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    """S, the number of slots."""
    return self.mask.shape[1]

  @property
  def dtype(self) -> Dtype:
    """The dtype keys and values are stored in."""
    return jax.tree.leaves(self.keys)[0].dtype

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
  under jit); ``layer`` is an int for per-layer buffers, and may be traced (the layer index inside
  ``nnx.scan``) for a stacked one."""
  batch, length, kv_heads, dim = keys.shape
  slot = cache.index - length

  def write(buffers, new):
    new = jnp.swapaxes(new, 1, 2).reshape(batch * kv_heads, length, dim).astype(cache.dtype)
    if isinstance(buffers, tuple):
      updated = jax.lax.dynamic_update_slice(buffers[layer], new, (0, slot, 0))
      return buffers[:layer] + (updated,) + buffers[layer + 1:]
    return jax.lax.dynamic_update_slice(buffers, new[None], (layer, 0, slot, 0))

  return dataclasses.replace(cache, keys=write(cache.keys, keys),
                             values=write(cache.values, values))


def read_layer(cache: KVCache, layer: jax.Array | int, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
  """One layer's keys and values ``(B * K, S, D)``, cast to the compute ``dtype`` (attention
  takes them with ``cached=True``, :func:`smoa_jax.models.blocks.attention`)."""
  def read(buffers):
    if isinstance(buffers, tuple):
      return buffers[layer].astype(dtype)
    return jax.lax.dynamic_index_in_dim(buffers, layer, keepdims=False).astype(dtype)

  return read(cache.keys), read(cache.values)
