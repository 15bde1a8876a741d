"""Building blocks shared by the model families: activations, attention masks and attention
(with optional logit soft-capping), Gemma's RMSNorm, stacked (scanned) layers, and
rematerialisation of the layers (:class:`LayerStack`)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from smoa_jax.errors import ConfigError

__all__ = ["activation", "make_attention_mask", "attention", "softcap", "UnitOffsetRMSNorm",
           "stack_layers", "scan_layers", "REMAT_POLICIES", "check_remat", "LayerStack",
           "set_remat"]


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation an HF config names (``hidden_act`` / ``activation_function``)."""
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ConfigError(f"activation {name!r} is not supported; expected one of "
                      f"{sorted(_ACTIVATIONS)}.") from None


def make_attention_mask(attention_mask: jax.Array | None, query_len: int, *, causal: bool,
                        sliding_window: int | None = None,
                        segment_ids: jax.Array | None = None) -> jax.Array | None:
  """Boolean mask ``(B | 1, 1, T, S)``, True where a query may attend a key (``S == T``).

  ``attention_mask (B, S)`` holds 1 for real tokens and 0 for padding (HF convention). Causal:
  key ``s <= t``; with ``sliding_window`` w also ``t - s < w`` (HF's sliding-window rule).
  ``segment_ids (B, T)`` (packed sequences: 1, 2, ... per example, 0 for padding) also requires
  ``segment_ids[t] == segment_ids[s]``, so attention never crosses from one example into another.
  """
  mask = None
  if causal:
    t = jnp.arange(query_len)[:, None]
    s = jnp.arange(query_len)[None, :]
    mask = s <= t
    if sliding_window is not None:
      mask = mask & (t - s < sliding_window)
    mask = mask[None, None]
  if attention_mask is not None:
    pad = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    mask = pad if mask is None else mask & pad
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = same if mask is None else mask & same
  return mask


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping: values kept inside ``(-cap, cap)``);
  ``x`` itself when ``cap`` is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
              scale: float, logit_cap: float | None = None, *, cached: bool = False) -> jax.Array:
  """Softmax attention with grouped KV heads, softmax in float32.

  ``query (B, T, N, D)``, ``key``/``value (B, S, K, D)`` -- or, with ``cached``, ``(B * K, S,
  D)`` (the KV cache's layout, :mod:`smoa_jax.models.cache`: row ``b``'s head ``k`` at ``b * K +
  k``) -- with ``N % K == 0`` (GQA: query head ``n`` reads KV head ``n // (N // K)``, as HF's
  ``repeat_kv``), ``mask`` boolean broadcastable to ``(B, N, T, S)`` -> ``(B, T, N, D)``. A query
  with no visible key gets the mean of the values instead of NaN. ``logit_cap``: the scores
  ``scale * q.k`` are soft-capped (:func:`softcap`) before the mask and the softmax (Gemma 2).

  With ``cached`` both products are dots with the one batch dimension ``B * K`` leading every
  operand, the cache buffers' own layout, so XLA reads the cached keys and values where they lie
  (see :mod:`smoa_jax.models.cache` for what anything else costs a decode step).
  """
  if logit_cap is None and not cached:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)
  batch, length, heads, dim = query.shape
  kv_heads = key.shape[0] // batch if cached else key.shape[2]
  keys = key.shape[1]
  group = heads // kv_heads
  grouped = query.reshape(batch, length, kv_heads, group, dim)
  if cached:  # (B * K, G * T, D) . (B * K, S, D)
    flat = jnp.moveaxis(grouped, 1, 3).reshape(batch * kv_heads, group * length, dim)
    scores = jnp.einsum("nmd,nsd->nms", flat, key, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, group, length, keys) * scale
  else:
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, key,
                        preferred_element_type=jnp.float32) * scale
  scores = softcap(scores, logit_cap)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (mask.shape[0], heads, length, keys))
    mask = mask.reshape(mask.shape[0], kv_heads, group, length, keys)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  if cached:
    out = jnp.einsum("nms,nsd->nmd", weights.reshape(batch * kv_heads, group * length, keys),
                     value)
    out = jnp.moveaxis(out.reshape(batch, kv_heads, group, length, dim), 3, 1)
  else:
    out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
  return out.reshape(batch, length, heads, dim)


class UnitOffsetRMSNorm(nnx.Module):
  """Gemma's RMSNorm: ``x / sqrt(mean(x^2) + eps) * (1 + scale)``, computed in float32.

  ``scale (features,)`` is HF's ``weight``, stored as an offset from one (initialized to zeros).
  The output has ``dtype`` (None: that of ``x`` and ``scale`` promoted), as ``nnx.RMSNorm``.
  """

  def __init__(self, features: int, *, epsilon: float, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs | None = None):
    del rngs  # zeros: nothing random
    self.scale = nnx.Param(jnp.zeros((features,), param_dtype))
    self.epsilon, self.dtype, self.param_dtype = epsilon, dtype, param_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x (..., features)`` -> same shape."""
    scale = self.scale[...]
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.epsilon)
    y = y * (1.0 + scale.astype(jnp.float32))
    return y.astype(self.dtype or jnp.promote_types(x.dtype, scale.dtype))


# -- stacked (scanned) layers ----------------------------------------------------------------------
def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """``num_layers`` layers as ONE module whose Variables carry a leading layer axis ``(L, ...)``.

  Built under ``nnx.vmap`` with split rngs (every layer initialized differently) and run by
  :func:`scan_layers`: the layer body is traced and compiled once instead of L times.
  """
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers)
  def build(layer_rngs: nnx.Rngs) -> nnx.Module:
    return make_layer(layer_rngs)

  return build(rngs)


def scan_layers(step: Callable[[nnx.Module, jax.Array, Any], jax.Array], layers: nnx.Module,
                x: jax.Array, per_layer: Any = None) -> jax.Array:
  """``x = step(layer_i, x, per_layer[i])`` for i = 0..L-1 under ``nnx.scan``.

  ``layers`` is a stacked module (:func:`stack_layers`); ``per_layer`` a pytree of arrays with a
  leading ``L`` axis (or None); ``x`` the carry, e.g. hidden states ``(B, T, hidden)``.
  """
  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
  def body(carry: jax.Array, layer: nnx.Module, item: Any) -> jax.Array:
    return step(layer, carry, item)

  return body(x, layers, per_layer)


# -- rematerialisation -----------------------------------------------------------------------------
# What the backward pass may keep of a layer's forward pass; anything else is recomputed.
#   "none": no remat; every intermediate of every layer stays alive until the backward pass.
#   "full": only each layer's input is kept; the layer's forward pass runs again in the backward.
#   "dots": the outputs of the weight matmuls (q/k/v/o, gate/up/down: dots without batch
#           dimensions) are kept; the attention scores (a batched dot, (B, N, T, T)), the softmax,
#           norms and activations are recomputed. Costs about one activation per projection and
#           little recompute (no matmul with a weight is redone).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str, where: str = "remat") -> str:
  """``policy`` if it names one of :data:`REMAT_POLICIES`, else ConfigError naming them."""
  if not isinstance(policy, str) or policy not in REMAT_POLICIES:
    raise ConfigError(f"{where}={policy!r} is not a rematerialisation policy; expected one of "
                      f"{', '.join(repr(p) for p in REMAT_POLICIES)}.")
  return policy


class LayerStack(nnx.Module):
  """Base of a module that runs a family's layers (Llama's ``model``, GPT-2's ``transformer``,
  BERT's ``encoder``): it holds the rematerialisation policy ``remat`` (one of
  :data:`REMAT_POLICIES`, ``"none"`` unless :func:`set_remat` says otherwise) and wraps the
  per-layer call in it (:meth:`layer_call`), with or without ``scan_layers``.
  """

  remat: str = "none"
  scan_layers: bool = False

  def layer_call(self, step: Callable[..., Any]) -> Callable[..., Any]:
    """``step(layer, *args)`` (one layer's forward pass, ``layer`` an nnx Module) under
    ``nnx.remat`` with the policy of :attr:`remat`; ``step`` itself when it is ``"none"``.

    Called inside the body of :func:`scan_layers`, the remat sits inside the scanned body, so the
    backward pass of the scan keeps one carry per layer (plus what the policy saves).
    """
    if self.remat == "none":
      return step
    # Under scan the loop already keeps XLA from merging the recomputation into the forward pass.
    return nnx.remat(step, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers,
                     graph_updates=False)


def set_remat(model: nnx.Module, policy: str) -> str:
  """Rematerialise every layer of ``model`` by ``policy`` (:data:`REMAT_POLICIES`) from now on;
  returns the policy it had before (``"none"`` for a fresh model).

  The policy is a static attribute of each :class:`LayerStack`, so it is part of the graphdef:
  set it before ``nnx.split`` / ``nnx.jit`` traces the model. :func:`smoa_jax.train` sets it
  from ``TrainConfig.remat`` for the run (and restores it afterwards); forward passes without a
  gradient compute the same values either way.

  Raises:
    ConfigError: ``policy`` is not one of :data:`REMAT_POLICIES`, or it is not ``"none"`` and
      ``model`` has no :class:`LayerStack` (a model not built by :mod:`smoa_jax.models`: wrap its
      blocks in ``nnx.remat`` yourself).
  """
  check_remat(policy)
  stacks = [m for _, m in nnx.iter_graph(model) if isinstance(m, LayerStack)]
  if not stacks:
    if policy != "none":
      raise ConfigError(f"remat={policy!r} needs a model from smoa_jax.models (its layers run "
                        f"through a LayerStack); {type(model).__name__} has none. Wrap its "
                        "blocks in flax.nnx.remat yourself, or use remat='none'.")
    return "none"
  before = stacks[0].remat
  for stack in stacks:
    stack.remat = policy
  return before
