"""Resumable training state with orbax-checkpoint: adapter params, optimizer state, rng, data position.

What a checkpoint holds (never the frozen base model):

* ``params``   -- every trainable array (``TrainableParam``), flattened by key path;
* ``opt_state`` -- the optimizer state (moments exist only for trainable arrays);
* ``rng``      -- the model's rng streams (adapter dropout), so a resumed run draws the same masks;
* ``spectral`` -- the SMoA permutations (tiny; restoring them avoids any recomputation drift);
* ``meta``     -- JSON: step, data position (epoch, batch index), seed, anything the loop adds.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints valid; ``max_to_keep`` prunes old ones.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from smoa_jax.errors import CheckpointError
from smoa_jax.io.files import as_path

__all__ = ["TrainCheckpointer", "flatten_tree", "unflatten_like"]


def flatten_tree(tree: Any) -> dict[str, Any]:
  """``{keystr(path): leaf}``: a flat dict orbax can store whatever the pytree node types are."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_like(flat: dict[str, Any], template: Any, what: str) -> Any:
  """Inverse of :func:`flatten_tree` onto ``template``'s structure; every key must be present."""
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  keys = [jax.tree_util.keystr(p) for p, _ in paths_and_leaves]
  missing = [k for k in keys if k not in flat]
  unexpected = sorted(set(flat) - set(keys))
  if missing or unexpected:
    raise CheckpointError(f"checkpoint {what} does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]} (was it written for another config?).")
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def _abstract(flat: dict[str, Any]) -> dict[str, Any]:
  return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
          for k, v in flat.items()}


class TrainCheckpointer:
  """Save/restore training state under ``directory`` (one orbax step directory per save), local
  or on object storage (``gs://bucket/run/checkpoints``, through orbax's own ``etils.epath``)."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
    self.directory = as_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, *, params: Any, opt_state: Any, rng: Any, spectral: Any,
           meta: dict[str, Any]) -> None:
    """Write step ``step`` (synchronously; the directory appears only once complete)."""
    trees = {"params": params, "opt_state": opt_state, "rng": rng, "spectral": spectral}
    # Empty trees (no dropout rng, no SMoA permutations) are not stored; restore skips them too.
    args = {name: ocp.args.StandardSave(flatten_tree(tree)) for name, tree in trees.items()
            if jax.tree.leaves(tree)}
    self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args),
                       force=True)
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, step: int | None = None, *, params: Any, opt_state: Any, rng: Any,
              spectral: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore ``step`` (default: latest) onto the given templates.

    Returns ``(trees, meta)`` where ``trees`` has the keys ``params``, ``opt_state``, ``rng``,
    ``spectral`` with the templates' structures.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint to resume from in {self.directory}.")
    templates = {"params": params, "opt_state": opt_state, "rng": rng, "spectral": spectral}
    args = {name: ocp.args.StandardRestore(_abstract(flatten_tree(t))) for name, t in templates.items()
            if jax.tree.leaves(t)}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                                                                     **args))
    except (FileNotFoundError, ValueError, KeyError) as err:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored onto "
                            f"this model ({type(err).__name__}: {err}).") from err
    trees = {name: unflatten_like(dict(restored[name]), t, name) if name in args else t
             for name, t in templates.items()}
    return trees, dict(restored["meta"])

  def close(self) -> None:
    self._manager.close()
