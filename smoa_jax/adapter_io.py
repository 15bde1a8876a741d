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
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from smoa_jax.config import AdapterConfig, SMoAConfig, config_from_dict
from smoa_jax.errors import AdapterMismatchError, CheckpointError, SMoAError
from smoa_jax.fileio import atomic_directory
from smoa_jax.inject import (AdapterReport, adapter_layers, apply_adapter, mark_trainable,
                             module_path)
from smoa_jax.nnx import AdaptedDense, SMoADense, SMoAParam
from smoa_jax.ops import SMoAOp
from smoa_jax.spectral import SpectralBlocks

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


def _module_tensors(path: str, layer: AdaptedDense) -> dict[str, np.ndarray]:
  name = _dotted(path)
  a, b = np.asarray(layer.lora_a[...], np.float32), np.asarray(layer.lora_b[...], np.float32)
  if not isinstance(layer.op, SMoAOp):  # LoRA: a (in, r), b (r, out)
    return {f"{name}.lora_A.weight": a.T.copy(), f"{name}.lora_B.weight": b.T.copy()}
  layout = layer.op.layout
  if not isinstance(layer, SMoADense):  # HiRA: one unpermuted block
    return {f"{name}.lora_A.weight": a[0].T.copy(), f"{name}.lora_B.weight": b[0].T.copy()}
  out = {f"{name}.smoa_in_perm": np.asarray(layer.in_perm[...], np.int32),
         f"{name}.smoa_out_perm": np.asarray(layer.out_perm[...], np.int32)}
  for k, (c, o, r) in enumerate(zip(layout.in_sizes, layout.out_sizes, layout.ranks)):
    if r > 0:  # rank-0 blocks are frozen and have no tensors (as in the authors' code)
      out[f"{name}.lora_A.{k}.weight"] = a[k, :c, :r].T.copy()
      out[f"{name}.lora_B.{k}.weight"] = b[k, :r, :o].T.copy()
  return out


def _extra_trainables(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
  """``SMoAParam`` arrays outside adapter layers (fully fine-tuned kernels, trainable heads)."""
  adapted = {p for p, m in nnx.iter_graph(model) if isinstance(m, AdaptedDense)}
  return [(module_path(p), v) for p, v in nnx.iter_graph(model)
          if isinstance(v, SMoAParam) and p[:-1] not in adapted]


def save_adapter(model: nnx.Module, path: str | os.PathLike, *,
                 config: AdapterConfig | None = None) -> Path:
  """Write the model's adapter (factors, permutations, fingerprints, config) to directory ``path``.

  Trainable arrays outside adapter layers (``FullFineTuneConfig`` kernels, heads made trainable
  with ``mark_trainable``) are saved too, under ``base_model.model.<path>`` in Flax layout. The
  write is atomic: a failure leaves no partial directory (and an existing one untouched).
  ``config`` defaults to the config of the adapter layers (pass it for full fine-tuning).

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
    layout = getattr(layer.op, "layout", None)
    modules[name] = {
        "in_features": layer.in_features, "out_features": layer.out_features,
        "in_sizes": list(layout.in_sizes) if layout else None,
        "out_sizes": list(layout.out_sizes) if layout else None,
        "ranks": list(layout.ranks) if layout else [config.r],
        "fingerprint": kernel_fingerprint(layer.base_kernel()),
    }
    tensors.update(_module_tensors(name, layer))
  trainable_arrays = {}
  for name, variable in extras:
    trainable_arrays[name] = list(variable.shape)
    tensors[_dotted(name)] = np.asarray(variable[...], np.float32)
  from smoa_jax import __version__
  document = {**config.to_dict(), "library": "smoa-jax", "library_version": __version__,
              "format_version": FORMAT_VERSION, "modules": modules,
              "trainable_arrays": trainable_arrays}

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

  present = {module_path(p): m for p, m in nnx.iter_graph(model)
             if isinstance(m, (nnx.Linear, AdaptedDense))}
  for name, entry in modules.items():
    layer = present.get(name)
    if layer is None:
      raise AdapterMismatchError(f"the adapter targets module {name!r}, which the model does not "
                                 "have: is this the base model the adapter was trained on?")
    shape = (entry["in_features"], entry["out_features"])
    if tuple(layer.kernel.shape) != shape:
      raise AdapterMismatchError(f"module {name!r}: kernel shape {tuple(layer.kernel.shape)} but the "
                                 f"adapter was trained on {shape}.")
    if isinstance(layer, AdaptedDense):
      _check_layer_fits(layer, name, config, entry)
      base = layer.base_kernel()
    else:
      base = layer.kernel[...]
    if "fingerprint" in entry and not _fingerprints_match(entry["fingerprint"], kernel_fingerprint(base)):
      raise AdapterMismatchError(
          f"module {name!r}: its kernel differs from the one the adapter was trained on (norm "
          f"{kernel_fingerprint(base)['norm']:.6g} vs {entry['fingerprint']['norm']:.6g}); refusing to "
          "load onto a different base model.")

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
  to_inject = [n for n in modules if not isinstance(present[n], AdaptedDense)]
  if to_inject:
    exact = "|".join(re.escape(n) for n in to_inject)
    inject_config = type(config)(**{**_init_kwargs(config), "target_modules": exact,
                                    "exclude_modules": None, "layers_to_transform": None})
    report = apply_adapter(model, inject_config, rngs=rngs or nnx.Rngs(0), verbose=verbose,
                           blocks=blocks)
  present = {module_path(p): m for p, m in nnx.iter_graph(model)
             if isinstance(m, (nnx.Linear, AdaptedDense))}
  for name, entry in modules.items():
    _assign(present[name], name, entry, tensors, blocks.get(name))
  frozen = [n for n in extras if not isinstance(variables[n], SMoAParam)]
  if frozen:
    mark_trainable(model, "|".join(re.escape(n) for n in frozen))
  variables = {module_path(p): v for p, v in nnx.iter_graph(model) if isinstance(v, SMoAParam)}
  for name in extras:
    variables[name][...] = jnp.asarray(tensors[_dotted(name)], variables[name].dtype)
  return report


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


def _assign(layer: AdaptedDense, name: str, entry: dict[str, Any], tensors: dict[str, np.ndarray],
            blocks: SpectralBlocks | None) -> None:
  dotted = _dotted(name)
  a_dtype, b_dtype = layer.lora_a.dtype, layer.lora_b.dtype
  if not isinstance(layer.op, SMoAOp) or blocks is None:
    r = entry["ranks"][0]
    a = _check_tensor(f"{dotted}.lora_A.weight", tensors, (r, entry["in_features"])).T
    b = _check_tensor(f"{dotted}.lora_B.weight", tensors, (entry["out_features"], r)).T
    if isinstance(layer.op, SMoAOp):  # HiRA: stacked with K = 1
      a, b = a[None], b[None]
    layer.lora_a[...], layer.lora_b[...] = jnp.asarray(a, a_dtype), jnp.asarray(b, b_dtype)
    return
  a = np.zeros(layer.lora_a.shape, np.float32)
  b = np.zeros(layer.lora_b.shape, np.float32)
  for k, (c, o, r) in enumerate(zip(entry["in_sizes"], entry["out_sizes"], entry["ranks"])):
    if r > 0:
      a[k, :c, :r] = _check_tensor(f"{dotted}.lora_A.{k}.weight", tensors, (r, c)).T
      b[k, :r, :o] = _check_tensor(f"{dotted}.lora_B.{k}.weight", tensors, (o, r)).T
  layer.in_perm[...] = blocks.in_perm
  layer.out_perm[...] = blocks.out_perm
  layer.lora_a[...], layer.lora_b[...] = jnp.asarray(a, a_dtype), jnp.asarray(b, b_dtype)
