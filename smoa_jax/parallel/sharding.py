"""Device meshes, partition specs and data placement for SPMD training (single host or multi-host).

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
with parameters sharded over it) and ``tp`` (tensor parallelism). Batches are split over
``("data", "fsdp")``.

A *spec* is a tuple with one entry per array axis: a mesh axis name, a tuple of names, or None
(replicated) -- the arguments of a ``PartitionSpec``. :func:`fit_spec` replaces an entry by None
where the axis length does not divide by the mesh axis size, so any model runs on any mesh (that
axis is then replicated instead of split; :func:`smoa_jax.sharding_plan` shows the specs used).

:func:`place` puts an array on a ``NamedSharding`` without ever building a full copy per device:
a host array goes through ``jax.make_array_from_callback`` (each device receives its slice), a
device array through ``jax.device_put`` (a reshard). Under multi-process JAX every process must
pass the same value. This module knows nothing of Flax; :mod:`smoa_jax.parallel.spmd` applies it to models.

Multi-process JAX (:func:`initialize_distributed`): one process per host (or per GPU), all
driving one global mesh. Every process runs the same program; after initialization
``jax.devices()`` lists the devices of all processes, :func:`make_mesh` spans them, and
``from_hf(..., mesh=...)``, :func:`smoa_jax.train` and the orbax checkpoints work unchanged (each
process reads, computes and writes only the shards of its own devices; only process 0 writes
``metrics.jsonl``). Where the settings come from, first found wins, per setting:

1. the arguments (the CLI's ``--coordinator-address``, ``--num-processes``, ``--process-id``);
2. ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
3. JAX's launcher detection, for settings still missing: Slurm (``srun``: ``SLURM_JOB_ID``,
   ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``), Open MPI
   (``mpirun``: ``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK``),
   Cloud TPU pod slices (the TPU VM metadata server; on GKE ``TPU_WORKER_HOSTNAMES`` and
   ``TPU_WORKER_ID``).

With none of 1-2 set, the runtime is started only when a multi-process launcher is visible
(Slurm or Open MPI with more than one task, GKE TPU with more than one worker) or ``auto=True``
(Cloud TPU VM pod slices, whose topology comes from the metadata server, not the environment);
otherwise the run is single-process and nothing happens.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from smoa_jax.errors import ConfigError, DataError

__all__ = ["to_host", "AXES", "BATCH_AXES", "Spec", "parse_mesh", "make_mesh", "axis_size", "fit_spec",
           "named", "mesh_of", "place", "replicate", "batch_sharding", "shard_batch",
           "constrain_batch", "initialize_distributed", "is_main_process",
           "check_same_on_all_processes"]

AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")
Spec = tuple[str | tuple[str, ...] | None, ...]


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
  """A ``Mesh`` of shape ``(data, fsdp, tp)`` over ``devices`` (default: all global devices).

  Built by ``jax.make_mesh``, which knows the accelerator topology (on TPU it lays ``tp``, the
  innermost axis with the most traffic, over neighbouring chips; elsewhere devices are taken in
  ``jax.devices()`` order, so ``tp`` spans one host / one NVLink island), with every axis typed
  explicitly as ``AxisType.Auto`` (XLA propagates shardings; :func:`smoa_jax.train` constrains
  the batch).

  Multislice (devices of several TPU slices, told apart by ``device.slice_index``): a hybrid
  mesh (``mesh_utils.create_hybrid_device_mesh``) puts the slices on ``data``, the only axis
  that should cross the slow data-centre network between slices, and ``data / slices`` x
  ``fsdp`` x ``tp`` inside each slice; ``data`` must then be a multiple of the slice count.
  """
  devices = list(jax.devices() if devices is None else np.asarray(devices).ravel())
  wanted = data * fsdp * tp
  if wanted != len(devices):
    raise ConfigError(f"mesh data={data} x fsdp={fsdp} x tp={tp} = {wanted} devices, but "
                      f"{len(devices)} are available; make the product equal the device count.")
  axis_types = (AxisType.Auto,) * len(AXES)
  grid = _hybrid_grid((data, fsdp, tp), devices)
  if grid is not None:
    return Mesh(grid, AXES, axis_types=axis_types)
  return jax.make_mesh((data, fsdp, tp), AXES, axis_types=axis_types, devices=devices)


def _hybrid_grid(shape: tuple[int, int, int], devices: Sequence[Any]) -> np.ndarray | None:
  """The ``(data, fsdp, tp)`` device grid of a multislice mesh, slices over ``data`` (slice
  ``s`` holds rows ``s * data / slices`` onwards); None when the devices are one slice."""
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return None
  data, fsdp, tp = shape
  if data % slices:
    raise ConfigError(f"the devices span {slices} slices, so the data axis must be a multiple of "
                      f"{slices} (only data parallelism should cross the network between "
                      f"slices), got data={data}; e.g. --mesh data={slices},fsdp=N,tp=M with "
                      f"{slices} x N x M devices.")
  from jax.experimental import mesh_utils

  return mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tp), (slices, 1, 1), devices)


def axis_size(mesh: Mesh | Any, entry: str | tuple[str, ...] | None) -> int:
  """Number of devices a spec entry splits over (1 for None)."""
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh | Any) -> Spec:
  """``spec`` with every entry whose axis length does not divide by its mesh size set to None.

  Raises:
    ConfigError: ``spec`` has another length than ``shape``, or names an axis ``mesh`` lacks.
  """
  spec = tuple(spec)
  if len(spec) != len(shape):
    raise ConfigError(f"sharding spec {spec} has {len(spec)} entries for an array of shape "
                      f"{tuple(shape)}; give one mesh axis (or None) per array axis.")
  for entry in spec:
    for name in ((entry,) if isinstance(entry, str) else entry or ()):
      if name not in mesh.shape:
        raise ConfigError(f"sharding spec {spec} names mesh axis {name!r}, but the mesh has axes "
                          f"{tuple(mesh.shape)}.")
  return tuple(e if n % axis_size(mesh, e) == 0 else None for e, n in zip(spec, shape))


def named(mesh: Mesh, spec: Sequence[Any]) -> NamedSharding:
  """``NamedSharding(mesh, PartitionSpec(*spec))``."""
  return NamedSharding(mesh, P(*spec))


def mesh_of(value: Any) -> Mesh | None:
  """The mesh a concrete array is laid out on (None for host arrays, tracers, single devices)."""
  if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array):
    return None
  sharding = value.sharding
  return sharding.mesh if isinstance(sharding, NamedSharding) else None


def place(value: Any, sharding: NamedSharding) -> jax.Array:
  """``value`` laid out as ``sharding``, with no per-device full copy (see the module docstring).

  A device array already laid out that way is returned as is.
  """
  if isinstance(value, jax.Array):
    if value.sharding.is_equivalent_to(sharding, value.ndim):
      return value
    return jax.device_put(value, sharding)
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array leaf of ``tree`` replicated over all devices of ``mesh``."""
  return jax.tree.map(lambda x: place(x, named(mesh, (None,) * np.ndim(x))), tree)


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


def constrain_batch(x: jax.Array, batch_axis: int = 0) -> jax.Array:
  """Activation constraint: ``x``'s batch axis split over ``data`` x ``fsdp``, the rest replicated.

  A no-op unless traced under ``jax.set_mesh(mesh)`` with a mesh holding both batch axes (as
  :func:`smoa_jax.train` does) and the batch divides; it keeps XLA from resharding hidden states
  ``(B, T, hidden)`` between layers onto the tensor-parallel axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  if x.shape[batch_axis] % axis_size(mesh, BATCH_AXES):
    return x
  return jax.lax.with_sharding_constraint(x, P(*([None] * batch_axis), BATCH_AXES))


# -- multi-process -------------------------------------------------------------------------------
def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  if not value.strip().isdigit():
    raise ConfigError(f"environment variable {name}={value!r} is not a non-negative integer.")
  return int(value)


def _launcher_processes() -> int:
  """Process count a multi-process launcher announces in the environment (1 if none)."""
  if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
    return _env_int("SLURM_NTASKS") or 1
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return _env_int("OMPI_COMM_WORLD_SIZE") or 1
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  return max(1, len([h for h in hosts.split(",") if h.strip()]))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
  """Start JAX's multi-process runtime if this run has several processes (see the module docstring).

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator (any free port, the same on
      every process), e.g. ``"10.0.0.1:1234"``.
    num_processes: total number of processes.
    process_id: this process's index in ``0 .. num_processes - 1``.
    auto: start the runtime and let JAX detect everything (Cloud TPU VM pod slices).

  Returns:
    True if the runtime is up (started now or before), False for a single-process run.

  Raises:
    ConfigError: bad values, or JAX was already used in this process (call this first, before
      ``jax.devices()``, loading a model or creating any array).
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if not (explicit or auto or _launcher_processes() > 1):
    return False
  if num_processes == 1:
    return False
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"num_processes={num_processes} is invalid: expected >= 1.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"process_id={process_id} is out of range for num_processes={num_processes}: "
                      f"expected 0 <= process_id < {num_processes}.")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except RuntimeError as err:
    raise ConfigError(f"cannot start multi-process JAX ({err}). Call "
                      "smoa_jax.initialize_distributed() before any other JAX call.") from err
  except ValueError as err:
    raise ConfigError(f"cannot start multi-process JAX: {err}. Give coordinator_address, "
                      "num_processes and process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                      "JAX_PROCESS_ID), or launch with srun / mpirun / on a TPU pod.") from err
  return True


_HOST_BYTES = 64  # of each host name, in a mismatch report


def check_same_on_all_processes(what: str, digest: str, counts: Sequence[int]) -> None:
  """Raise :class:`~smoa_jax.errors.DataError` unless every process holds the same ``what``.

  Each process passes the sha256 ``digest`` (hex) and the row ``counts`` of its own copy; one
  small all-gather compares them. A different copy would silently mix data across hosts, and a
  different row count would hang the job at its first uneven step; the error lists every
  process with its host, digest and counts. A no-op on a single process; otherwise a collective
  (every process must call it, with as many counts).
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  host = socket.gethostname().encode()[:_HOST_BYTES].ljust(_HOST_BYTES, b"\0")
  facts = np.concatenate([np.frombuffer(bytes.fromhex(digest), np.uint8).astype(np.int32),
                          np.asarray(counts, np.int32)])
  mine = np.concatenate([facts, np.frombuffer(host, np.uint8).astype(np.int32)])
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  compared = everyone[:, :len(facts)]  # host names differ, of course
  if (compared == compared[0]).all():
    return
  lines = []
  for i, row in enumerate(everyone):
    name = bytes(row[len(facts):].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
    lines.append(f"process {i} on {name}: sha256 {bytes(row[:32].astype(np.uint8)).hex()[:16]}..., "
                 f"rows {row[32:len(facts)].tolist()}")
  raise DataError(f"the {what} differs between processes:\n  " + "\n  ".join(lines)
                  + f"\nEvery host must read the same {what}: give every host the same files "
                  "(or a shared mount) and the same tokenizer.")


def is_main_process() -> bool:
  """True on process 0 (the one that writes shared files such as logs and exports)."""
  return jax.process_index() == 0


def to_host(value: Any) -> np.ndarray:
  """A host (numpy) copy of ``value``; an array spread over several processes is all-gathered
  first, which is a collective: every process must call this for the same arrays."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils

    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(value)
