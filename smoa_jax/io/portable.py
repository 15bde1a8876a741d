"""Portable adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT-style names).

Layout of a saved adapter directory::

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

Loading checks everything before touching the model: the config fits, every module exists and
has the recorded shape, its kernel matches the recorded fingerprint (a different base model is
refused, naming the first mismatching module), and the tensor set is exactly the expected one
(missing and unexpected keys are both errors).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from smoa_jax.core.config import AdapterConfig, SMoAConfig, config_from_dict
from smoa_jax.errors import AdapterMismatchError, CheckpointError, SMoAError
from smoa_jax.io.files import atomic_directory
from smoa_jax.layers.inject import AdapterReport, adapter_layers, apply_adapter, mark_trainable
from smoa_jax.layers.paths import layer_path, module_path
from smoa_jax.layers.dense import AdaptedDense, SMoADense, SMoAParam
from smoa_jax.core.ops import SMoAOp
from smoa_jax.core.spectral import SpectralBlocks
from smoa_jax.layers.stacked import stack_blocks

__all__ = ["save_adapter", "load_adapter", "read_adapter", "kernel_fingerprint", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
PREFIX = "base_model.model."
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


def _dotted(path: str) -> str:
  return PREFIX + path.replace("/", ".")


def _host(value: jax.Array) -> np.ndarray:
  """A host copy; arrays spread over several processes are all-gathered first (a collective)."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(value)


def _per_layer(name: str, layer: AdaptedDense) -> list[tuple[str, int | None]]:
  """``(module name, layer index)`` of every layer an adapter layer holds (L for stacked ones)."""
  if layer.num_layers is None:
    return [(name, None)]
  names = [layer_path(name, i) for i in range(layer.num_layers)]
  if None in names:
    raise AdapterMismatchError(f"stacked adapter layer {name!r} has no layer container in its path.")
  return list(zip(names, range(layer.num_layers)))


def _module_tensors(name: str, layer: AdaptedDense, a: np.ndarray, b: np.ndarray,
                    perms: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
  """Tensors of one (unstacked) layer: ``a``/``b`` as stored in the layer, ``perms`` for SMoA."""
  dotted = _dotted(name)
  if not isinstance(layer.op, SMoAOp):  # LoRA: a (in, r), b (r, out)
    return {f"{dotted}.lora_A.weight": a.T.copy(), f"{dotted}.lora_B.weight": b.T.copy()}
  if perms is None:  # HiRA: one unpermuted block
    return {f"{dotted}.lora_A.weight": a[0].T.copy(), f"{dotted}.lora_B.weight": b[0].T.copy()}
  layout = layer.op.layout
  out = {f"{dotted}.smoa_in_perm": perms[0].astype(np.int32),
         f"{dotted}.smoa_out_perm": perms[1].astype(np.int32)}
  for k, (c, o, r) in enumerate(zip(layout.in_sizes, layout.out_sizes, layout.ranks)):
    if r > 0:  # rank-0 blocks are frozen and have no tensors (as in the authors' code)
      out[f"{dotted}.lora_A.{k}.weight"] = a[k, :c, :r].T.copy()
      out[f"{dotted}.lora_B.{k}.weight"] = b[k, :r, :o].T.copy()
  return out


def _layer_entries(name: str, layer: AdaptedDense, config: AdapterConfig
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``adapter_config.json`` entries and tensors of an adapter layer, one per held layer."""
  a, b = _host(layer.lora_a[...]).astype(np.float32), _host(layer.lora_b[...]).astype(np.float32)
  perms = (_host(layer.in_perm[...]), _host(layer.out_perm[...])) if isinstance(layer, SMoADense) else None
  layout = getattr(layer.op, "layout", None)
  base = layer.base_kernel()
  entries, tensors = {}, {}
  for sub_name, i in _per_layer(name, layer):
    pick = (lambda x: x) if i is None else (lambda x: x[i])
    entries[sub_name] = {
        "in_features": layer.in_features, "out_features": layer.out_features,
        "in_sizes": list(layout.in_sizes) if layout else None,
        "out_sizes": list(layout.out_sizes) if layout else None,
        "ranks": list(layout.ranks) if layout else [config.r],
        "fingerprint": kernel_fingerprint(pick(base)),
    }
    tensors.update(_module_tensors(sub_name, layer, pick(a), pick(b),
                                   None if perms is None else (pick(perms[0]), pick(perms[1]))))
  return entries, tensors


def _extra_trainables(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
  """``SMoAParam`` arrays outside adapter layers (fully fine-tuned kernels, trainable heads)."""
  adapted = {p for p, m in nnx.iter_graph(model) if isinstance(m, AdaptedDense)}
  return [(module_path(p), v) for p, v in nnx.iter_graph(model)
          if isinstance(v, SMoAParam) and p[:-1] not in adapted]


def save_adapter(model: nnx.Module, path: str | os.PathLike, *,
                 config: AdapterConfig | None = None) -> Path:
  """Write the model's adapter (factors, permutations, fingerprints, config) to directory ``path``.

  Trainable arrays outside adapter layers (``FullFineTuneConfig`` kernels, heads made trainable
  with ``mark_trainable``) are saved too, under ``base_model.model.<path>`` in Flax layout. A
  stacked (scanned) adapter layer is saved layer by layer under the unrolled module names, so the
  file is the same for a scanned and an unrolled model. The write is atomic: a failure leaves no
  partial directory (and an existing one untouched). With several processes every process must
  call this (arrays are gathered); process 0 writes. ``config`` defaults to the config of the
  adapter layers (pass it for full fine-tuning).

  Raises:
    AdapterMismatchError: the model holds nothing trainable, or adapters of different configs.
  """
  layers = adapter_layers(model)
  extras = _extra_trainables(model)
  configs = {layer.config for _, layer in layers}
  if len(configs) > 1:
    raise AdapterMismatchError(f"the model holds adapters of {len(configs)} different configs; "
                               "save_adapter stores one adapter config per directory.")
  if config is None:
    if not configs:
      raise AdapterMismatchError(
          "the model has no adapter layers: call smoa_jax.apply_adapter first (for fully "
          "fine-tuned kernels pass config=FullFineTuneConfig(...)).")
    config = configs.pop()
  if not layers and not extras:
    raise AdapterMismatchError("the model has nothing trainable to save.")
  modules: dict[str, Any] = {}
  tensors: dict[str, np.ndarray] = {}
  for name, layer in layers:
    entries, layer_tensors = _layer_entries(name, layer, config)
    modules.update(entries)
    tensors.update(layer_tensors)
  trainable_arrays = {}
  for name, variable in extras:
    trainable_arrays[name] = list(variable.shape)
    tensors[_dotted(name)] = _host(variable[...]).astype(np.float32)
  from smoa_jax import __version__
  document = {**config.to_dict(), "library": "smoa-jax", "library_version": __version__,
              "format_version": FORMAT_VERSION, "modules": modules,
              "trainable_arrays": trainable_arrays}

  if jax.process_index() == 0:  # every process gathered the arrays above; one writes them
    with atomic_directory(path) as staged:
      (staged / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")
      save_file(tensors, str(staged / WEIGHTS_NAME), metadata={"format": "smoa-jax"})
  return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(adapter_config dict, tensors)`` of a saved adapter directory, with clear errors."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"adapter directory {str(path)!r} does not exist.")
  config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
  if not config_file.is_file():
    raise CheckpointError(f"{str(path)!r} is not an adapter directory: {CONFIG_NAME} is missing.")
  try:
    document = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise CheckpointError(f"{config_file} is not valid JSON ({err}).") from err
  if not isinstance(document, dict):
    raise CheckpointError(f"{config_file} must hold a JSON object.")
  if document.get("peft_type") == "SMOA" and document.get("library") != "smoa-jax":
    raise CheckpointError(f"{str(path)!r} holds an adapter saved by the authors' PyTorch SMoA code; "
                          "load it with smoa_jax.load_authors_adapter(model, path).")
  if not weights_file.is_file():
    raise CheckpointError(f"{str(path)!r} is not an adapter directory: {WEIGHTS_NAME} is missing.")
  try:
    tensors = load_file(str(weights_file))
  except (SafetensorError, OSError, ValueError) as err:
    raise CheckpointError(f"{weights_file} is not a readable safetensors file ({err}); it may be "
                          "truncated or corrupted: save the adapter again.") from err
  return document, tensors


def _expected_keys(name: str, config: AdapterConfig, entry: dict[str, Any]) -> set[str]:
  dotted = _dotted(name)
  if not isinstance(config, SMoAConfig):
    return {f"{dotted}.lora_A.weight", f"{dotted}.lora_B.weight"}
  keys = {f"{dotted}.smoa_in_perm", f"{dotted}.smoa_out_perm"}
  for k, r in enumerate(entry["ranks"]):
    if r > 0:
      keys |= {f"{dotted}.lora_A.{k}.weight", f"{dotted}.lora_B.{k}.weight"}
  return keys


def _check_tensor(key: str, tensors: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
  value = tensors[key]
  if tuple(value.shape) != tuple(shape):
    raise AdapterMismatchError(f"tensor {key} has shape {tuple(value.shape)}, expected {tuple(shape)}.")
  if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
    raise AdapterMismatchError(f"tensor {key} holds NaN or Inf values.")
  return value


def load_adapter(model: nnx.Module, path: str | os.PathLike, *,
                 rngs: nnx.Rngs | None = None, verbose: bool = False) -> AdapterReport | None:
  """Load a saved adapter into ``model`` (in place); inject the layers first if they are absent.

  If the model already carries adapter layers they must match the saved config (method, ranks,
  blocks); otherwise the saved modules are adapted now, using the stored permutations (no
  spectral recomputation). ``rngs`` drives adapter dropout (default ``nnx.Rngs(0)``).

  Raises:
    CheckpointError: missing/unreadable files.
    AdapterMismatchError: different base model (fingerprint), wrong method/K/r, unknown modules,
      missing or unexpected tensors, wrong shapes.
  """
  document, tensors = read_adapter(path)
  meta_keys = {"library", "library_version", "format_version", "modules", "trainable_arrays"}
  if document.get("library") != "smoa-jax":
    raise CheckpointError(f"{path} was not written by smoa-jax save_adapter (no 'library' key); "
                          "for the authors' PyTorch layout use smoa_jax.load_authors_adapter.")
  try:
    config = config_from_dict({k: v for k, v in document.items() if k not in meta_keys})
  except SMoAError as err:
    raise CheckpointError(f"{path}/{CONFIG_NAME}: {err}") from err
  modules: dict[str, Any] = document.get("modules") or {}
  extras: dict[str, Any] = document.get("trainable_arrays") or {}
  if not modules and not extras:
    raise CheckpointError(f"{path}/{CONFIG_NAME} lists no adapted modules or trainable arrays.")

  expected = set().union(*(_expected_keys(n, config, e) for n, e in modules.items()),
                         {_dotted(n) for n in extras})
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    raise AdapterMismatchError(f"{path}/{WEIGHTS_NAME} does not match its config: missing keys "
                               f"{missing[:10]}, unexpected keys {unexpected[:10]}.")

  targets = _targets(model)
  for name, entry in modules.items():
    if name not in targets:
      raise AdapterMismatchError(f"the adapter targets module {name!r}, which the model does not "
                                 "have: is this the base model the adapter was trained on?")
    module, layer, index = targets[name]
    shape = (entry["in_features"], entry["out_features"])
    if tuple(layer.kernel.shape[-2:]) != shape:
      raise AdapterMismatchError(f"module {name!r}: kernel shape {tuple(layer.kernel.shape[-2:])} but "
                                 f"the adapter was trained on {shape}.")
    if isinstance(layer, AdaptedDense):
      _check_layer_fits(layer, name, config, entry)
      base = layer.base_kernel()
    else:
      base = layer.kernel[...]
    base = base if index is None else base[index]
    if "fingerprint" in entry and not _fingerprints_match(entry["fingerprint"], kernel_fingerprint(base)):
      raise AdapterMismatchError(
          f"module {name!r}: its kernel differs from the one the adapter was trained on (norm "
          f"{kernel_fingerprint(base)['norm']:.6g} vs {entry['fingerprint']['norm']:.6g}); refusing to "
          "load onto a different base model.")
  by_module: dict[str, list[str]] = {}
  for name in modules:
    by_module.setdefault(targets[name][0], []).append(name)
  for module, names in by_module.items():
    layer = targets[names[0]][1]
    if len(layer.kernel.shape) == 3 and len(names) != layer.kernel.shape[0]:
      raise AdapterMismatchError(
          f"{module!r} holds {layer.kernel.shape[0]} stacked (scanned) layers, but the adapter has "
          f"only {len(names)} of them; load it into the unrolled model (scan_layers=False).")
    by_module[module] = sorted(names, key=lambda n: targets[n][2] or 0)

  blocks: dict[str, SpectralBlocks] = {}
  if isinstance(config, SMoAConfig):
    for name, entry in modules.items():
      dotted = _dotted(name)
      in_perm = _check_tensor(f"{dotted}.smoa_in_perm", tensors, (entry["in_features"],))
      out_perm = _check_tensor(f"{dotted}.smoa_out_perm", tensors, (entry["out_features"],))
      for perm, n in ((in_perm, entry["in_features"]), (out_perm, entry["out_features"])):
        if sorted(perm.tolist()) != list(range(n)):
          raise AdapterMismatchError(f"{dotted}: stored permutation is not a permutation of 0..{n - 1}.")
      blocks[name] = SpectralBlocks(jnp.asarray(in_perm, jnp.int32), jnp.asarray(out_perm, jnp.int32),
                                    tuple(entry["in_sizes"]), tuple(entry["out_sizes"]))

  variables = {module_path(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  for name, shape in extras.items():
    if name not in variables:
      raise AdapterMismatchError(f"the adapter holds trainable array {name!r}, which the model lacks.")
    _check_tensor(_dotted(name), tensors, tuple(variables[name].shape))
    if tuple(shape) != tuple(variables[name].shape):
      raise AdapterMismatchError(f"{name!r}: shape {tuple(variables[name].shape)} in the model, "
                                 f"{tuple(shape)} in the adapter.")

  report = None
  to_inject = [m for m, names in by_module.items()
               if not isinstance(targets[names[0]][1], AdaptedDense)]
  if to_inject:
    exact = "|".join(re.escape(n) for n in to_inject)
    inject_config = type(config)(**{**_init_kwargs(config), "target_modules": exact,
                                    "exclude_modules": None, "layers_to_transform": None})
    module_blocks = {m: (blocks[names[0]] if targets[names[0]][2] is None
                         else stack_blocks([blocks[n] for n in names]))
                     for m, names in by_module.items() if blocks}
    report = apply_adapter(model, inject_config, rngs=rngs or nnx.Rngs(0), verbose=verbose,
                           blocks=module_blocks)
  targets = _targets(model)
  for module, names in by_module.items():
    layer = targets[names[0]][1]
    values = [_layer_values(layer, n, modules[n], tensors, blocks.get(n)) for n in names]
    stacked = [np.stack(v) if targets[names[0]][2] is not None else v[0] for v in zip(*values)]
    layer_vars = [layer.lora_a, layer.lora_b] + ([layer.in_perm, layer.out_perm]
                                                 if isinstance(layer, SMoADense) else [])
    for variable, value in zip(layer_vars, stacked):
      _set_like(variable, value)
  frozen = [n for n in extras if not isinstance(variables[n], SMoAParam)]
  if frozen:
    mark_trainable(model, "|".join(re.escape(n) for n in frozen))
  variables = {module_path(p): v for p, v in nnx.iter_graph(model) if isinstance(v, SMoAParam)}
  for name in extras:
    _set_like(variables[name], tensors[_dotted(name)])
  return report


def _targets(model: nnx.Module) -> dict[str, tuple[str, nnx.Module, int | None]]:
  """Unrolled module name -> ``(module path, linear or adapter layer, layer index or None)``.

  A stacked (scanned) layer at ``model/layers/self_attn/q_proj`` answers for every
  ``model/layers/<i>/self_attn/q_proj``.
  """
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Linear, AdaptedDense)):
      name = module_path(path)
      if len(node.kernel.shape) == 3:
        out.update({layer_path(name, i): (name, node, i) for i in range(node.kernel.shape[0])
                    if layer_path(name, i) is not None})
      else:
        out[name] = (name, node, None)
  return out


def _set_like(variable: nnx.Variable, value: np.ndarray) -> None:
  """Assign host ``value`` keeping the Variable's dtype and device layout (sharded or not)."""
  current = variable[...]
  value = np.asarray(value).astype(current.dtype)
  sharding = getattr(current, "sharding", None)
  if sharding is not None and not sharding.is_fully_replicated:
    variable.set_value(jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx]))
  else:
    variable[...] = jnp.asarray(value)


def _check_layer_fits(layer: AdaptedDense, name: str, config: AdapterConfig,
                      entry: dict[str, Any]) -> None:
  """An adapter layer already in the model must have the saved method and block/rank structure."""
  if layer.config.method != config.method:
    raise AdapterMismatchError(f"module {name!r} carries a {layer.config.method} adapter, but the "
                               f"saved adapter is {config.method}.")
  layout = getattr(layer.op, "layout", None)
  if isinstance(layer, SMoADense):
    ours = {"ranks": list(layout.ranks), "in_sizes": list(layout.in_sizes),
            "out_sizes": list(layout.out_sizes)}
  else:
    ours = {"ranks": [layer.config.r]}
  theirs = {k: entry.get(k) for k in ours}
  if ours != theirs:
    raise AdapterMismatchError(f"module {name!r}: the model's adapter has {ours} but the saved one "
                               f"has {theirs} (different r, num_blocks or branch_ranks).")


def _init_kwargs(config: AdapterConfig) -> dict[str, Any]:
  data = config.to_dict()
  data.pop("method")
  return data


def _layer_values(layer: AdaptedDense, name: str, entry: dict[str, Any],
                  tensors: dict[str, np.ndarray], blocks: SpectralBlocks | None) -> list[np.ndarray]:
  """One layer's ``[a, b]`` (+ ``[in_perm, out_perm]`` for SMoA) in the layer's stored layout."""
  dotted = _dotted(name)
  if not isinstance(layer, SMoADense):
    r = entry["ranks"][0]
    a = _check_tensor(f"{dotted}.lora_A.weight", tensors, (r, entry["in_features"])).T
    b = _check_tensor(f"{dotted}.lora_B.weight", tensors, (entry["out_features"], r)).T
    return [a[None], b[None]] if isinstance(layer.op, SMoAOp) else [a, b]  # HiRA: K = 1
  a = np.zeros(layer.lora_a.shape[-3:], np.float32)
  b = np.zeros(layer.lora_b.shape[-3:], np.float32)
  for k, (c, o, r) in enumerate(zip(entry["in_sizes"], entry["out_sizes"], entry["ranks"])):
    if r > 0:
      a[k, :c, :r] = _check_tensor(f"{dotted}.lora_A.{k}.weight", tensors, (r, c)).T
      b[k, :r, :o] = _check_tensor(f"{dotted}.lora_B.{k}.weight", tensors, (o, r)).T
  return [a, b, np.asarray(blocks.in_perm), np.asarray(blocks.out_perm)]
