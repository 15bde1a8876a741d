"""Llama-family causal LMs (Llama, Mistral, Qwen2, Qwen3, Phi-3) as NNX modules with HF names.

One decoder serves these families, and Gemma's (:mod:`smoa_jax.models.gemma`); they differ
only in :class:`DecoderSpec` fields read from the HF config: which projections carry biases
(Qwen2: q/k/v only), per-head q/k RMSNorm (Qwen3), sliding-window layers (Mistral, Phi-3, Qwen2/3
``layer_types``), fused projections (Phi-3), and Gemma's norms, scales and soft-capping.
Supported: grouped-query attention, ``head_dim != hidden/heads``, RoPE of type ``default``,
``linear`` and ``llama3`` (read from transformers 5.x ``rope_parameters`` or 4.x ``rope_theta`` +
``rope_scaling``), tied or untied embeddings, causal + padding masks, and a KV cache for
generation (:mod:`smoa_jax.models.cache`): ``model.init_cache(batch, max_length)`` and
``model(ids, ..., cache=cache) -> (logits, cache)``.

Module paths mirror the HF state dict, so ``target_modules`` means what it means in PEFT::

    model/embed_tokens                      embedding (vocab, hidden)
    model/layers/3/self_attn/q_proj         kernel (hidden, heads*head_dim)   [also k/v/o_proj]
    model/layers/3/self_attn/qkv_proj       kernel (hidden, (heads+2*kv_heads)*head_dim)  [Phi-3]
    model/layers/3/self_attn/q_norm         scale (head_dim)                  [Qwen3]
    model/layers/3/mlp/down_proj            kernel (intermediate, hidden)     [also gate/up_proj]
    model/layers/3/mlp/gate_up_proj         kernel (hidden, 2*intermediate)   [Phi-3]
    model/layers/3/input_layernorm          scale (hidden)
    model/norm, lm_head                     lm_head absent when embeddings are tied

With ``scan_layers=True`` the layers are one stacked module run under ``nnx.scan``: paths lose the
index and Params gain a leading layer axis (``model/layers/self_attn/q_proj`` kernel
``(L, hidden, heads*head_dim)``). ``sharding_rules`` give the Megatron layout (:mod:`smoa_jax.parallel.spmd`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
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

__all__ = [
    "DecoderSpec", "LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "rope_inv_freq", "apply_rope",
]

ROPE_TYPES = tuple(config_schema.ROPE_TYPES)


def rope_inv_freq(hf_config: Mapping[str, Any], head_dim: int) -> np.ndarray:
  """RoPE inverse frequencies ``(head_dim // 2,)`` float32, as transformers computes them.

  ``default``: ``theta ** (-2i / head_dim)``; ``linear``: divided by ``factor``; ``llama3``:
  wavelengths above ``original_max_position_embeddings / low_freq_factor`` divided by ``factor``,
  those below ``... / high_freq_factor`` kept, a smooth blend in between.
  """
  params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
  if rope_type == "default":
    return inv_freq
  if rope_type == "linear":
    return (inv_freq / np.float32(params["factor"])).astype(np.float32)
  if rope_type == "llama3":
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)
  raise ConfigError(f"rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES} "
                    "(rope_parameters.rope_type in config.json).")


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate ``x (B, T, N, D)`` by ``cos``/``sin (B | 1, T, D)`` (HF's rotate-half layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


def _rope_tables(position_ids: jax.Array, inv_freq: tuple[float, ...],
                 dtype: Dtype) -> tuple[jax.Array, jax.Array]:
  """``position_ids (B | 1, T)`` -> ``cos, sin (B | 1, T, D)`` computed in float32, cast to dtype."""
  freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """Static shape and feature flags of a Llama-family decoder, read from an HF config."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  hidden_act: str
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  qk_norm: bool
  tie_word_embeddings: bool
  sliding_windows: tuple[int | None, ...]  # per layer; None = full causal attention
  inv_freq: tuple[float, ...]
  initializer_range: float
  fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
  # Gemma: RMSNorm * (1 + scale); norms after attention and MLP as well (pre_/post_feedforward_
  # layernorm); embeddings times sqrt(hidden); attention scale query_pre_attn_scalar ** -0.5 (None:
  # head_dim ** -0.5); soft-capped attention scores and final logits; RoPE of the sliding layers.
  unit_offset_norms: bool = False
  sandwich_norms: bool = False
  embed_scale: float | None = None
  query_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  local_inv_freq: tuple[float, ...] | None = None  # None: the sliding layers use inv_freq

  def norm(self, f: LayerFactory, features: int) -> nnx.Module:
    """The family's RMSNorm over ``features``."""
    return f.rms_norm(features, self.rms_norm_eps, self.unit_offset_norms)


def _layer_windows(hf_config: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
  """Per-layer sliding windows from ``layer_types`` (Qwen2/3), or the HF default rule."""
  window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
  types = hf_config.get("layer_types") or [
      "sliding_attention" if window is not None and i >= hf_config.get("max_window_layers", 0)
      else "full_attention" for i in range(num_layers)]
  return tuple(hf_config.get("sliding_window") if t == "sliding_attention" else None for t in types)


class LlamaAttention(nnx.Module):
  """Self-attention with RoPE and grouped KV heads: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

  With ``fused_projections`` (Phi-3) one ``qkv_proj`` ``kernel (hidden, (heads + 2 * kv_heads) *
  head_dim)`` holds the three, its outputs in the order q, k, v (q/k/v_proj are then None).
  """

  def __init__(self, spec: DecoderSpec, f: LayerFactory):
    hidden, heads, kv_heads, head_dim = (spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                                         spec.head_dim)
    self.sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    fused = spec.fused_projections
    self.qkv_proj = f.linear(hidden, sum(self.sizes), spec.qkv_bias) if fused else None
    self.q_proj, self.k_proj, self.v_proj = (
        (None,) * 3 if fused else (f.linear(hidden, n, spec.qkv_bias) for n in self.sizes))
    self.o_proj = f.linear(heads * head_dim, hidden, spec.o_bias)
    self.q_norm = spec.norm(f, head_dim) if spec.qk_norm else None
    self.k_norm = spec.norm(f, head_dim) if spec.qk_norm else None
    self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
    self.scale = spec.query_scale or head_dim ** -0.5
    self.logit_cap = spec.attn_softcap

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
               cache: KVCache | None = None,
               layer: jax.Array | int = 0) -> jax.Array | tuple[jax.Array, KVCache]:
    """``x (B, T, hidden)``, rope tables ``(B | 1, T, head_dim)``, mask ``(B | 1, 1, T, T)``.

    With ``cache`` (advanced past the T new slots) the keys/values go to layer ``layer`` of it,
    the mask is ``(B, 1, T, S)`` over its slots, and ``(out, cache)`` is returned.
    """
    batch, length, _ = x.shape
    if self.qkv_proj is None:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    else:
      q, k, v = jnp.split(self.qkv_proj(x), np.cumsum(self.sizes[:2]), axis=-1)
    q = q.reshape(batch, length, self.num_heads, self.head_dim)
    k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
      cache = write_layer(cache, layer, k, v)
      k, v = read_layer(cache, layer, q.dtype)
    out = attention(q, k, v, mask, self.scale, self.logit_cap,
                    cached=cache is not None)
    out = self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))
    return out if cache is None else (out, cache)


class LlamaMLP(nnx.Module):
  """Gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

  With ``fused_projections`` (Phi-3) one ``gate_up_proj`` ``kernel (hidden, 2 * intermediate)``
  gives the gate (first half) and up (second half) outputs.
  """

  def __init__(self, spec: DecoderSpec, f: LayerFactory):
    hidden, inter, fused = spec.hidden_size, spec.intermediate_size, spec.fused_projections
    self.gate_up_proj = f.linear(hidden, 2 * inter, spec.mlp_bias) if fused else None
    self.gate_proj, self.up_proj = ((None, None) if fused else
                                    (f.linear(hidden, inter, spec.mlp_bias) for _ in range(2)))
    self.down_proj = f.linear(inter, hidden, spec.mlp_bias)
    self.hidden_act = spec.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x (..., hidden)`` -> ``(..., hidden)``."""
    if self.gate_up_proj is None:
      gate, up = self.gate_proj(x), self.up_proj(x)
    else:
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    return self.down_proj(activation(self.hidden_act)(gate) * up)


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

  Llama's ``post_attention_layernorm`` is the MLP's input norm. With ``sandwich_norms`` (Gemma)
  it normalizes the attention output instead, and ``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm`` wrap the MLP: ``x + post_attn(attn(input(x)))`` then
  ``x + post_ff(mlp(pre_ff(x)))``.
  """

  def __init__(self, spec: DecoderSpec, f: LayerFactory):
    self.self_attn = LlamaAttention(spec, f)
    self.mlp = LlamaMLP(spec, f)
    self.input_layernorm = spec.norm(f, spec.hidden_size)
    self.post_attention_layernorm = spec.norm(f, spec.hidden_size)
    sandwich = spec.sandwich_norms
    self.pre_feedforward_layernorm = spec.norm(f, spec.hidden_size) if sandwich else None
    self.post_feedforward_layernorm = spec.norm(f, spec.hidden_size) if sandwich else None

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
               cache: KVCache | None = None,
               layer: jax.Array | int = 0) -> jax.Array | tuple[jax.Array, KVCache]:
    """As :class:`LlamaAttention`: ``x`` or, with a ``cache``, ``(x, cache)``."""
    attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
    if cache is not None:
      attended, cache = attended
    if self.pre_feedforward_layernorm is None:
      x = x + attended
      x = x + self.mlp(self.post_attention_layernorm(x))
    else:
      x = x + self.post_attention_layernorm(attended)
      x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    return x if cache is None else (x, cache)


class LlamaModel(LayerStack):
  """The decoder stack: ``embed_tokens``, ``layers``, final ``norm``.

  ``layers`` is an ``nnx.List`` of decoder layers, or with ``scan_layers`` one decoder layer whose
  Variables are stacked ``(num_layers, ...)`` and run under ``nnx.scan`` (compiled once).
  """

  def __init__(self, spec: DecoderSpec, f: LayerFactory, scan_layers: bool = False):
    self.embed_tokens = f.embed(spec.vocab_size, spec.hidden_size)
    if scan_layers:
      self.layers = stack_layers(lambda rngs: LlamaDecoderLayer(spec, dataclasses.replace(f, rngs=rngs)),
                                 spec.num_layers, f.rngs)
    else:
      self.layers = nnx.List([LlamaDecoderLayer(spec, f) for _ in range(spec.num_layers)])
    self.norm = spec.norm(f, spec.hidden_size)
    self.sliding_windows = spec.sliding_windows
    self.inv_freq = spec.inv_freq
    self.local_inv_freq = spec.local_inv_freq
    self.embed_scale = spec.embed_scale
    self.scan_layers = scan_layers

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None,
               cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """``input_ids (B, T)`` -> final hidden states ``(B, T, hidden)`` (after ``norm``).

    ``segment_ids (B, T)``: packed examples (no attention across them; training only).
    With ``cache``: ``(hidden, cache)``, the T tokens written at slots ``cache.index ..``;
    ``position_ids`` then default to ``cache.index + 0..T-1`` (right for unpadded rows only).
    """
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache; "
                       "generate from unpacked prompts.")
    length = input_ids.shape[1]
    if position_ids is None:
      position_ids = jnp.arange(length)[None] + (0 if cache is None else cache.index)
    x = self.embed_tokens(input_ids)
    if self.embed_scale is not None:  # in the embedding's dtype, as transformers
      x = x * jnp.asarray(self.embed_scale, x.dtype)
    x = constrain_batch(x)
    # RoPE tables: the global ones, and the sliding layers' own (Gemma 3), picked per layer.
    ropes = [_rope_tables(position_ids, freq, x.dtype)
             for freq in (self.inv_freq, self.local_inv_freq) if freq is not None]
    rope_of = [int(w is not None and self.local_inv_freq is not None) for w in self.sliding_windows]
    windows = sorted(set(self.sliding_windows), key=lambda w: -1 if w is None else w)
    if cache is None:
      masks = [make_attention_mask(attention_mask, length, causal=True, sliding_window=w,
                                   segment_ids=segment_ids) for w in windows]
    else:
      cache = cache.advance(attention_mask, length)
      masks = [cache_attention_mask(cache, length, w) for w in windows]
    which = [windows.index(w) for w in self.sliding_windows]

    def block(layer, h, c, mask, rope, index):
      if c is None:
        return constrain_batch(layer(h, *rope, mask)), None
      h, c = layer(h, *rope, mask, c, index)
      return constrain_batch(h), c

    if self.scan_layers:
      # One mask per distinct window and one RoPE table per kind, picked per layer by index:
      # (W, B | 1, 1, T, S), (R, B | 1, T, D); a cache rides in the carry and each layer writes
      # its own slice of it in place.
      table = jnp.stack(masks)
      cos, sin = (jnp.stack(t) for t in zip(*ropes))
      scanned = self.layer_call(block)
      x, cache = scan_layers(
          lambda layer, carry, item: scanned(layer, *carry, table[item[0]],
                                             (cos[item[1]], sin[item[1]]), item[2]),
          self.layers, (x, cache),
          (jnp.asarray(which, jnp.int32), jnp.asarray(rope_of, jnp.int32),
           jnp.arange(len(which))))
    else:
      for index, (layer, i, r) in enumerate(zip(self.layers, which, rope_of)):
        # The index stays a Python int outside the remat: it picks the layer's cache buffer.
        x, cache = self.layer_call(functools.partial(block, index=index))(
            layer, x, cache, masks[i], ropes[r])
    return self.norm(x) if cache is None else (self.norm(x), cache)


class LlamaForCausalLM(CausalLM):
  """Llama causal LM: ``model(input_ids, attention_mask=None) -> logits (B, T, vocab)``.

  Generation: ``cache = model.init_cache(B, S)``, then ``model(ids, mask, positions,
  cache=cache) -> (logits, cache)`` (:mod:`smoa_jax.models.cache`).

  Args:
    hf_config: the Hugging Face config (``config.json`` as a dict, or a ``transformers`` config).
    dtype: compute dtype (None: follow inputs and params).
    param_dtype: dtype of the stored weights (float32 by default).
    rngs: initializes the weights (``normal(initializer_range)``), e.g. before loading a checkpoint.
    scan_layers: stack the decoder layers and run them under ``nnx.scan`` (paths then lose the
      layer index: ``model/layers/self_attn/q_proj/kernel (L, hidden, heads*head_dim)``).
  """

  architecture: ClassVar[str] = "LlamaForCausalLM"
  # Megatron: q/k/v and gate/up column-parallel, o/down row-parallel, vocab over tp.
  sharding_rules: ClassVar[tuple[ShardingRule, ...]] = (
      (r"model/embed_tokens/embedding", ("tp", "fsdp")),
      (r"model/layers/(\d+/)?self_attn/(qkv|[qkv])_proj/kernel", ("fsdp", "tp")),
      (r"model/layers/(\d+/)?self_attn/(qkv|[qkv])_proj/bias", ("tp",)),
      (r"model/layers/(\d+/)?self_attn/o_proj/kernel", ("tp", "fsdp")),
      (r"model/layers/(\d+/)?mlp/(gate_up|gate|up)_proj/kernel", ("fsdp", "tp")),
      (r"model/layers/(\d+/)?mlp/(gate_up|gate|up)_proj/bias", ("tp",)),
      (r"model/layers/(\d+/)?mlp/down_proj/kernel", ("tp", "fsdp")),
      (r"lm_head/kernel", ("fsdp", "tp")),
  )

  def __init__(self, hf_config: Mapping[str, Any], *, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs, scan_layers: bool = False):
    config = self._set_hf_config(hf_config)
    self.spec = self.decoder_spec(config)
    f = LayerFactory(dtype, param_dtype, self.spec.initializer_range, rngs)
    self.model = LlamaModel(self.spec, f, scan_layers)
    self.scan_layers = scan_layers
    self.lm_head = (None if self.spec.tie_word_embeddings
                    else f.linear(self.spec.hidden_size, self.spec.vocab_size, False))
    self.logit_softcap = self.spec.final_softcap

  @classmethod
  def family_flags(cls, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Bias / q-k norm / sliding-window flags; the one place the families differ."""
    bias = bool(hf_config.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf_config.get("mlp_bias", False)),
                qk_norm=False, sliding_windows=(None,) * num_layers)

  @classmethod
  def decoder_spec(cls, hf_config: Mapping[str, Any]) -> DecoderSpec:
    """Read a :class:`DecoderSpec` from an HF config dict (:mod:`smoa_jax.models.config_schema`
    checks every field first; ConfigError lists every invalid one)."""
    v = config_schema.check(hf_config, cls.architecture)
    fields = dict(
        vocab_size=v["vocab_size"], hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], num_kv_heads=v["num_key_value_heads"],
        head_dim=v["head_dim"], rms_norm_eps=v["rms_norm_eps"], hidden_act=v.get("hidden_act"),
        tie_word_embeddings=v["tie_word_embeddings"],
        inv_freq=tuple(float(f) for f in rope_inv_freq(v, v["head_dim"])),
        initializer_range=v["initializer_range"])
    return DecoderSpec(**{**fields, **cls.family_flags(v, v["num_hidden_layers"])})

  def decoder_parts(self) -> tuple[LlamaModel, nnx.Embed]:
    return self.model, self.model.embed_tokens

  def cache_layout(self) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)``."""
    return self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim

  def key_map(self) -> KeyMap:
    layer = "model.layers.{i}"
    path = "model/layers/{i}"
    rules = (
        KeyRule("model.embed_tokens.weight", "model/embed_tokens/embedding"),
        *linear_rules(f"{layer}.self_attn.{{p:[qkvo]_proj|qkv_proj}}", f"{path}/self_attn/{{p}}"),
        *norm_rules(f"{layer}.self_attn.{{n:[qk]_norm}}", f"{path}/self_attn/{{n}}"),
        *linear_rules(f"{layer}.mlp.{{p:gate_proj|up_proj|down_proj|gate_up_proj}}",
                      f"{path}/mlp/{{p}}"),
        *norm_rules(f"{layer}.{{n:input_layernorm|post_attention_layernorm"
                    "|pre_feedforward_layernorm|post_feedforward_layernorm}", f"{path}/{{n}}"),
        *norm_rules("model.norm", "model/norm"),
        KeyRule("lm_head.weight", "lm_head/kernel", transpose=True),
    )
    ignore = ("model.rotary_emb.inv_freq", f"{layer}.self_attn.rotary_emb.inv_freq")
    if self.lm_head is None:
      ignore += ("lm_head.weight",)
    return KeyMap(rules, ignore=ignore, prefix="model")


class MistralForCausalLM(LlamaForCausalLM):
  """Mistral: Llama without biases; ``sliding_window`` (if set) applies to every layer."""

  architecture: ClassVar[str] = "MistralForCausalLM"

  @classmethod
  def family_flags(cls, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
                sliding_windows=(hf_config.get("sliding_window"),) * num_layers)


class Qwen2ForCausalLM(LlamaForCausalLM):
  """Qwen2: biases on q/k/v (not o_proj), sliding-window layers per ``layer_types``."""

  architecture: ClassVar[str] = "Qwen2ForCausalLM"

  @classmethod
  def family_flags(cls, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False,
                sliding_windows=_layer_windows(hf_config, num_layers))


class Qwen3ForCausalLM(LlamaForCausalLM):
  """Qwen3: per-head RMSNorm on q and k (``q_norm``/``k_norm``) before RoPE; ``attention_bias``."""

  architecture: ClassVar[str] = "Qwen3ForCausalLM"

  @classmethod
  def family_flags(cls, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    bias = bool(hf_config.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True,
                sliding_windows=_layer_windows(hf_config, num_layers))


class Phi3ForCausalLM(MistralForCausalLM):
  """Phi-3: Mistral with fused ``qkv_proj`` and ``gate_up_proj``. SMoA adapts a fused kernel as
  one matrix (docs/design.md, "Fused projections")."""

  architecture: ClassVar[str] = "Phi3ForCausalLM"

  @classmethod
  def family_flags(cls, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    return dict(super().family_flags(hf_config, num_layers), fused_projections=True)
