"""The NNX Variable types smoa-jax adds: what trains, and the spectral permutations.

* :class:`TrainableParam` marks EVERY array that training updates: adapter factors
  (``lora_a``/``lora_b`` of any method), fully fine-tuned kernels (``FullFineTuneConfig``) and
  heads made trainable with ``mark_trainable``. Everything else (the frozen base) stays
  ``nnx.Param``. It subclasses ``nnx.LoRAParam``, so ``nnx.Optimizer(model, tx,
  wrt=smoa_jax.TrainableParam)``, ``nnx.DiffState(0, smoa_jax.TrainableParam)`` and tools that
  filter on ``nnx.LoRAParam`` select exactly the trainable arrays. ``SMoAParam`` is the same
  type under its first name.
* :class:`SpectralIndex` holds an int32 permutation of a kernel's coordinates (SMoA's spectral
  order): state saved with the adapter, never differentiated.
* :class:`InactiveArray` holds the arrays (factors, permutations) of an adapter a layer keeps but
  does not use (several named adapters on one base, :mod:`smoa_jax.layers.dense`): neither a
  ``TrainableParam`` nor an ``nnx.Param``, so optimizers, checkpoints, parameter counts and
  ``smoa_jax.train`` ignore it.
"""

from __future__ import annotations

from flax import nnx

__all__ = ["TrainableParam", "SMoAParam", "SpectralIndex", "InactiveArray", "retyped"]


class TrainableParam(nnx.LoRAParam):
  """Variable type of every trainable array: adapter factors, fully fine-tuned kernels, heads."""


# The type's first name, kept for code written against it.
SMoAParam = TrainableParam


class SpectralIndex(nnx.Variable):
  """Non-trainable int32 permutation of a kernel's coordinates (spectral order)."""


class InactiveArray(nnx.Variable):
  """An array of an inactive named adapter (factors or permutations): kept, never trained."""


def retyped(variable: nnx.Variable, cls: type[nnx.Variable]) -> nnx.Variable:
  """A Variable of type ``cls`` holding ``variable``'s very value (no copy) and metadata."""
  return cls(variable.get_value(), **variable.get_metadata())
