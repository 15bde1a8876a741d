"""Portable adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT-style names).

Layout of a saved adapter directory (the shared names and the factor codec are
:mod:`smoa_jax.io.formats`)::

    adapter_config.json        method, r, num_blocks, branch_ranks, alpha, dropout, target_modules,
                               library version, and per module: shape, block sizes, ranks and a
                               fingerprint of the base kernel the adapter was trained on
    adapter_model.safetensors  torch layout, PEFT names, e.g. for module model/layers/0/self_attn/q_proj
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_A.<k>.weight  (r_k, |C_k|)
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_B.<k>.weight  (|R_k|, r_k)
                                 base_model.model.model.layers.0.self_attn.q_proj.smoa_in_perm       (in,)  int32
                                 base_model.model.model.layers.0.self_attn.q_proj.smoa_out_perm      (out,) int32
                               (LoRA / HiRA: ``lora_A.weight (r, in)``, ``lora_B.weight (out, r)``;
                               other trainable arrays -- fully fine-tuned kernels, task heads --
                               under ``base_model.model.<path>`` in Flax layout)

The per-block ``lora_A.<k>`` / ``lora_B.<k>`` tensors are exactly the authors' PyTorch layout
(``A_k = a_k^T``, ``B_k = b_k^T``), so their factors need no reshuffling; the stored permutations
make loading free of any spectral recomputation (the preprocessing is done once per base model).
A stacked (scanned) adapter layer is stored layer by layer under the unrolled module names, so
the files of a scanned and an unrolled model are the same.

Loading checks everything before touching the model: the config fits, every module exists and
has the recorded shape, its kernel matches the recorded fingerprint (a different base model is
refused, naming the first mismatching module), and the tensor set is exactly the expected one
(missing and unexpected keys are both errors).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import save_file

from smoa_jax.core.config import AdapterConfig, config_from_dict
from smoa_jax.core.spectral import SpectralBlocks
from smoa_jax.errors import AdapterMismatchError, CheckpointError, SMoAError
from smoa_jax.io import formats
from smoa_jax.io.files import as_path, atomic_directory
from smoa_jax.layers.dense import AdaptedDense
from smoa_jax.layers.inject import (AdapterReport, adapt_modules, loading_adapter, mark_trainable,
                                    using_adapter)
from smoa_jax.layers.paths import module_path
from smoa_jax.layers.sites import LinearSite, adapter_layers, linear_sites, unrolled_sites
from smoa_jax.layers.stacked import stack_blocks
from smoa_jax.layers.variables import TrainableParam
from smoa_jax.parallel.sharding import to_host

__all__ = ["save_adapter", "load_adapter", "read_adapter", "kernel_fingerprint"]

FORMAT_VERSION = 1
# adapter_config.json keys that describe the file, not the adapter config.
_META_KEYS = ("library", "library_version", "format_version", "modules", "trainable_arrays")
_FINGERPRINT_SAMPLES = 16
# bf16 vs fp32 copies of one base model must still match: compare at bf16 resolution.
_FINGERPRINT_RTOL = 1e-2


def kernel_fingerprint(kernel: jax.Array) -> dict[str, Any]:
  """A cheap identity check of a base kernel: shape, Frobenius norm and 16 fixed entries.

  Computed on the device (no host copy of the kernel); tolerant to dtype casts (bf16 vs fp32 of
  the same weights match), not to different weights.
  """
  flat = jnp.ravel(kernel).astype(jnp.float32)
  positions = np.linspace(0, flat.shape[0] - 1, _FINGERPRINT_SAMPLES).astype(np.int64)
  return {"shape": list(kernel.shape), "norm": float(jnp.sqrt(jnp.sum(jnp.square(flat)))),
          "samples": [float(v) for v in np.asarray(flat[positions])]}


def _fingerprints_match(saved: dict[str, Any], now: dict[str, Any]) -> bool:
  if list(saved["shape"]) != list(now["shape"]):
    return False
  norm = max(saved["norm"], 1e-30)
  if abs(now["norm"] - saved["norm"]) > _FINGERPRINT_RTOL * norm:
    return False
  rms = norm / np.sqrt(max(np.prod(saved["shape"]), 1))
  diff = np.abs(np.asarray(now["samples"]) - np.asarray(saved["samples"]))
  return bool(np.all(diff <= _FINGERPRINT_RTOL * (rms + np.abs(saved["samples"]))))


def _perm_keys(name: str) -> tuple[str, str]:
  return f"{formats.module_key(name)}.smoa_in_perm", f"{formats.module_key(name)}.smoa_out_perm"


# -- save ------------------------------------------------------------------------------------------
def _layer_entries(site: LinearSite, config: AdapterConfig
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``adapter_config.json`` entries and tensors of an adapter layer, one per held layer."""
  layer: AdaptedDense = site.module
  unrolled = site.unrolled()
  if not unrolled:
    raise AdapterMismatchError(f"stacked adapter layer {site.name!r} has no layer container in "
                               "its path, so its layers have no names to be saved under.")
  a, b = to_host(layer.lora_a[...]), to_host(layer.lora_b[...])
  perms = (to_host(layer.in_perm[...]), to_host(layer.out_perm[...])) if config.spectral_order else None
  base, layout = layer.base_kernel(), layer.op.layout
  entries, tensors = {}, {}
  for name, i in unrolled:
    pick = (lambda x: x) if i is None else (lambda x, i=i: x[i])
    entries[name] = {
        "in_features": layer.in_features, "out_features": layer.out_features,
        "in_sizes": list(layout.in_sizes), "out_sizes": list(layout.out_sizes),
        "ranks": list(layout.ranks), "fingerprint": kernel_fingerprint(pick(base))}
    tensors.update(formats.encode_factors(name, layer.op, pick(a), pick(b),
                                          per_block=config.spectral_order))
    if perms is not None:
      in_key, out_key = _perm_keys(name)
      tensors[in_key], tensors[out_key] = (pick(p).astype(np.int32) for p in perms)
  return entries, tensors


def _extra_trainables(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
  """``TrainableParam`` arrays outside adapter layers (fully fine-tuned kernels, trainable heads)."""
  adapted = {site.path for site in linear_sites(model) if site.adapted}
  return [(module_path(p), v) for p, v in nnx.iter_graph(model)
          if isinstance(v, TrainableParam) and tuple(p[:-1]) not in adapted]


def save_adapter(model: nnx.Module, path: str | os.PathLike, *,
                 config: AdapterConfig | None = None, name: str | None = None) -> epath.Path:
  """Write the model's adapter (factors, permutations, fingerprints, config) to directory ``path``.

  The active adapter, or adapter ``name`` of a model holding several (the file is the same as
  for a model holding only that one: load it under any name).

  Trainable arrays outside adapter layers (``FullFineTuneConfig`` kernels, heads made trainable
  with ``mark_trainable``) are saved too, under ``base_model.model.<path>`` in Flax layout. A
  stacked (scanned) adapter layer is saved layer by layer under the unrolled module names, so the
  file is the same for a scanned and an unrolled model. The write is atomic: a failure leaves no
  partial directory (and an existing one untouched). With several processes every process must
  call this (arrays are gathered); process 0 writes. ``config`` defaults to the config of the
  adapter layers (pass it for full fine-tuning).

  Raises:
    AdapterMismatchError: the model holds nothing trainable, adapters of different configs, or
      no adapter ``name``.
  """
  if name is not None:
    with using_adapter(model, name):
      return save_adapter(model, path, config=config)
  sites = [site for site in linear_sites(model) if site.adapted]
  extras = _extra_trainables(model)
  configs = {site.module.config for site in sites}
  if len(configs) > 1:
    raise AdapterMismatchError(f"the model holds adapters of {len(configs)} different configs; "
                               "save_adapter stores one adapter config per directory.")
  if config is None:
    if not configs:
      raise AdapterMismatchError(
          "the model has no adapter layers: call smoa_jax.apply_adapter first (for fully "
          "fine-tuned kernels pass config=FullFineTuneConfig(...)).")
    config = configs.pop()
  if not sites and not extras:
    raise AdapterMismatchError("the model has nothing trainable to save.")
  modules: dict[str, Any] = {}
  tensors: dict[str, np.ndarray] = {}
  for site in sites:
    entries, layer_tensors = _layer_entries(site, config)
    modules.update(entries)
    tensors.update(layer_tensors)
  trainable_arrays = {}
  for name, variable in extras:
    trainable_arrays[name] = list(variable.shape)
    tensors[formats.module_key(name)] = to_host(variable[...]).astype(np.float32)
  from smoa_jax import __version__
  document = {**config.to_dict(), "library": "smoa-jax", "library_version": __version__,
              "format_version": FORMAT_VERSION, "modules": modules,
              "trainable_arrays": trainable_arrays}

  if jax.process_index() == 0:  # every process gathered the arrays above; one writes them
    with atomic_directory(path) as staged:
      (staged / formats.CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")
      save_file(tensors, str(staged / formats.SAFETENSORS_NAME), metadata={"format": "smoa-jax"})
  return as_path(path)


# -- load ------------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(adapter_config dict, tensors)`` of a saved portable adapter directory, with clear errors."""
  document = formats.read_config(path)
  formats.expect_format(path, document, "portable")
  return document, formats.read_tensors(path)


@dataclasses.dataclass
class _Saved:
  """A portable adapter as read from disk, its config and key set already checked."""

  where: str
  config: AdapterConfig
  modules: dict[str, dict[str, Any]]  # unrolled module name -> entry
  extras: dict[str, list[int]]        # trainable array path -> shape
  tensors: dict[str, np.ndarray]


def _expected_keys(name: str, config: AdapterConfig, entry: dict[str, Any]) -> set[str]:
  keys = set(formats.factor_keys(name, entry["ranks"], per_block=config.spectral_order))
  return keys | set(_perm_keys(name)) if config.spectral_order else keys


def _read_saved(path: str | os.PathLike) -> _Saved:
  document, tensors = read_adapter(path)
  try:
    config = config_from_dict({k: v for k, v in document.items() if k not in _META_KEYS})
  except SMoAError as err:
    raise CheckpointError(f"{path}/{formats.CONFIG_NAME}: {err}") from err
  modules: dict[str, Any] = document.get("modules") or {}
  extras: dict[str, Any] = document.get("trainable_arrays") or {}
  if not modules and not extras:
    raise CheckpointError(f"{path}/{formats.CONFIG_NAME} lists no adapted modules or trainable "
                          "arrays.")
  expected = set().union(*(_expected_keys(n, config, e) for n, e in modules.items()),
                         {formats.module_key(n) for n in extras})
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    raise AdapterMismatchError(f"{path}/{formats.SAFETENSORS_NAME} does not match its config: "
                               f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}.")
  return _Saved(str(path), config, modules, extras, tensors)


def _check_layer_fits(layer: AdaptedDense, name: str, config: AdapterConfig,
                      entry: dict[str, Any]) -> None:
  """An adapter layer already in the model must have the saved method and block/rank structure."""
  if layer.config.method != config.method:
    raise AdapterMismatchError(f"module {name!r} carries a {layer.config.method} adapter, but the "
                               f"saved adapter is {config.method}.")
  layout = layer.op.layout
  ours = {"ranks": list(layout.ranks), "in_sizes": list(layout.in_sizes),
          "out_sizes": list(layout.out_sizes)}
  theirs = {k: entry.get(k) for k in ours if entry.get(k) is not None}
  if {k: ours[k] for k in theirs} != theirs:
    raise AdapterMismatchError(f"module {name!r}: the model's adapter has {ours} but the saved one "
                               f"has {theirs} (different r, num_blocks or branch_ranks).")


def _match_modules(model: nnx.Module, saved: _Saved) -> dict[str, list[str]]:
  """Site name -> the saved unrolled names it holds (in layer order), after checking that every
  saved module exists with its shape, its base kernel's fingerprint and a fitting adapter."""
  units = unrolled_sites(model)
  groups: dict[str, list[str]] = defaultdict(list)
  for name, entry in saved.modules.items():
    if name not in units:
      raise AdapterMismatchError(f"the adapter targets module {name!r}, which the model does not "
                                 "have: is this the base model the adapter was trained on?")
    site, index = units[name]
    shape = (entry["in_features"], entry["out_features"])
    if site.shape != shape:
      raise AdapterMismatchError(f"module {name!r}: kernel shape {site.shape} but the adapter was "
                                 f"trained on {shape}.")
    if site.adapted:
      _check_layer_fits(site.module, name, saved.config, entry)
    base = site.module.base_kernel() if site.adapted else site.module.kernel[...]
    now = kernel_fingerprint(base if index is None else base[index])
    if "fingerprint" in entry and not _fingerprints_match(entry["fingerprint"], now):
      raise AdapterMismatchError(
          f"module {name!r}: its kernel differs from the one the adapter was trained on (norm "
          f"{now['norm']:.6g} vs {entry['fingerprint']['norm']:.6g}); refusing to load onto a "
          "different base model.")
    groups[site.name].append(name)
  for site_name, names in groups.items():
    site, _ = units[names[0]]
    if site.num_layers and len(names) != site.num_layers:
      raise AdapterMismatchError(
          f"{site_name!r} holds {site.num_layers} stacked (scanned) layers, but the adapter has "
          f"only {len(names)} of them; load it into the unrolled model (scan_layers=False).")
    groups[site_name] = sorted(names, key=lambda n: units[n][1] or 0)
  return dict(groups)


def _saved_blocks(saved: _Saved, groups: dict[str, list[str]]) -> dict[str, SpectralBlocks]:
  """The stored spectral blocks of every site (stacked for scanned layers); empty if the
  method does not use a spectral order."""
  if not saved.config.spectral_order:
    return {}
  per_module = {}
  for name, entry in saved.modules.items():
    perms = []
    for key, n in zip(_perm_keys(name), (entry["in_features"], entry["out_features"])):
      perm = formats.checked_tensor(saved.tensors, key, (n,))
      if sorted(perm.tolist()) != list(range(n)):
        raise AdapterMismatchError(f"{key}: stored permutation is not a permutation of "
                                   f"0..{n - 1}.")
      perms.append(jnp.asarray(perm, jnp.int32))
    per_module[name] = SpectralBlocks(*perms, tuple(entry["in_sizes"]), tuple(entry["out_sizes"]))
  return {site: per_module[names[0]] if len(names) == 1 and names[0] == site
          else stack_blocks([per_module[n] for n in names]) for site, names in groups.items()}


def _check_extras(model: nnx.Module, saved: _Saved) -> None:
  variables = {module_path(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  for name, shape in saved.extras.items():
    if name not in variables:
      raise AdapterMismatchError(f"the adapter holds trainable array {name!r}, which the model "
                                 "lacks.")
    formats.checked_tensor(saved.tensors, formats.module_key(name), tuple(variables[name].shape))
    if tuple(shape) != tuple(variables[name].shape):
      raise AdapterMismatchError(f"{name!r}: shape {tuple(variables[name].shape)} in the model, "
                                 f"{tuple(shape)} in the adapter.")


def _set_like(variable: nnx.Variable, value: np.ndarray) -> None:
  """Assign host ``value`` keeping the Variable's dtype and device layout (sharded or not)."""
  current = variable[...]
  value = np.asarray(value).astype(current.dtype)
  sharding = getattr(current, "sharding", None)
  if sharding is not None and not sharding.is_fully_replicated:
    variable.set_value(jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx]))
  else:
    variable[...] = jnp.asarray(value)


def _assign_factors(model: nnx.Module, saved: _Saved, groups: dict[str, list[str]],
                    blocks: dict[str, SpectralBlocks]) -> None:
  """Write the saved factors (and permutations) into the model's adapter layers."""
  layers = dict(adapter_layers(model))
  for site_name, names in groups.items():
    layer = layers[site_name]
    pairs = [formats.decode_factors(n, layer.op, saved.tensors,
                                    per_block=saved.config.spectral_order) for n in names]
    stacked = layer.num_layers is not None
    values = [np.stack(v) if stacked else v[0] for v in zip(*pairs)]
    targets = [layer.lora_a, layer.lora_b]
    if saved.config.spectral_order:
      values += [np.asarray(blocks[site_name].in_perm), np.asarray(blocks[site_name].out_perm)]
      targets += [layer.in_perm, layer.out_perm]
    for variable, value in zip(targets, values):
      _set_like(variable, value)


def _assign_extras(model: nnx.Module, saved: _Saved) -> None:
  variables = {module_path(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  frozen = [n for n in saved.extras if not isinstance(variables[n], TrainableParam)]
  if frozen:
    mark_trainable(model, "|".join(map(re.escape, frozen)))
  variables = {module_path(p): v for p, v in nnx.iter_graph(model)
               if isinstance(v, TrainableParam)}
  for name in saved.extras:
    _set_like(variables[name], saved.tensors[formats.module_key(name)])


def load_adapter(model: nnx.Module, path: str | os.PathLike, *,
                 rngs: nnx.Rngs | None = None, verbose: bool = False,
                 name: str | None = None) -> AdapterReport | None:
  """Load a saved adapter into ``model`` (in place); inject the layers first if they are absent.

  If the model already carries the adapter (``name``, default ``"default"``) it must match the
  saved config (method, ranks, blocks); otherwise the saved modules are adapted now, using the
  stored permutations (no spectral recomputation). Other adapters the model holds stay (see
  ``smoa_jax.set_adapter``); the loaded one becomes active. ``rngs`` drives adapter dropout
  (default ``nnx.Rngs(0)``).

  Returns the injection report, or None when every module already carried its adapter.

  Raises:
    CheckpointError: missing/unreadable files.
    AdapterMismatchError: different base model (fingerprint), wrong method/K/r, unknown modules,
      missing or unexpected tensors, wrong shapes; trainable arrays outside adapter layers
      (heads) into a model that holds other adapters.
  """
  saved = _read_saved(path)
  with loading_adapter(model, name, extras=list(saved.extras)) as name:
    groups = _match_modules(model, saved)
    _check_extras(model, saved)
    blocks = _saved_blocks(saved, groups)
    sites = {site.name: site for site in linear_sites(model)}
    fresh = [n for n in groups if not sites[n].adapted]
    report = None
    if fresh:
      report = adapt_modules(model, saved.config, fresh, rngs=rngs or nnx.Rngs(0),
                             verbose=verbose, blocks=blocks, name=name)
    _assign_factors(model, saved, groups, blocks)
    _assign_extras(model, saved)
  return report
