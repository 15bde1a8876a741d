"""Training tasks: a loss on a batch of token arrays, and how to summarize its sums.

A :class:`Task` returns ``(loss_sum, weight, metric_sums)``; the mean loss is ``sum / weight``, so
micro-batches and evaluation batches add up exactly (tokens for causal LM, examples for
classification; padded evaluation rows carry ``example_weight`` 0).
"""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["Task", "CausalLMTask", "ClassificationTask"]


class Task(Protocol):
  """A loss on a batch: returns ``(loss_sum, weight, metric_sums)``; the mean is sum / weight.

  ``metric_names`` lists the keys of ``metric_sums`` (summed over micro-batches and batches).
  """

  name: str
  metric_names: tuple[str, ...]

  def loss(self, model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array,
                                                                          dict[str, jax.Array]]:
    ...

  def summarize(self, sums: dict[str, float], weight: float) -> dict[str, float]:
    ...


class CausalLMTask:
  """Next-token cross-entropy over the loss targets; the loss weight is their number.

  ``model(input_ids (B, T), attention_mask=(B, T)) -> logits (B, T, V)``. Token ``t`` is a target
  (predicted from position ``t - 1``) where ``loss_mask[:, t]`` is 1 (instruction data: the
  answer tokens), or without a ``loss_mask`` where ``attention_mask[:, t]`` is 1 (every real
  token). Packed batches (:func:`smoa_jax.data.pack`) also carry ``segment_ids`` and
  ``position_ids``, which go to the model (``segment_ids=`` keyword: no attention across
  examples); a token whose segment differs from its predecessor's starts a new example and is
  not a target, so the loss equals the unpacked loss.
  """

  name = "causal-lm"
  metric_names = ()

  def loss(self, model, batch):
    packed = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], **packed)
    targets = batch["input_ids"][:, 1:]
    valid = batch.get("loss_mask", batch["attention_mask"])[:, 1:].astype(jnp.float32)
    if "segment_ids" in batch:
      segments = batch["segment_ids"]
      valid = valid * (segments[:, 1:] == segments[:, :-1])
    if "example_weight" in batch:
      valid = valid * batch["example_weight"][:, None]
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), targets)
    return jnp.sum(nll * valid), jnp.sum(valid), {}

  def summarize(self, sums, weight):
    loss = sums["loss"] / max(weight, 1e-9)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0)))}


class ClassificationTask:
  """Cross-entropy of ``model(input_ids, attention_mask=...) -> logits (B, num_labels)``."""

  name = "classification"
  metric_names = ("correct",)

  def loss(self, model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).astype(jnp.float32)
    weight = batch.get("example_weight", jnp.ones(logits.shape[0], jnp.float32))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight), {"correct": jnp.sum(correct * weight)}

  def summarize(self, sums, weight):
    return {"loss": sums["loss"] / max(weight, 1e-9),
            "accuracy": sums.get("correct", 0.0) / max(weight, 1e-9)}
