"""Parameter shapes and bytes of a model family from its checked config alone, before any module
exists.

:func:`param_specs` lists, per family, every ``nnx.Param`` the model will hold: its path (the same
``/``-joined path as in the built model; layers of an unrolled stack appear once, with ``{i}``
for the layer index and a ``count``), its shape and how many there are. :func:`config_param_bytes`
sums them in Python integers, so a config with 4,096 layers of width 2^20 is priced in
microseconds and refused before anything is built; with a mesh, it gives the bytes one device
holds under the family's ``sharding_rules`` (the same fitted specs :mod:`smoa_jax.parallel.spmd`
assigns). ``tests/models/test_sizes.py`` checks every family against its built model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
from flax.typing import Dtype
from jax.sharding import Mesh

from smoa_jax.parallel import sharding
from smoa_jax.parallel.spmd import rule_spec

__all__ = ["ParamSpec", "param_specs", "config_param_bytes"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """``count`` parameters of ``shape`` at ``path`` (``{i}`` in it: the layer index 0..count-1)."""

  path: str
  shape: tuple[int, ...]
  count: int = 1


_Layer = list[tuple[str, tuple[int, ...]]]  # (path inside one layer, shape)


def _linear(path: str, n_in: int, n_out: int, bias: bool) -> _Layer:
  return [(f"{path}/kernel", (n_in, n_out))] + ([(f"{path}/bias", (n_out,))] if bias else [])


def _norm(path: str, features: int, bias: bool) -> _Layer:
  return [(f"{path}/scale", (features,))] + ([(f"{path}/bias", (features,))] if bias else [])


def _embed(path: str, num: int, features: int) -> _Layer:
  return [(f"{path}/embedding", (num, features))]


def _stack(prefix: str, layer: _Layer, num_layers: int, scan_layers: bool) -> list[ParamSpec]:
  """One layer's parameters, ``num_layers`` times: stacked ``(L, ...)`` or per index."""
  if scan_layers:
    return [ParamSpec(f"{prefix}/{path}", (num_layers, *shape)) for path, shape in layer]
  return [ParamSpec(f"{prefix}/{{i}}/{path}", shape, num_layers) for path, shape in layer]


def _single(layer: _Layer) -> list[ParamSpec]:
  return [ParamSpec(path, shape) for path, shape in layer]


def _decoder(v: Mapping[str, Any], model_cls: Any, scan_layers: bool) -> list[ParamSpec]:
  """Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3 (smoa_jax.models.llama, .gemma): biases,
  q/k norms, fused projections and Gemma's extra norms per family."""
  hidden, inter, heads, kv, dim = (v["hidden_size"], v["intermediate_size"],
                                   v["num_attention_heads"], v["num_key_value_heads"],
                                   v["head_dim"])
  flags = model_cls.family_flags(v, 0)  # 0 layers: no per-layer windows to list
  qkv_bias, o_bias, mlp_bias = flags["qkv_bias"], flags["o_bias"], flags["mlp_bias"]
  if flags.get("fused_projections"):
    qkv = _linear("self_attn/qkv_proj", hidden, (heads + 2 * kv) * dim, qkv_bias)
    gate_up = _linear("mlp/gate_up_proj", hidden, 2 * inter, mlp_bias)
  else:
    qkv = (_linear("self_attn/q_proj", hidden, heads * dim, qkv_bias)
           + _linear("self_attn/k_proj", hidden, kv * dim, qkv_bias)
           + _linear("self_attn/v_proj", hidden, kv * dim, qkv_bias))
    gate_up = (_linear("mlp/gate_proj", hidden, inter, mlp_bias)
               + _linear("mlp/up_proj", hidden, inter, mlp_bias))
  layer = (qkv + _linear("self_attn/o_proj", heads * dim, hidden, o_bias)
           + (_norm("self_attn/q_norm", dim, False) + _norm("self_attn/k_norm", dim, False)
              if flags["qk_norm"] else [])
           + gate_up + _linear("mlp/down_proj", inter, hidden, mlp_bias)
           + _norm("input_layernorm", hidden, False)
           + _norm("post_attention_layernorm", hidden, False)
           + (_norm("pre_feedforward_layernorm", hidden, False)
              + _norm("post_feedforward_layernorm", hidden, False)
              if flags.get("sandwich_norms") else []))
  head = [] if v["tie_word_embeddings"] else _linear("lm_head", hidden, v["vocab_size"], False)
  return (_single(_embed("model/embed_tokens", v["vocab_size"], hidden))
          + _stack("model/layers", layer, v["num_hidden_layers"], scan_layers)
          + _single(_norm("model/norm", hidden, False) + head))


def _gpt2(v: Mapping[str, Any], scan_layers: bool) -> list[ParamSpec]:
  hidden, inner = v["n_embd"], v["n_inner"]
  layer = (_norm("ln_1", hidden, True) + _linear("attn/c_attn", hidden, 3 * hidden, True)
           + _linear("attn/c_proj", hidden, hidden, True) + _norm("ln_2", hidden, True)
           + _linear("mlp/c_fc", hidden, inner, True) + _linear("mlp/c_proj", inner, hidden, True))
  head = [] if v["tie_word_embeddings"] else _linear("lm_head", hidden, v["vocab_size"], False)
  return (_single(_embed("transformer/wte", v["vocab_size"], hidden)
                  + _embed("transformer/wpe", v["n_positions"], hidden))
          + _stack("transformer/h", layer, v["n_layer"], scan_layers)
          + _single(_norm("transformer/ln_f", hidden, True) + head))


def _bert(v: Mapping[str, Any], scan_layers: bool, prefix: str = "") -> list[ParamSpec]:
  hidden, inter = v["hidden_size"], v["intermediate_size"]
  layer = (_linear("attention/self/query", hidden, hidden, True)
           + _linear("attention/self/key", hidden, hidden, True)
           + _linear("attention/self/value", hidden, hidden, True)
           + _linear("attention/output/dense", hidden, hidden, True)
           + _norm("attention/output/LayerNorm", hidden, True)
           + _linear("intermediate/dense", hidden, inter, True)
           + _linear("output/dense", inter, hidden, True) + _norm("output/LayerNorm", hidden, True))
  embeddings = (_embed(f"{prefix}embeddings/word_embeddings", v["vocab_size"], hidden)
                + _embed(f"{prefix}embeddings/position_embeddings", v["max_position_embeddings"],
                         hidden)
                + _embed(f"{prefix}embeddings/token_type_embeddings", v["type_vocab_size"], hidden)
                + _norm(f"{prefix}embeddings/LayerNorm", hidden, True))
  return (_single(embeddings)
          + _stack(f"{prefix}encoder/layer", layer, v["num_hidden_layers"], scan_layers)
          + _single(_linear(f"{prefix}pooler/dense", hidden, hidden, True)))


def param_specs(model_cls: type, values: Mapping[str, Any], *, num_labels: int | None = None,
                scan_layers: bool = False) -> list[ParamSpec]:
  """Every ``nnx.Param`` of ``model_cls`` built from checked ``values``
  (:func:`smoa_jax.models.config_schema.check`); ``num_labels``: the classification head's size."""
  architecture = model_cls.architecture
  if architecture == "GPT2LMHeadModel":
    return _gpt2(values, scan_layers)
  if architecture == "BertModel":
    return _bert(values, scan_layers)
  if architecture == "BertForSequenceClassification":
    return (_bert(values, scan_layers, "bert/")
            + _single(_linear("classifier", values["hidden_size"], num_labels, True)))
  return _decoder(values, model_cls, scan_layers)


def config_param_bytes(model_cls: type, values: Mapping[str, Any], param_dtype: Dtype, *,
                       num_labels: int | None = None, scan_layers: bool = False,
                       mesh: Mesh | None = None) -> int:
  """Bytes of the parameters of ``model_cls`` built from ``values`` in ``param_dtype``.

  With ``mesh``: the bytes one device holds (each spec fitted to the mesh, as
  :func:`smoa_jax.parallel.spmd.sharding_plan` does). Equals
  :func:`smoa_jax.models.hf.param_bytes` of the built (annotated) model.
  """
  itemsize = jnp.dtype(param_dtype).itemsize
  total = 0
  for spec in param_specs(model_cls, values, num_labels=num_labels,
                          scan_layers=scan_layers):
    ways = 1
    if mesh is not None:
      fitted = sharding.fit_spec(rule_spec(spec.path.format(i=0), spec.shape,
                                           model_cls.sharding_rules), spec.shape, mesh)
      ways = math.prod(sharding.axis_size(mesh, entry) for entry in fitted)
    total += spec.count * (math.prod(spec.shape) * itemsize // ways)
  return total
