"""Adapters on stacked (scanned) layers: one adapter layer per stacked projection.

A model built with ``scan_layers=True`` (``smoa_jax.from_hf(path, scan_layers=True)``) holds each
projection of its L layers as ONE ``nnx.Linear`` whose kernel is ``(L, in, out)`` and runs the
layers under ``nnx.scan``. :func:`adapt_stacked` turns such a Linear into an adapter layer of the
config's class, built under ``nnx.vmap`` over the layer axis:

* ``kernel`` / ``bias`` are the same Variables (no copy, metadata kept);
* SMoA factors are ``lora_a (L, K, max|C_k|, max r)``, ``lora_b (L, K, max r, max|R_k|)`` (LoRA:
  ``(L, in, r)``, ``(L, r, out)``), each layer initialized from its own rng split;
* ``in_perm (L, in)``, ``out_perm (L, out)``: every layer has its own spectral blocks. The block
  sizes depend only on ``(in, out, K)``, so all layers share one static op and the stacked layer
  runs inside ``nnx.scan`` exactly like the unrolled one.

Outside the scan, :class:`~smoa_jax.AdaptedDense` methods (``delta_weight``, ``merge``,
``folded_kernel``, ...) map over the layer axis and return stacked ``(L, in, out)`` results.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from smoa_jax.core.config import AdapterConfig
from smoa_jax.layers.dense import (DEFAULT_ADAPTER, AdaptedDense, adapter_class, factor_specs,
                                   shard_like_kernel)
from smoa_jax.core.spectral import SpectralBlocks, spectral_blocks_batched

__all__ = ["stack_blocks", "adapt_stacked"]


def stack_blocks(blocks: Sequence[SpectralBlocks]) -> SpectralBlocks:
  """Per-layer blocks of one shape -> one :class:`SpectralBlocks` with ``(L, in)`` / ``(L, out)`` perms."""
  return SpectralBlocks(jnp.stack([b.in_perm for b in blocks]),
                        jnp.stack([b.out_perm for b in blocks]), blocks[0].in_sizes,
                        blocks[0].out_sizes)


def adapt_stacked(linear: nnx.Module, config: AdapterConfig, *, rngs: nnx.Rngs,
                  blocks: SpectralBlocks | None = None,
                  name: str = DEFAULT_ADAPTER) -> AdaptedDense:
  """The adapter layer for a stacked Linear (``kernel (L, in, out)``); see the module docstring.

  ``blocks`` (SMoA): stacked per-layer blocks (:func:`stack_blocks`); computed here when None.
  ``name`` names the adapter (see :mod:`smoa_jax.layers.dense`).
  """
  num_layers = linear.kernel.shape[0]
  cls = adapter_class(config)
  if blocks is None and config.spectral_order:
    blocks = stack_blocks(spectral_blocks_batched(linear.kernel[...], config.num_blocks,
                                                  method=config.spectral_method))

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0, 0, 0), out_axes=0, axis_size=num_layers)
  def build(layer: nnx.Module, layer_blocks: SpectralBlocks | None,
            layer_rngs: nnx.Rngs) -> AdaptedDense:
    return cls.from_linear(layer, config, rngs=layer_rngs, blocks=layer_blocks, name=name)

  new = build(linear, blocks, rngs)
  # Inside vmap the kernel is a per-layer tracer; shard the stacked arrays like the kernel now.
  kernel_spec = new.kernel.get_metadata("out_sharding", None)
  if kernel_spec is not None:
    a_spec, b_spec = factor_specs(kernel_spec, len(new.lora_a.shape))
    arrays = [(new.lora_a, a_spec), (new.lora_b, b_spec)]
    if config.spectral_order:
      arrays += [(new.in_perm, (None, None)), (new.out_perm, (None, None))]
    for var, spec in arrays:
      value, metadata = shard_like_kernel(new.kernel, var[...], spec)
      var.set_value(value)
      for key, item in metadata.items():
        var.set_metadata(key, item)
  return new
