"""Which leaves train: labels and masks for any pytree, and an optax optimizer that freezes the rest.

Two idioms freeze the base model:

* NNX: filter by Variable type. ``nnx.Optimizer(model, tx, wrt=smoa_jax.TrainableParam)`` and
  ``nnx.grad(loss, argnums=nnx.DiffState(0, smoa_jax.TrainableParam))`` never even compute a gradient
  for a frozen kernel.
* Pytrees (Linen ``params``, ``nnx.State``, any dict): :func:`trainable_labels` marks adapter
  leaves ``"trainable"`` and everything else ``"frozen"``; :func:`freeze_base` wraps an optimizer so
  that frozen leaves get exactly zero updates and no optimizer state.

A leaf is trainable if it is an ``TrainableParam`` Variable (NNX), or if its last path component is
``lora_a`` / ``lora_b`` (Linen and plain dicts), or if it matches the ``extra`` regex.

The ``optax.masked`` trap: ``optax.masked(tx, mask)`` applies ``tx`` where the mask is True and
passes the other updates through UNCHANGED. Fed raw gradients, it therefore still moves frozen
weights by ``-grad`` (an un-scaled SGD step!) unless something zeroes those gradients. The
recipe that really freezes is either :func:`freeze_base`, or, with masks::

    tx = optax.chain(optax.masked(optax.adam(lr), mask),
                     optax.masked(optax.set_to_zero(), invert(mask)))

where ``mask = smoa_jax.trainable_mask(params)``; :func:`freeze_base` builds the equivalent with
``optax.partition`` and also keeps no Adam moments for frozen leaves.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from flax import nnx

from smoa_jax.layers.variables import TrainableParam

__all__ = ["TRAINABLE", "FROZEN", "ADAPTER_LEAF_NAMES", "trainable_labels", "trainable_mask",
           "freeze_base", "masked_recipe"]

TRAINABLE = "trainable"
FROZEN = "frozen"
ADAPTER_LEAF_NAMES = ("lora_a", "lora_b")


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def trainable_labels(tree: Any, *, extra: str | None = None) -> Any:
  """A pytree like ``tree`` with ``"trainable"`` on adapter leaves and ``"frozen"`` elsewhere.

  Args:
    tree: Linen ``params``, an ``nnx.State`` (Variable leaves), or any pytree of arrays.
    extra: optional regex, full-matched against the ``/``-joined leaf path, marking more leaves
      trainable (e.g. ``".*/classifier/.*"`` for a fresh task head, or ``".*q_proj/kernel"``).
  """
  pattern = re.compile(extra) if extra is not None else None

  def label(path, leaf):
    names = [_key_name(p) for p in path]
    if _is_variable(leaf):
      trainable = isinstance(leaf, TrainableParam)
    else:
      trainable = bool(names) and names[-1] in ADAPTER_LEAF_NAMES
    if pattern is not None and pattern.fullmatch("/".join(names)):
      trainable = True
    return TRAINABLE if trainable else FROZEN

  return jax.tree_util.tree_map_with_path(label, tree, is_leaf=_is_variable)


def trainable_mask(tree: Any, *, extra: str | None = None) -> Any:
  """Booleans for ``optax.masked``: True on trainable (adapter) leaves. See the module docstring."""
  return jax.tree.map(lambda label: label == TRAINABLE, trainable_labels(tree, extra=extra))


def freeze_base(tx: optax.GradientTransformation, tree: Any, *,
                extra: str | None = None) -> optax.GradientTransformation:
  """``tx`` on trainable leaves, ``optax.set_to_zero()`` on the rest (via ``optax.partition``).

  Frozen leaves get zero updates whatever their gradients, and hold no optimizer state (no Adam
  moments), so optimizer memory scales with the adapter, not the model.

  Example::

    >>> import jax.numpy as jnp, optax, smoa_jax
    >>> params = {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 4))}
    >>> tx = smoa_jax.freeze_base(optax.adam(1e-3), params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> float(jnp.abs(updates["kernel"]).max())
    0.0
  """
  labels = trainable_labels(tree, extra=extra)
  return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def masked_recipe(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """The correct ``optax.masked`` recipe: ``tx`` where ``mask``, zero updates elsewhere."""
  inverse = jax.tree.map(lambda m: not m, mask)
  return optax.chain(optax.masked(tx, mask), optax.masked(optax.set_to_zero(), inverse))
