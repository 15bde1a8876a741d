"""Where adapters go: every linear layer of an NNX model, found by ONE walk of its graph.

A :class:`LinearSite` is an ``nnx.Linear`` or an adapter layer at a module path
(``model/layers/3/self_attn/q_proj``). Injection, the adapter file formats, the Hugging Face
export and the analysis all look modules up through :func:`linear_sites`, so they agree on what
a module is called. A stacked layer of a scanned model (``kernel (L, in, out)`` at
``model/layers/self_attn/q_proj``) stands for its L unrolled modules
(``model/layers/<i>/self_attn/q_proj``, :meth:`LinearSite.unrolled`), which is how files name
them, so a scanned and an unrolled model read and write the same adapter files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from smoa_jax.layers.dense import AdaptedDense
from smoa_jax.layers.paths import layer_path, module_path
from smoa_jax.layers.variables import retyped

__all__ = ["LinearSite", "linear_sites", "sites_by_name", "unrolled_sites", "adapter_layers",
           "replace_module", "retype_variable"]


@dataclasses.dataclass(frozen=True)
class LinearSite:
  """A linear layer of a model: its graph ``path`` and the ``module`` (Linear or adapter layer)."""

  path: tuple[Any, ...]
  module: nnx.Module

  @property
  def name(self) -> str:
    """The ``/``-joined module path."""
    return module_path(self.path)

  @property
  def adapted(self) -> bool:
    """An adapter layer with an active adapter (its arrays sit at the layer's own paths)."""
    return isinstance(self.module, AdaptedDense) and self.module.adapter_name is not None

  def holds(self, name: str) -> bool:
    """Whether the module is an adapter layer holding an adapter ``name`` (active or not)."""
    return isinstance(self.module, AdaptedDense) and name in self.module.adapter_names

  @property
  def shape(self) -> tuple[int, int]:
    """``(in, out)`` of the kernel (of each layer, for a stacked one)."""
    return tuple(self.module.kernel.shape[-2:])

  @property
  def num_layers(self) -> int | None:
    """L for a stacked kernel ``(L, in, out)`` of a scanned model, else None."""
    shape = self.module.kernel.shape
    return shape[0] if len(shape) == 3 else None

  def unrolled(self) -> list[tuple[str, int | None]]:
    """``(module name, layer index)`` of every layer this site holds: itself (index None), or
    the L unrolled names of a stacked layer (empty if its path has no layer container)."""
    if self.num_layers is None:
      return [(self.name, None)]
    names = [(layer_path(self.name, i), i) for i in range(self.num_layers)]
    return [] if any(n is None for n, _ in names) else names


def linear_sites(model: nnx.Module) -> list[LinearSite]:
  """Every ``nnx.Linear`` and adapter layer of ``model`` in tree order (shared modules once)."""
  return [LinearSite(tuple(path), node) for path, node in nnx.iter_graph(model)
          if isinstance(node, (nnx.Linear, AdaptedDense))]


def sites_by_name(model: nnx.Module) -> dict[str, LinearSite]:
  """:func:`linear_sites` by module path."""
  return {site.name: site for site in linear_sites(model)}


def unrolled_sites(model: nnx.Module) -> dict[str, tuple[LinearSite, int | None]]:
  """Unrolled module name -> ``(site, layer index or None)``: a stacked layer at
  ``model/layers/self_attn/q_proj`` answers for every ``model/layers/<i>/self_attn/q_proj``."""
  return {name: (site, index) for site in linear_sites(model) for name, index in site.unrolled()}


def adapter_layers(model: nnx.Module) -> list[tuple[str, AdaptedDense]]:
  """Every adapter layer of ``model`` with an active adapter, with its ``/``-joined path, in tree
  order."""
  return [(site.name, site.module) for site in linear_sites(model) if site.adapted]


def _parent(model: nnx.Module, path: tuple[Any, ...]) -> Any:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  return parent


def replace_module(model: nnx.Module, path: tuple[Any, ...], new: Any) -> None:
  """Put ``new`` at ``path`` (a module or a Variable), in place."""
  parent = _parent(model, path)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def retype_variable(model: nnx.Module, path: tuple[Any, ...], cls: type[nnx.Variable]) -> None:
  """Re-type the Variable at ``path`` to ``cls``, keeping its value and metadata (no copy)."""
  parent = _parent(model, path)
  old = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
  replace_module(model, path, retyped(old, cls))
