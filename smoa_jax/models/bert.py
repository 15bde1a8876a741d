"""BERT encoders as NNX modules with HF names: ``BertModel`` and ``BertForSequenceClassification``.

Post-norm transformer encoder with absolute position and token-type embeddings. Module paths
(``BertModel``; ``BertForSequenceClassification`` puts the same tree under ``bert/``)::

    embeddings/word_embeddings                      embedding (vocab, hidden) [also position_/token_type_]
    embeddings/LayerNorm                            scale, bias (hidden)
    encoder/layer/0/attention/self/query            kernel (hidden, hidden)  [also key, value]
    encoder/layer/0/attention/output/dense          kernel (hidden, hidden)
    encoder/layer/0/attention/output/LayerNorm
    encoder/layer/0/intermediate/dense              kernel (hidden, intermediate)
    encoder/layer/0/output/dense                    kernel (intermediate, hidden)
    encoder/layer/0/output/LayerNorm
    pooler/dense                                    kernel (hidden, hidden)
    classifier                                      kernel (hidden, num_labels)  [sequence classification]

Loading a pretraining checkpoint (``BertForMaskedLM`` / ``BertForPreTraining``, keys ``bert.*``
and ``cls.*``) keeps the encoder and drops the ``cls.*`` heads; a missing pooler or classifier
is initialized fresh (``normal(initializer_range)``, zero bias), as transformers does.

``scan_layers=True`` stacks the encoder layers (``encoder/layer/attention/self/query`` kernel
``(L, hidden, hidden)``) under ``nnx.scan``; ``sharding_rules`` give the Megatron layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from smoa_jax.models import config_schema
from smoa_jax.models.base import HFModel, LayerFactory, ShardingRule
from smoa_jax.models.blocks import (LayerStack, activation, attention, make_attention_mask,
                                    scan_layers, stack_layers)
from smoa_jax.models.keymap import KeyMap, KeyRule, linear_rules, norm_rules, prefixed
from smoa_jax.parallel.sharding import constrain_batch

__all__ = ["BertModel", "BertForSequenceClassification"]

_BASE_RULES = (
    KeyRule("embeddings.{e:word_embeddings|position_embeddings|token_type_embeddings}.weight",
            "embeddings/{e}/embedding"),
    *norm_rules("embeddings.LayerNorm", "embeddings/LayerNorm"),
    *linear_rules("encoder.layer.{i}.attention.self.{p:query|key|value}",
                  "encoder/layer/{i}/attention/self/{p}"),
    *linear_rules("encoder.layer.{i}.{b:attention\\.output|intermediate|output}.dense",
                  "encoder/layer/{i}/{b}/dense"),
    *norm_rules("encoder.layer.{i}.{b:attention\\.output|output}.LayerNorm",
                "encoder/layer/{i}/{b}/LayerNorm"),
    *linear_rules("pooler.dense", "pooler/dense"),
)
# Buffers some checkpoints carry, and the heads of the pretraining architectures.
_BASE_IGNORE = ("embeddings.position_ids", "embeddings.token_type_ids", "cls.{rest:.*}")
_RENAMES = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))
# Megatron: query/key/value and intermediate column-parallel, the two output denses row-parallel,
# vocab over tp; the same table serves BertModel and BertForSequenceClassification (bert/ prefix).
_LAYER = r"(bert/)?encoder/layer/(\d+/)?"
_SHARDING_RULES = (
    (r"(bert/)?embeddings/word_embeddings/embedding", ("tp", "fsdp")),
    (r"(bert/)?embeddings/(position|token_type)_embeddings/embedding", (None, "fsdp")),
    (_LAYER + r"(attention/self/(query|key|value)|intermediate/dense)/kernel", ("fsdp", "tp")),
    (_LAYER + r"(attention/self/(query|key|value)|intermediate/dense)/bias", ("tp",)),
    (_LAYER + r"(attention/output|output)/dense/kernel", ("tp", "fsdp")),
    (r"(bert/)?pooler/dense/kernel", ("fsdp", None)),
    (r"classifier/kernel", ("fsdp", None)),
)


class BertSelfAttention(nnx.Module):
  """Multi-head attention projections ``query``, ``key``, ``value`` (the HF ``attention.self``)."""

  def __init__(self, hidden: int, heads: int, f: LayerFactory):
    self.query = f.linear(hidden, hidden, True)
    self.key = f.linear(hidden, hidden, True)
    self.value = f.linear(hidden, hidden, True)
    self.num_heads, self.head_dim = heads, hidden // heads

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x (B, T, hidden)``, ``mask (B, 1, 1, T)`` -> context ``(B, T, hidden)``."""
    batch, length, hidden = x.shape
    shape = (batch, length, self.num_heads, self.head_dim)
    out = attention(self.query(x).reshape(shape), self.key(x).reshape(shape),
                    self.value(x).reshape(shape), mask, self.head_dim ** -0.5)
    return out.reshape(batch, length, hidden)


class BertResidualOutput(nnx.Module):
  """``LayerNorm(dense(h) + residual)``: HF's ``BertSelfOutput`` and ``BertOutput``."""

  def __init__(self, in_features: int, hidden: int, eps: float, f: LayerFactory):
    self.dense = f.linear(in_features, hidden, True)
    self.LayerNorm = f.layer_norm(hidden, eps)  # HF spelling

  def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
  """``self`` (the projections) + ``output`` (dense, residual, LayerNorm)."""

  def __init__(self, hidden: int, heads: int, eps: float, f: LayerFactory):
    self.self = BertSelfAttention(hidden, heads, f)
    self.output = BertResidualOutput(hidden, hidden, eps, f)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return self.output(self.self(x, mask), x)


class BertIntermediate(nnx.Module):
  """``act(dense(x))`` to the intermediate width."""

  def __init__(self, hidden: int, intermediate: int, act: str, f: LayerFactory):
    self.dense = f.linear(hidden, intermediate, True)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return activation(self.act)(self.dense(x))


class BertLayer(nnx.Module):
  """Post-norm encoder block: ``attention``, ``intermediate``, ``output``."""

  def __init__(self, config: Mapping[str, Any], f: LayerFactory):
    hidden, eps = config["hidden_size"], float(config.get("layer_norm_eps", 1e-12))
    intermediate = config["intermediate_size"]
    self.attention = BertAttention(hidden, config["num_attention_heads"], eps, f)
    self.intermediate = BertIntermediate(hidden, intermediate, config.get("hidden_act", "gelu"), f)
    self.output = BertResidualOutput(intermediate, hidden, eps, f)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = self.attention(x, mask)
    return self.output(self.intermediate(x), x)


class BertEncoder(LayerStack):
  """The ``layer`` stack: an ``nnx.List``, or with ``scan_layers`` one stacked layer under ``nnx.scan``."""

  def __init__(self, config: Mapping[str, Any], f: LayerFactory, scan_layers: bool = False):
    if scan_layers:
      self.layer = stack_layers(lambda rngs: BertLayer(config, dataclasses.replace(f, rngs=rngs)),
                                config["num_hidden_layers"], f.rngs)
    else:
      self.layer = nnx.List([BertLayer(config, f) for _ in range(config["num_hidden_layers"])])
    self.scan_layers = scan_layers

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x (B, T, hidden)``, ``mask (B, 1, 1, T)`` -> ``(B, T, hidden)``."""
    x = constrain_batch(x)
    step = self.layer_call(lambda layer, h: constrain_batch(layer(h, mask)))
    if self.scan_layers:
      return scan_layers(lambda layer, h, _: step(layer, h), self.layer, x)
    for layer in self.layer:
      x = step(layer, x)
    return x


class BertEmbeddings(nnx.Module):
  """``LayerNorm(word + position + token_type)`` embeddings."""

  def __init__(self, config: Mapping[str, Any], f: LayerFactory):
    hidden = config["hidden_size"]
    self.word_embeddings = f.embed(config["vocab_size"], hidden)
    self.position_embeddings = f.embed(config.get("max_position_embeddings", 512), hidden)
    self.token_type_embeddings = f.embed(config.get("type_vocab_size", 2), hidden)
    self.LayerNorm = f.layer_norm(hidden, float(config.get("layer_norm_eps", 1e-12)))

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None,
               position_ids: jax.Array | None) -> jax.Array:
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[1])[None]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
         + self.position_embeddings(position_ids))
    return self.LayerNorm(x)


class BertPooler(nnx.Module):
  """``tanh(dense(h[:, 0]))``: the first token's hidden state, projected."""

  def __init__(self, hidden: int, f: LayerFactory):
    self.dense = f.linear(hidden, hidden, True)

  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(hidden_states[:, 0]))


class BertModel(HFModel):
  """BERT encoder: ``model(input_ids, attention_mask=None, token_type_ids=None) -> (B, T, hidden)``.

  ``model.pool(hidden)`` gives the pooled ``(B, hidden)`` output (``tanh(dense(h[:, 0]))``).

  Args:
    hf_config: the Hugging Face config (dict or ``transformers.BertConfig``).
    dtype, param_dtype: compute and storage dtypes (storage float32 by default).
    rngs: initializes the weights (``normal(initializer_range)``).
  """

  architecture: ClassVar[str] = "BertModel"
  sharding_rules: ClassVar[tuple[ShardingRule, ...]] = _SHARDING_RULES

  def __init__(self, hf_config: Mapping[str, Any], *, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs, scan_layers: bool = False):
    # Every field the layers read, checked (smoa_jax.models.config_schema), defaults filled in.
    config = config_schema.check(self._set_hf_config(hf_config), self.architecture)
    f = LayerFactory(dtype, param_dtype, config["initializer_range"], rngs)
    self.embeddings = BertEmbeddings(config, f)
    self.encoder = BertEncoder(config, f, scan_layers)
    self.scan_layers = scan_layers
    self.pooler = BertPooler(config["hidden_size"], f)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    """``input_ids (B, T)``, ``attention_mask (B, T)`` 1/0, ``token_type_ids (B, T)`` (default 0)
    -> last hidden state ``(B, T, hidden)``."""
    x = self.embeddings(input_ids, token_type_ids, position_ids)
    return self.encoder(x, make_attention_mask(attention_mask, x.shape[1], causal=False))

  def pool(self, hidden_states: jax.Array) -> jax.Array:
    """Pooled output ``(B, hidden)`` from the last hidden state ``(B, T, hidden)``."""
    return self.pooler(hidden_states)

  def key_map(self) -> KeyMap:
    return KeyMap(_BASE_RULES, ignore=_BASE_IGNORE, fresh=("pooler/dense/.*",), renames=_RENAMES,
                  base_prefix="bert")


class BertForSequenceClassification(HFModel):
  """BERT + pooler + linear ``classifier``: ``model(input_ids, ...) -> logits (B, num_labels)``.

  Args:
    hf_config: the Hugging Face config; ``num_labels`` (or ``id2label``) sets the head size
      unless given here.
    num_labels: number of classes (overrides the config; the head is then sized to it).
    dtype, param_dtype, rngs: as for :class:`BertModel`.
  """

  architecture: ClassVar[str] = "BertForSequenceClassification"
  sharding_rules: ClassVar[tuple[ShardingRule, ...]] = _SHARDING_RULES

  def __init__(self, hf_config: Mapping[str, Any], *, num_labels: int | None = None,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
               scan_layers: bool = False):
    config = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    values = config_schema.check(config, self.architecture)
    num_labels = config_schema.label_count(values, num_labels)
    if len(config.get("id2label") or {}) != num_labels:
      config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
      config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    config.pop("num_labels", None)  # transformers derives it from id2label
    config = self._set_hf_config(config)
    self.bert = BertModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          scan_layers=scan_layers)
    self.scan_layers = scan_layers
    f = LayerFactory(dtype, param_dtype, values["initializer_range"], rngs)
    self.classifier = f.linear(values["hidden_size"], num_labels, True)
    self.num_labels = num_labels

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    """Inputs as :class:`BertModel` -> logits ``(B, num_labels)`` from the pooled output."""
    hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
    return self.classifier(self.bert.pool(hidden))

  def key_map(self) -> KeyMap:
    rules = prefixed(_BASE_RULES, "bert") + linear_rules("classifier", "classifier")
    ignore = tuple(f"bert.{p}" for p in _BASE_IGNORE[:2]) + _BASE_IGNORE[2:]
    return KeyMap(rules, ignore=ignore, fresh=("bert/pooler/dense/.*", "classifier/.*"),
                  renames=_RENAMES, prefix="bert")
