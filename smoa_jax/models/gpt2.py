"""GPT-2 causal LM as NNX modules with HF names.

GPT-2 stores its projections as ``Conv1D`` whose ``weight`` is already ``(in, out)``, so its
kernels load without a transpose. The fused ``c_attn`` projects to ``[q | k | v]``
``(hidden, 3 * hidden)``. Module paths::

    transformer/wte, transformer/wpe        embedding (vocab | positions, hidden)
    transformer/h/0/ln_1, .../ln_2          LayerNorm scale, bias (hidden)
    transformer/h/0/attn/c_attn             kernel (hidden, 3*hidden)
    transformer/h/0/attn/c_proj             kernel (hidden, hidden)
    transformer/h/0/mlp/c_fc                kernel (hidden, inner)
    transformer/h/0/mlp/c_proj              kernel (inner, hidden)
    transformer/ln_f, lm_head               lm_head absent when tied (the GPT-2 default)

Generation uses a KV cache (:mod:`smoa_jax.models.cache`): ``model.init_cache(batch,
max_length)`` and ``model(ids, mask, positions, cache=cache) -> (logits, cache)``; every row's
learned positions come from its ``position_ids``, so left-padded prompts are embedded right.

``scan_layers=True`` stacks the blocks (``transformer/h/attn/c_attn`` kernel ``(L, hidden,
3*hidden)``) under ``nnx.scan``; ``sharding_rules`` give the Megatron layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from smoa_jax.errors import ConfigError
from smoa_jax.models import config_schema
from smoa_jax.models.base import CausalLM, LayerFactory, ShardingRule
from smoa_jax.models.blocks import (LayerStack, activation, attention, make_attention_mask,
                                    scan_layers, stack_layers)
from smoa_jax.models.cache import (KVCache, cache_attention_mask, read_layer,
                                   write_layer)
from smoa_jax.models.keymap import KeyMap, KeyRule, linear_rules, norm_rules
from smoa_jax.parallel.sharding import constrain_batch

__all__ = ["GPT2LMHeadModel"]


class GPT2Attention(nnx.Module):
  """Causal self-attention with the fused ``c_attn`` and output ``c_proj``."""

  def __init__(self, hidden: int, heads: int, scale: float, f: LayerFactory):
    self.c_attn = f.linear(hidden, 3 * hidden, True)
    self.c_proj = f.linear(hidden, hidden, True)
    self.num_heads, self.head_dim, self.scale = heads, hidden // heads, scale

  def __call__(self, x: jax.Array, mask: jax.Array | None, cache: KVCache | None = None,
               layer: jax.Array | int = 0) -> jax.Array | tuple[jax.Array, KVCache]:
    """``x (B, T, hidden)``, ``mask (B | 1, 1, T, T)`` -> ``(B, T, hidden)``; with ``cache``
    (advanced past the T new slots, mask ``(B, 1, T, S)``) ``(out, cache)``."""
    batch, length, hidden = x.shape
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    shape = (batch, length, self.num_heads, self.head_dim)
    q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
    if cache is not None:
      cache = write_layer(cache, layer, k, v)
      k, v = read_layer(cache, layer, q.dtype)
    out = attention(q, k, v, mask, self.scale, cached=cache is not None)
    out = self.c_proj(out.reshape(batch, length, hidden))
    return out if cache is None else (out, cache)


class GPT2MLP(nnx.Module):
  """``c_proj(act(c_fc(x)))``."""

  def __init__(self, hidden: int, inner: int, act: str, f: LayerFactory):
    self.c_fc = f.linear(hidden, inner, True)
    self.c_proj = f.linear(inner, hidden, True)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(activation(self.act)(self.c_fc(x)))


class GPT2Block(nnx.Module):
  """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

  def __init__(self, config: Mapping[str, Any], layer_idx: int, f: LayerFactory):
    hidden, heads = config["n_embd"], config["n_head"]
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    scale = (hidden // heads) ** -0.5 if config.get("scale_attn_weights", True) else 1.0
    if config.get("scale_attn_by_inverse_layer_idx", False):
      scale /= layer_idx + 1
    self.ln_1 = f.layer_norm(hidden, eps)
    self.attn = GPT2Attention(hidden, heads, scale, f)
    self.ln_2 = f.layer_norm(hidden, eps)
    self.mlp = GPT2MLP(hidden, config.get("n_inner") or 4 * hidden,
                       config.get("activation_function", "gelu_new"), f)

  def __call__(self, x: jax.Array, mask: jax.Array | None, cache: KVCache | None = None,
               layer: jax.Array | int = 0) -> jax.Array | tuple[jax.Array, KVCache]:
    """``x`` or, with a ``cache``, ``(x, cache)`` (see :class:`GPT2Attention`)."""
    if cache is None:
      x = x + self.attn(self.ln_1(x), mask)
      return x + self.mlp(self.ln_2(x))
    attended, cache = self.attn(self.ln_1(x), mask, cache, layer)
    x = x + attended
    return x + self.mlp(self.ln_2(x)), cache


class GPT2Model(LayerStack):
  """``wte`` + ``wpe`` embeddings, the ``h`` blocks and ``ln_f``.

  ``h`` is an ``nnx.List``, or with ``scan_layers`` one block with stacked ``(n_layer, ...)``
  Variables run under ``nnx.scan``.
  """

  def __init__(self, config: Mapping[str, Any], f: LayerFactory, scan_layers: bool = False):
    hidden = config["n_embd"]
    self.wte = f.embed(config["vocab_size"], hidden)
    self.wpe = f.embed(config["n_positions"], hidden)
    if scan_layers:
      self.h = stack_layers(lambda rngs: GPT2Block(config, 0, dataclasses.replace(f, rngs=rngs)),
                            config["n_layer"], f.rngs)
    else:
      self.h = nnx.List([GPT2Block(config, i, f) for i in range(config["n_layer"])])
    self.ln_f = f.layer_norm(hidden, float(config.get("layer_norm_epsilon", 1e-5)))
    self.scan_layers = scan_layers
    self.num_layers = config["n_layer"]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None,
               cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """``input_ids (B, T)`` -> hidden states ``(B, T, hidden)`` after ``ln_f``; packed examples
    with ``segment_ids (B, T)`` (training only); with ``cache`` ``(hidden, cache)`` and
    ``position_ids`` defaulting to ``cache.index + 0..T-1``."""
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache; "
                       "generate from unpacked prompts.")
    length = input_ids.shape[1]
    if position_ids is None:
      position_ids = jnp.arange(length)[None] + (0 if cache is None else cache.index)
    x = constrain_batch(self.wte(input_ids) + self.wpe(position_ids))
    if cache is None:
      mask = make_attention_mask(attention_mask, length, causal=True, segment_ids=segment_ids)
    else:
      cache = cache.advance(attention_mask, length)
      mask = cache_attention_mask(cache, length, None)

    def block(layer, h, c, index):
      if c is None:
        return constrain_batch(layer(h, mask)), None
      h, c = layer(h, mask, c, index)
      return constrain_batch(h), c

    if self.scan_layers:  # a cache rides in the carry, each block writes its slice in place
      scanned = self.layer_call(block)
      x, cache = scan_layers(lambda layer, carry, index: scanned(layer, *carry, index), self.h,
                             (x, cache), jnp.arange(self.num_layers))
    else:
      for index, layer in enumerate(self.h):
        # The index stays a Python int outside the remat: it picks the layer's cache buffer.
        x, cache = self.layer_call(functools.partial(block, index=index))(layer, x, cache)
    return self.ln_f(x) if cache is None else (self.ln_f(x), cache)


class GPT2LMHeadModel(CausalLM):
  """GPT-2 causal LM: ``model(input_ids, attention_mask=None) -> logits (B, T, vocab)``.

  Generation: ``cache = model.init_cache(B, S)``, then ``model(ids, mask, positions,
  cache=cache) -> (logits, cache)`` (:mod:`smoa_jax.models.cache`).

  Args:
    hf_config: the Hugging Face config (dict or ``transformers.GPT2Config``).
    dtype, param_dtype: compute and storage dtypes (storage float32 by default).
    rngs: initializes the weights (``normal(initializer_range)``).
    scan_layers: stack the blocks under ``nnx.scan`` (paths ``transformer/h/attn/...``, ``(L, ...)``).
  """

  architecture: ClassVar[str] = "GPT2LMHeadModel"
  # Megatron: c_attn / c_fc column-parallel, both c_proj row-parallel, vocab over tp.
  sharding_rules: ClassVar[tuple[ShardingRule, ...]] = (
      (r"transformer/wte/embedding", ("tp", "fsdp")),
      (r"transformer/wpe/embedding", (None, "fsdp")),
      (r"transformer/h/(\d+/)?(attn/c_attn|mlp/c_fc)/kernel", ("fsdp", "tp")),
      (r"transformer/h/(\d+/)?(attn/c_attn|mlp/c_fc)/bias", ("tp",)),
      (r"transformer/h/(\d+/)?(attn|mlp)/c_proj/kernel", ("tp", "fsdp")),
      (r"lm_head/kernel", ("fsdp", "tp")),
  )

  def __init__(self, hf_config: Mapping[str, Any], *, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs, scan_layers: bool = False):
    # Every field the blocks read, checked (smoa_jax.models.config_schema), defaults filled in.
    config = config_schema.check(self._set_hf_config(hf_config), self.architecture)
    if scan_layers and config["scale_attn_by_inverse_layer_idx"]:
      raise ConfigError("scan_layers=True needs identical layers, but scale_attn_by_inverse_layer_idx "
                        "gives every layer its own attention scale; load with scan_layers=False.")
    f = LayerFactory(dtype, param_dtype, config["initializer_range"], rngs)
    self.transformer = GPT2Model(config, f, scan_layers)
    self.scan_layers = scan_layers
    self.lm_head = (None if config["tie_word_embeddings"]
                    else f.linear(config["n_embd"], config["vocab_size"], False))

  def decoder_parts(self) -> tuple[GPT2Model, nnx.Embed]:
    return self.transformer, self.transformer.wte

  def cache_layout(self) -> tuple[int, int, int]:
    """``(n_layer, n_head, n_embd / n_head)``."""
    config = self.hf_config
    return config["n_layer"], config["n_head"], config["n_embd"] // config["n_head"]

  def key_map(self) -> KeyMap:
    block, path = "transformer.h.{i}", "transformer/h/{i}"
    rules = (
        KeyRule("transformer.{e:wte|wpe}.weight", "transformer/{e}/embedding"),
        *norm_rules(f"{block}.{{n:ln_1|ln_2}}", f"{path}/{{n}}"),
        *linear_rules(f"{block}.attn.{{p:c_attn|c_proj}}", f"{path}/attn/{{p}}", transpose=False),
        *linear_rules(f"{block}.mlp.{{p:c_fc|c_proj}}", f"{path}/mlp/{{p}}", transpose=False),
        *norm_rules("transformer.ln_f", "transformer/ln_f"),
        KeyRule("lm_head.weight", "lm_head/kernel", transpose=True),
    )
    ignore = (f"{block}.attn.bias", f"{block}.attn.masked_bias")
    if self.lm_head is None:
      ignore += ("lm_head.weight",)
    return KeyMap(rules, ignore=ignore, prefix="transformer")
