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
"""

from __future__ import annotations

from flax import nnx

__all__ = ["TrainableParam", "SMoAParam", "SpectralIndex"]


class TrainableParam(nnx.LoRAParam):
  """Variable type of every trainable array: adapter factors, fully fine-tuned kernels, heads."""


# The type's first name, kept for code written against it.
SMoAParam = TrainableParam


class SpectralIndex(nnx.Variable):
  """Non-trainable int32 permutation of a kernel's coordinates (spectral order)."""
