"""Sharding rules for NNX models: which mesh axes every parameter is split over.

A rule is ``(regex, spec)``: the regex is full-matched against a Variable's ``/``-joined path
(``model/layers/3/self_attn/q_proj/kernel``), ``spec`` names a mesh axis (or None) per array
axis. The first matching rule wins; an unmatched Variable is replicated. Each model family
publishes its table as the class attribute ``sharding_rules`` (see :mod:`smoa_jax.models`), in
the Megatron pattern: column-parallel kernels (q/k/v, gate/up, fc) ``("fsdp", "tp")``,
row-parallel kernels (o, down, proj) ``("tp", "fsdp")``, embeddings ``("tp", "fsdp")`` (vocab
over tp), norms and row-parallel biases replicated.

Beyond the rules:

* a Variable that already has ``out_sharding`` metadata keeps it (users may annotate by hand);
* a stacked layer (``nnx.scan`` models: one more leading axis than the rule's spec) gets None on
  the layer axis;
* adapter factors inherit their kernel's spec (:func:`smoa_jax.layers.dense.factor_specs`): ``lora_a``
  takes the kernel's ``in`` axis, ``lora_b`` its ``out`` axis, block and rank axes replicated;
  spectral permutations and rng state are replicated;
* every spec is fitted to the mesh (:func:`smoa_jax.parallel.sharding.fit_spec`): an axis whose length
  does not divide the mesh axis size is replicated instead.

:func:`shard_model` writes the fitted specs as ``out_sharding`` metadata (``eager_sharding``
off, so no mesh context is needed when Flax re-creates a Variable) and places each array
accordingly; :func:`smoa_jax.from_hf` does the same while loading, tensor by tensor.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from smoa_jax.parallel import sharding
from smoa_jax.errors import ConfigError
from smoa_jax.layers.dense import factor_specs
from smoa_jax.layers.sites import linear_sites
from smoa_jax.layers.variables import SpectralIndex

__all__ = ["Rule", "model_rules", "rule_spec", "sharding_plan", "annotate", "shard_model"]

Rule = tuple[str, sharding.Spec]


def _path(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def model_rules(model: nnx.Module) -> tuple[Rule, ...]:
  """The model family's ``sharding_rules`` (empty for other models: everything replicated)."""
  return tuple(getattr(type(model), "sharding_rules", ()))


def rule_spec(path: str, shape: Sequence[int], rules: Sequence[Rule]) -> sharding.Spec:
  """The spec of the first rule matching ``path`` (None on a stacked leading axis), else replicated.

  Raises:
    ConfigError: the matching rule's spec fits neither the array's rank nor rank - 1.
  """
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      spec = tuple(spec)
      if len(shape) == len(spec) + 1:  # stacked layers: the leading axis is the layer index
        return (None, *spec)
      if len(shape) != len(spec):
        raise ConfigError(f"sharding rule {pattern!r} -> {spec} matches {path} of shape "
                          f"{tuple(shape)}, which has another rank; fix the rule's spec.")
      return spec
  return (None,) * len(shape)


def _array_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {_path(p): v for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable) and hasattr(v.get_value(), "shape")}


def sharding_plan(model: nnx.Module, mesh: Mesh,
                  rules: Sequence[Rule] | None = None) -> dict[str, sharding.Spec]:
  """The fitted spec of every array Variable of ``model`` by path (see the module docstring).

  ``rules`` default to :func:`model_rules`. Works on abstract models (``nnx.eval_shape``).
  """
  rules = model_rules(model) if rules is None else tuple(rules)
  variables = _array_variables(model)
  adapters = {site.name: site.module for site in linear_sites(model) if site.adapted}
  plan: dict[str, sharding.Spec] = {}

  def spec_of(path: str) -> sharding.Spec:
    if path in plan:
      return plan[path]
    var = variables[path]
    spec = var.get_metadata("out_sharding", None)
    parent, _, leaf = path.rpartition("/")
    if spec is None and parent in adapters and leaf in ("lora_a", "lora_b"):
      layer = adapters[parent]
      kernel_path = f"{parent}/kernel" if parent else "kernel"  # a layer at the model's root
      a_spec, b_spec = factor_specs(spec_of(kernel_path), len(layer.lora_a.shape))
      spec = a_spec if leaf == "lora_a" else b_spec
    elif spec is None and isinstance(var, (SpectralIndex, nnx.RngState)):
      spec = (None,) * len(var.shape)
    elif spec is None:
      spec = rule_spec(path, var.shape, rules)
    plan[path] = sharding.fit_spec(spec, var.shape, mesh)
    return plan[path]

  for path in variables:
    spec_of(path)
  return plan


def annotate(model: nnx.Module, mesh: Mesh, rules: Sequence[Rule] | None = None) -> nnx.Module:
  """Write :func:`sharding_plan` as ``out_sharding`` metadata (``eager_sharding`` off); no data moves."""
  plan = sharding_plan(model, mesh, rules)
  for path, var in _array_variables(model).items():
    var.set_metadata("out_sharding", plan[path])
    var.set_metadata("eager_sharding", False)
  return model


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[Rule] | None = None) -> nnx.Module:
  """Annotate ``model`` (:func:`annotate`) and lay every concrete array out on ``mesh``, in place.

  Idempotent and cheap when the arrays are already placed; call it again after changing the
  model on the host (e.g. :func:`smoa_jax.load_adapter` assigns host arrays). Returns ``model``.

  Example::

    mesh = smoa_jax.make_mesh(fsdp=2, tp=4)
    model = smoa_jax.shard_model(model, mesh)       # or smoa_jax.from_hf(path, mesh=mesh)
    model.model.layers[0].self_attn.q_proj.kernel[...].sharding.spec   # P("fsdp", "tp")
  """
  annotate(model, mesh, rules)
  for var in _array_variables(model).values():
    value = var.get_value()
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, jax.core.Tracer):
      var.set_value(sharding.place(value, sharding.named(mesh, var.get_metadata("out_sharding"))))
  return model
