"""Model state as plain NumPy arrays, for comparing runs and checking what training touched."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import smoa_jax


def to_host(x: jax.Array) -> np.ndarray:
  """A global array on every process's host (gathered across processes when needed)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def adapter_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every trainable array (``TrainableParam``) by its ``/``-joined path."""
  return {"/".join(map(str, p)): to_host(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, smoa_jax.TrainableParam))}


def base_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every frozen ``nnx.Param`` by its path (adapted kernels keep their base model's path)."""
  return {"/".join(map(str, p)): to_host(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
          if not isinstance(v, smoa_jax.TrainableParam)}
