"""Device meshes and data placement for SPMD training (single host or multi-host).

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
with parameters sharded over it) and ``tp`` (tensor parallelism). Batches are split over
``("data", "fsdp")``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from smoa_jax.errors import ConfigError

__all__ = ["AXES", "BATCH_AXES", "parse_mesh", "make_mesh", "batch_sharding", "shard_batch"]

AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str) -> dict[str, int]:
  """``"data=2,fsdp=2,tp=2"`` -> ``{"data": 2, "fsdp": 2, "tp": 2}`` (missing axes are 1)."""
  sizes = {axis: 1 for axis in AXES}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in AXES or not value.strip().isdigit() or int(value) < 1:
      raise ConfigError(f"mesh spec {spec!r}: {part!r} is invalid; expected comma-separated "
                        f"NAME=SIZE with NAME in {AXES} and SIZE >= 1, e.g. 'data=2,fsdp=2,tp=2'.")
    sizes[name] = int(value)
  return sizes


def make_mesh(data: int = 1, fsdp: int = 1, tp: int = 1, *, devices: Any = None) -> Mesh:
  """A ``Mesh`` of shape ``(data, fsdp, tp)`` over ``devices`` (default: all global devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  wanted = data * fsdp * tp
  if wanted != devices.size:
    raise ConfigError(f"mesh data={data} x fsdp={fsdp} x tp={tp} = {wanted} devices, but "
                      f"{devices.size} are available; make the product equal the device count.")
  return Mesh(devices.reshape(data, fsdp, tp), AXES)


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Axis ``batch_axis`` split over ``data`` x ``fsdp``; every other axis replicated."""
  return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, *,
                batch_axis: int = 0) -> dict[str, jax.Array]:
  """Place a host batch (the same global batch on every process) on the mesh, split by rows.

  Each process contributes the rows its addressable devices own, so no process ever holds
  another's shard on device. The size of ``batch_axis`` must divide by ``data * fsdp``.
  """
  sharding = batch_sharding(mesh, batch_axis)
  ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.shape[batch_axis] % ways:
      raise ConfigError(f"batch of {value.shape[batch_axis]} rows cannot be split over data x fsdp "
                        f"= {ways} devices; use a (micro-)batch size divisible by it.")
    out[name] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
  return out
