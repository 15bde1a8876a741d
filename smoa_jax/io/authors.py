"""Adapters in the layout of the authors' PyTorch SMoA (misonsky/SMoA, ``cpeft/tuners/smoa.py``).

Their adapter directory is a PEFT ``save_pretrained``::

    adapter_config.json        a PeftConfig: peft_type "SMOA", r, num_blocks, branch_ranks,
                               lora_alpha, lora_dropout, target_modules, fan_in_fan_out, bias,
                               layers_to_transform, layers_pattern, base_model_name_or_path, ...
    adapter_model.safetensors  (or adapter_model.bin, their default) for every adapted module M
                               (Hugging Face dotted name) and block k with r_k > 0:
                                 base_model.model.<M>.lora_A.<k>.weight   (r_k, |C_k|)  = a_k^T
                                 base_model.model.<M>.lora_B.<k>.weight   (|R_k|, r_k)  = b_k^T
                               (rank-0 blocks are ``nn.Identity`` there and have no tensors)

The file holds no permutation: their code recomputes it whenever it builds a layer, from the base
weight ``torch_weight (out, in)`` (a GPT-2 ``Conv1D`` weight, stored ``(in, out)``, is transposed
first: ``fan_in_fan_out``): a float32 ``torch.linalg.svd``, the centroids of docs/design.md section 1 for
outputs (from ``u``) and inputs (from ``vh.T``), and an UNSTABLE ``torch.argsort``. Row ``i`` of
``a_k`` belongs to the i-th coordinate of ``C_k`` in that order, so factors mean something only
with the permutation they were trained against. Ours (stable sort, computed in JAX) is the same
except for centroids that tie exactly (all-zero rows or columns, which torch's sort orders as it
likes) or nearly (closer than the rounding of the two SVDs).

Therefore:

* :func:`load_authors_adapter` recomputes their permutation as their code does on this machine
  (:func:`authors_blocks`), compares it with ours (:class:`PermutationCheck`: positions and block
  memberships that differ), warns when they differ, and always installs THEIRS in the layers.
* :func:`save_authors_adapter` checks each layer's permutation against theirs. Coordinates that
  only moved within a block get their factor rows moved along (exact); a coordinate whose anchors
  are all zero may change block (its dW is zero whatever the factors); any other change of block
  is refused, because then no factors in their layout give the same dW.

Their code computes on the weight's device and in the dtype the base model was loaded in (cast to
float32 for the SVD): load the base with :func:`smoa_jax.from_hf` in that dtype, and pass
``torch_device="cuda"`` when they trained on a GPU, to reproduce their permutation exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import save_file

from smoa_jax.core.config import split_sizes
from smoa_jax.core.smoa import SMoAConfig
from smoa_jax.core.spectral import SpectralBlocks, spectral_blocks
from smoa_jax.errors import (AdapterMismatchError, CheckpointError, ConfigError, KernelError,
                             SMoAError)
from smoa_jax.io import formats
from smoa_jax.io.files import as_path, atomic_directory
from smoa_jax.layers.inject import AdapterReport, adapt_modules, loading_adapter
from smoa_jax.layers.sites import linear_sites
from smoa_jax.layers.variables import TrainableParam
from smoa_jax.models.base import HFModel
from smoa_jax.parallel.sharding import to_host

__all__ = ["authors_blocks", "compare_blocks", "PermutationCheck", "AuthorsImport",
           "save_authors_adapter", "load_authors_adapter"]

# Their SMoAConfig defaults, used for fields an adapter_config.json leaves out (as their loader).
AUTHORS_DEFAULTS: dict[str, Any] = {
    "r": 8, "num_blocks": 2, "branch_ranks": None, "lora_alpha": 8, "lora_dropout": 0.0,
    "target_modules": None, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
    "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
}
# Layer containers their layers_to_transform looks for when layers_pattern is unset.
COMMON_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")
_FACTOR_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<k>\d+)\.weight")


def _import_torch():
  try:
    import torch
  except ImportError as err:
    raise CheckpointError("interop with the authors' PyTorch SMoA recomputes their spectral "
                          "permutation with torch, which is not installed: pip install "
                          "'smoa-jax[torch]'.") from err
  return torch


def _torch_order(torch, vectors, singular_values) -> np.ndarray:
  # vectors: (n, q) singular vectors of one side, singular_values: (q,) -> (n,) ascending centroid
  # order, with the same float32 operations as the authors' code and its unstable argsort.
  energy = vectors.pow(2) * singular_values.unsqueeze(0).pow(2)
  total = energy.sum(dim=1).clamp_min(torch.finfo(energy.dtype).eps)
  position = torch.arange(vectors.shape[1], device=vectors.device, dtype=vectors.dtype)
  score = (energy * position.unsqueeze(0)).sum(dim=1) / total
  return torch.argsort(score).cpu().numpy()


def authors_blocks(kernel: jax.Array, num_blocks: int, *, device: str = "cpu") -> SpectralBlocks:
  """The spectral blocks the authors' code builds for a kernel ``(in, out)``, computed as it does.

  ``torch.linalg.svd`` of the float32 ``torch_weight = kernel.T`` ``(out, in)`` on ``device``,
  output order from ``u``, input order from ``vh.T``, each by ``torch.argsort`` of the centroids
  (not stable), cut by the ``numpy.array_split`` rule. Needs torch (``smoa-jax[torch]``).
  Pass the result to ``apply_adapter(..., blocks={path: ...})`` to train in their permutation.
  """
  torch = _import_torch()
  if np.ndim(kernel) != 2:
    raise KernelError(f"kernel must be a 2-D (in, out) array, got shape {np.shape(kernel)}.")
  n_in, n_out = np.shape(kernel)
  if (isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer))
      or not 1 <= num_blocks <= min(n_in, n_out)):
    raise ConfigError(f"num_blocks={num_blocks!r} is invalid for a kernel of shape "
                      f"{(n_in, n_out)}: expected an int in [1, {min(n_in, n_out)}].")
  torch_weight = torch.from_numpy(np.asarray(jnp.asarray(kernel, jnp.float32)).T.copy()).to(device)
  u, s, vh = torch.linalg.svd(torch_weight, full_matrices=False)
  in_perm, out_perm = _torch_order(torch, vh.T, s), _torch_order(torch, u, s)
  return SpectralBlocks(jnp.asarray(in_perm, jnp.int32), jnp.asarray(out_perm, jnp.int32),
                        split_sizes(n_in, num_blocks), split_sizes(n_out, num_blocks))


@dataclasses.dataclass(frozen=True)
class PermutationCheck:
  """How the authors' spectral permutation of one module differs from smoa_jax's.

  Attributes:
    module: our module path, e.g. ``model/layers/0/self_attn/q_proj``.
    in_positions, out_positions: positions at which ``in_perm`` / ``out_perm`` differ.
    in_memberships, out_memberships: input / output coordinates placed in a different block.
  """

  module: str
  in_positions: int
  out_positions: int
  in_memberships: int
  out_memberships: int

  @property
  def matches(self) -> bool:
    return self.in_positions == 0 and self.out_positions == 0

  def __str__(self) -> str:
    return (f"{self.module}: {self.in_positions} input / {self.out_positions} output positions "
            f"differ ({self.in_memberships} / {self.out_memberships} coordinates in another block)")


def _block_of(perm: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
  """``(n,)`` block index of every coordinate under ``perm``."""
  block = np.empty(len(perm), np.int64)
  block[perm] = np.repeat(np.arange(len(sizes)), sizes)
  return block


def compare_blocks(module: str, ours: SpectralBlocks, theirs: SpectralBlocks) -> PermutationCheck:
  """Count the positions and block memberships in which two blockings of one kernel differ."""
  if (ours.in_sizes, ours.out_sizes) != (theirs.in_sizes, theirs.out_sizes):
    raise ConfigError(f"{module}: blocks of different sizes cannot be compared.")
  counts = []
  for a, b, sizes in ((ours.in_perm, theirs.in_perm, ours.in_sizes),
                      (ours.out_perm, theirs.out_perm, ours.out_sizes)):
    a, b = np.asarray(a), np.asarray(b)
    counts += [int(np.sum(a != b)), int(np.sum(_block_of(a, sizes) != _block_of(b, sizes)))]
  return PermutationCheck(module, counts[0], counts[2], counts[1], counts[3])


@dataclasses.dataclass(frozen=True)
class AuthorsImport:
  """What :func:`load_authors_adapter` did.

  Attributes:
    config: the adapter as an :class:`SMoAConfig` (``target_modules`` = the adapted paths).
    checks: one :class:`PermutationCheck` per adapted module (ours vs the authors').
    report: the injection report, or None when every module already carried an adapter.
  """

  config: SMoAConfig
  checks: tuple[PermutationCheck, ...]
  report: AdapterReport | None

  @property
  def mismatched(self) -> tuple[PermutationCheck, ...]:
    return tuple(c for c in self.checks if not c.matches)


# -- export ----------------------------------------------------------------------------------------
def _regroup(ours: np.ndarray, theirs: np.ndarray, sizes: Sequence[int], zero: np.ndarray
             ) -> tuple[list[np.ndarray], list[int]]:
  """Per block k: the position in OUR block k of each coordinate of THEIR block k (-1 for a
  coordinate with all-zero anchors, whose factor row is free); and the coordinates that changed
  block although their anchors are not all zero."""
  block = _block_of(ours, sizes)
  starts = np.cumsum((0,) + tuple(sizes[:-1]))
  position = np.empty(len(ours), np.int64)
  position[ours] = np.arange(len(ours)) - np.repeat(starts, sizes)
  index, moved = [], []
  for k, (start, size) in enumerate(zip(starts, sizes)):
    coords = theirs[start:start + size]
    stays = block[coords] == k
    index.append(np.where(stays, position[coords], -1))
    moved += coords[~stays & ~zero[coords]].tolist()
  return index, moved


def _factors_in_their_order(path: str, a: np.ndarray, b: np.ndarray, kernel: np.ndarray,
                            ours: SpectralBlocks, theirs: SpectralBlocks
                            ) -> tuple[np.ndarray, np.ndarray]:
  """One layer's ``a (K, max|C_k|, max r)``, ``b (K, max r, max|R_k|)`` expressed in ``theirs``
  (host arrays; ``kernel (in, out)`` is the layer's pristine W)."""
  if compare_blocks(path, ours, theirs).matches:
    return a, b
  in_index, in_moved = _regroup(np.asarray(ours.in_perm), np.asarray(theirs.in_perm),
                                ours.in_sizes, np.all(kernel == 0, axis=1))
  out_index, out_moved = _regroup(np.asarray(ours.out_perm), np.asarray(theirs.out_perm),
                                  ours.out_sizes, np.all(kernel == 0, axis=0))
  if in_moved or out_moved:
    raise AdapterMismatchError(
        f"module {path!r}: the authors' code would put {len(in_moved)} input and {len(out_moved)} "
        f"output coordinates (e.g. inputs {in_moved[:5]}, outputs {out_moved[:5]}) into other "
        "blocks than this adapter does (near-tied spectral centroids), so no factors in their "
        "layout give the same dW. Train with their permutation to export exactly: apply_adapter("
        "..., blocks={path: smoa_jax.authors_blocks(kernel, num_blocks)}), or keep this adapter "
        "in smoa_jax.save_adapter's format.")
  a_theirs, b_theirs = np.zeros_like(a), np.zeros_like(b)
  for k, (i_idx, o_idx) in enumerate(zip(in_index, out_index)):
    a_theirs[k, :len(i_idx)][i_idx >= 0] = a[k, i_idx[i_idx >= 0]]
    b_theirs[k, :, :len(o_idx)][:, o_idx >= 0] = b[k][:, o_idx[o_idx >= 0]]
  return a_theirs, b_theirs


def _exported_layers(model: HFModel) -> tuple[SMoAConfig, list[formats.HFModule]]:
  """The one SMoA config and every adapted layer under its HF name; refuses what the authors'
  layout cannot hold."""
  sites = [site for site in linear_sites(model) if site.adapted]
  if not sites:
    raise AdapterMismatchError("the model has no adapter layers: call smoa_jax.apply_adapter with "
                               "an SMoAConfig first.")
  methods = sorted({s.module.config.method for s in sites if s.module.config.method != "smoa"})
  if methods:
    raise AdapterMismatchError(f"the model carries {methods} adapters, but the authors' SMoA "
                               "layout stores SMoA only (their LoRA and HiRA are other tuners); "
                               "save it with smoa_jax.save_adapter.")
  configs = {site.module.config for site in sites}
  if len(configs) > 1:
    raise AdapterMismatchError(f"the model holds SMoA adapters of {len(configs)} different "
                               "configs; the authors' adapter_config.json describes one.")
  adapted = {site.path for site in sites}
  extras = [p for p, v in nnx.iter_graph(model)
            if isinstance(v, TrainableParam) and tuple(p[:-1]) not in adapted]
  if extras:
    raise AdapterMismatchError(f"the model trains arrays outside SMoA layers "
                               f"({['/'.join(map(str, p)) for p in extras[:5]]}), which the "
                               "authors' layout does not carry; save with smoa_jax.save_adapter.")
  return configs.pop(), formats.hf_layers(model, sites)


def save_authors_adapter(model: HFModel, path: str | os.PathLike, *, verify: bool = True,
                         torch_device: str = "cpu",
                         base_model_name_or_path: str | None = None) -> epath.Path:
  """Write the model's SMoA adapter in the authors' layout (see the module docstring).

  ``adapter_config.json`` lists the adapted modules by their Hugging Face names in
  ``target_modules``; ``adapter_model.safetensors`` holds float32 ``lora_A.<k>`` ``(r_k, |C_k|)``
  and ``lora_B.<k>`` ``(|R_k|, r_k)``. The write is atomic. With several processes every process
  must call this (arrays are gathered); process 0 writes. Scanned models are written under their
  unrolled module names.

  Args:
    model: a model from :func:`smoa_jax.from_hf` carrying :class:`SMoADense` layers of one config.
    path: destination directory (replaced if it exists).
    verify: check every layer's permutation against the one their code will compute
      (:func:`authors_blocks`, needs torch) and re-express the factors in it; ``False`` skips the
      check, for a machine without torch, at the risk of a different dW where centroids near-tie.
    torch_device: where to run their SVD for the check (``"cuda"`` if they will load on a GPU).
    base_model_name_or_path: recorded in the config (default: the directory the model came from).

  Raises:
    AdapterMismatchError: the model is not from ``from_hf``, has no adapters, non-SMoA adapters,
      several configs, other trainable arrays, or a permutation their layout cannot express.
  """
  formats.check_hf_model(model, "save_authors_adapter")
  config, layers = _exported_layers(model)
  if verify:
    _import_torch()
  tensors: dict[str, np.ndarray] = {}
  host: dict[str, tuple[np.ndarray, ...]] = {}
  for module in layers:
    hf_name, site, index = module.hf_name, module.site, module.index
    layer = site.module
    if site.name not in host:  # every process gathers; one host copy per (stacked) layer
      host[site.name] = tuple(to_host(v) for v in (layer.lora_a[...], layer.lora_b[...],
                                                  layer.in_perm[...], layer.out_perm[...],
                                                  layer.base_kernel()))
    a, b, in_perm, out_perm, kernel = (v if index is None else v[index] for v in host[site.name])
    if verify:
      layout = layer.op.layout
      ours = SpectralBlocks(in_perm, out_perm, layout.in_sizes, layout.out_sizes)
      theirs = authors_blocks(kernel, config.num_blocks, device=torch_device)
      a, b = _factors_in_their_order(site.name, a, b, np.asarray(kernel, np.float32), ours, theirs)
    tensors.update(formats.encode_factors(hf_name, layer.op, a, b, per_block=True))
  alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
  document = {
      **AUTHORS_DEFAULTS, "peft_type": "SMOA", "auto_mapping": None, "revision": None,
      "base_model_name_or_path": base_model_name_or_path or model.source_dir,
      "task_type": formats.peft_task_type(model), "inference_mode": True, "r": config.r,
      "num_blocks": config.num_blocks, "lora_alpha": alpha, "lora_dropout": config.dropout,
      "branch_ranks": None if config.branch_ranks is None else list(config.branch_ranks),
      "target_modules": sorted({m.hf_name for m in layers}),
      "fan_in_fan_out": all(m.conv1d for m in layers),
  }
  if jax.process_index() == 0:
    with atomic_directory(path) as staged:
      (staged / formats.CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True))
      save_file(tensors, str(staged / formats.SAFETENSORS_NAME), metadata={"format": "pt"})
  return as_path(path)


# -- import ----------------------------------------------------------------------------------------
def _read(path: epath.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The config and the tensors (float32 numpy) of an adapter directory in the authors' layout."""
  document = formats.read_config(path)
  formats.expect_format(path, document, "authors")
  _import_torch()  # their permutation is recomputed with torch: fail before reading anything
  tensors = formats.read_tensors(path, torch_bin=True)
  return {**AUTHORS_DEFAULTS, **document}, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _authors_config(document: dict[str, Any], path: epath.Path) -> SMoAConfig:
  try:
    return SMoAConfig(r=document["r"], num_blocks=document["num_blocks"],
                      alpha=document["lora_alpha"], dropout=document["lora_dropout"],
                      branch_ranks=document["branch_ranks"])
  except SMoAError as err:
    raise CheckpointError(f"{path / formats.CONFIG_NAME}: {err} (from the authors' fields r, "
                          "num_blocks, lora_alpha, lora_dropout, branch_ranks)") from err


def _targeted(document: dict[str, Any], name: str) -> bool:
  """Whether the authors' code adapts the module with HF dotted ``name`` under this config."""
  targets = document["target_modules"]
  if isinstance(targets, str):
    return re.fullmatch(targets, name) is not None
  found = any(name == t or re.match(rf".*\.{t}$", name) for t in targets)
  layers = document.get("layers_to_transform")
  if found and layers is not None:
    patterns = document.get("layers_pattern")
    patterns = COMMON_LAYERS_PATTERN if patterns is None else (
        [patterns] if isinstance(patterns, str) else patterns)
    matches = (re.match(rf".*.{p}\.(\d+)\.*", name) for p in patterns)
    index = next((int(m.group(1)) for m in matches if m is not None), None)
    found = index is not None and (index == layers if isinstance(layers, int) else index in layers)
  return found


def _targets(model: HFModel, document: dict[str, Any], tensors: dict[str, np.ndarray],
             modules: dict[str, formats.HFModule], path: epath.Path) -> list[str]:
  """The HF names of the modules their config targets (their matching rules)."""
  if document["target_modules"] is None:  # their saved configs list them; else take the keys'
    targets = sorted({m["module"] for k in tensors if (m := _FACTOR_KEY.fullmatch(k))
                      and m["module"] in modules})
  else:
    try:
      targets = [n for n in modules if _targeted(document, n)]
    except (re.error, TypeError) as err:
      raise CheckpointError(f"{path / formats.CONFIG_NAME}: invalid target_modules / "
                            f"layers_to_transform / layers_pattern ({err}).") from err
  if not targets:
    scanned = " (load into an unrolled model: scan_layers=False)" if model.scan_layers else ""
    raise AdapterMismatchError(f"target_modules={document['target_modules']!r} of "
                               f"{path / formats.CONFIG_NAME} matches no linear module of "
                               f"{type(model).__name__}{scanned}; its linear modules are e.g. "
                               f"{sorted(modules)[:8]}.")
  return targets


def _key_problems(tensors: dict[str, np.ndarray], targets: list[str],
                  modules: dict[str, formats.HFModule], config: SMoAConfig) -> list[str]:
  """Every mismatch between the tensor names and the targeted modules."""
  expected = {k for n in targets
              for k in formats.factor_keys(n, config.block_ranks, per_block=True)}
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {missing[:6]}")
  if unexpected:
    factor_modules = {m["module"] for k in unexpected if (m := _FACTOR_KEY.fullmatch(k))}
    unknown = sorted(factor_modules - set(modules))
    untargeted = sorted(factor_modules & set(modules))
    other = [k for k in unexpected if not _FACTOR_KEY.fullmatch(k)]
    message = f"unexpected keys ({len(unexpected)}): {unexpected[:6]}"
    if unknown:
      message += f"; the model has no linear module {unknown[:4]} (another base model?)"
    if untargeted:
      message += f"; {untargeted[:4]} are not matched by target_modules / layers_to_transform"
    if other:
      message += (f"; {len(other)} are not SMoA factors (trained biases, bias != 'none', or "
                  "modules_to_save are not imported)")
    problems.append(message)
  return problems


def _module_problems(tensors: dict[str, np.ndarray], targets: list[str],
                     modules: dict[str, formats.HFModule], config: SMoAConfig) -> list[str]:
  """Shapes and values of each targeted module's factors, and adapters already in the model."""
  problems = []
  for n in targets:
    module = modules[n]
    n_in, n_out = module.site.shape
    try:
      config.check_layer(n_in, n_out, n)
    except ConfigError as err:
      problems.append(str(err))
      continue
    for k, (c, o, r) in enumerate(zip(split_sizes(n_in, config.num_blocks),
                                      split_sizes(n_out, config.num_blocks), config.block_ranks)):
      for key, shape in ((f"{formats.module_key(n)}.lora_A.{k}.weight", (r, c)),
                         (f"{formats.module_key(n)}.lora_B.{k}.weight", (o, r))):
        if key in tensors and tensors[key].shape != shape:
          problems.append(f"{key} has shape {tensors[key].shape}, expected {shape} "
                          "(lora_A.k is (r_k, |C_k|), lora_B.k (|R_k|, r_k))")
        elif key in tensors and not np.all(np.isfinite(tensors[key])):
          problems.append(f"{key} holds NaN or Inf values")
    layer = module.site.module
    if module.site.adapted and (
        layer.config.method != "smoa" or layer.merged
        or layer.op.layout.ranks != config.block_ranks or layer.config.scaling != config.scaling):
      problems.append(f"{n} already carries a {layer.config.method} adapter "
                      f"(r={layer.config.r}, alpha={layer.config.alpha}, merged={layer.merged}) "
                      f"that differs from this one (r={config.r}, alpha={config.alpha}, "
                      f"ranks {config.block_ranks}); load into a model without it, or unmerge")
  return problems


def _their_blocks(targets: list[str], modules: dict[str, formats.HFModule], config: SMoAConfig,
                  torch_device: str) -> tuple[dict[str, SpectralBlocks], list[PermutationCheck]]:
  """Their permutation of every targeted module (by our path), compared with ours; warns when
  they differ."""
  theirs, checks = {}, []
  for n in targets:
    site = modules[n].site
    kernel = site.module.base_kernel() if site.adapted else site.module.kernel[...]
    theirs[site.name] = authors_blocks(kernel, config.num_blocks, device=torch_device)
    ours = site.module.blocks if site.adapted else spectral_blocks(kernel, config.num_blocks)
    checks.append(compare_blocks(site.name, ours, theirs[site.name]))
  differing = [c for c in checks if not c.matches]
  if differing:
    warnings.warn(f"the authors' spectral permutation differs from smoa_jax's in {len(differing)} "
                  f"of {len(checks)} modules (tied or near-tied centroids): "
                  + "; ".join(map(str, differing[:4])) + ". Using the authors' permutation, which "
                  "the factors were trained against.", stacklevel=4)
  return theirs, checks


def load_authors_adapter(model: HFModel, path: str | os.PathLike, *,
                         rngs: nnx.Rngs | None = None, torch_device: str = "cpu",
                         verbose: bool = False, name: str | None = None) -> AuthorsImport:
  """Import an adapter saved by the authors' SMoA code into ``model`` (in place).

  The modules their config targets (their matching rules: ``target_modules`` names or regex,
  ``layers_to_transform`` / ``layers_pattern``) receive :class:`SMoADense` layers if they have
  none (:func:`smoa_jax.layers.inject.adapt_modules` with the authors' blocks), then the factors.
  The permutation is the authors' (:func:`authors_blocks` on ``torch_device``), compared with
  ours (``spectral_blocks``, or the layer's own when already adapted); a warning names the
  modules where they differ. ``rngs`` drives adapter dropout (default ``nnx.Rngs(0)``).
  ``name`` names the adapter (``"default"``) beside others the model holds; it becomes active
  (``smoa_jax.set_adapter``). Needs torch.

  Raises:
    CheckpointError: missing or unreadable files, not an SMoA adapter, invalid r / num_blocks /
      branch_ranks / lora_alpha, torch missing.
    AdapterMismatchError: missing or unexpected keys, wrong shapes, targets the model lacks, or an
      existing adapter of another structure (or merged).
  """
  formats.check_hf_model(model, "load_authors_adapter")
  path = as_path(path)
  document, tensors = _read(path)
  config = _authors_config(document, path)
  modules = formats.hf_modules(model)
  targets = _targets(model, document, tensors, modules, path)
  with loading_adapter(model, name) as name:
    return _import(model, path, document, tensors, config, modules, targets, rngs, torch_device,
                   verbose, name)


def _import(model: HFModel, path: epath.Path, document: dict[str, Any],
            tensors: dict[str, np.ndarray], config: SMoAConfig,
            modules: dict[str, formats.HFModule], targets: list[str],
            rngs: nnx.Rngs | None, torch_device: str, verbose: bool, name: str) -> AuthorsImport:
  """:func:`load_authors_adapter` once the model's layers show adapter ``name`` (or none)."""
  problems = (_key_problems(tensors, targets, modules, config)
              + _module_problems(tensors, targets, modules, config))
  if problems:
    raise AdapterMismatchError(f"{path} does not fit this {type(model).__name__}:\n  "
                               + "\n  ".join(problems))
  formats.warn_fan_in_fan_out(bool(document["fan_in_fan_out"]), targets, modules,
                              "the authors' code", stacklevel=3)
  theirs, checks = _their_blocks(targets, modules, config, torch_device)
  config = dataclasses.replace(config, target_modules=tuple(theirs))
  fresh = [modules[n].path for n in targets if not modules[n].site.adapted]
  report = None
  if fresh:
    report = adapt_modules(model, config, fresh, rngs=rngs or nnx.Rngs(0), verbose=verbose,
                           blocks=theirs, name=name)
  layers = {site.name: site.module for site in linear_sites(model) if site.adapted}
  for n in targets:
    layer, blocks = layers[modules[n].path], theirs[modules[n].path]
    a, b = formats.decode_factors(n, layer.op, tensors, per_block=True)
    layer.in_perm[...] = blocks.in_perm
    layer.out_perm[...] = blocks.out_perm
    layer.lora_a[...] = jnp.asarray(a, layer.lora_a.dtype)
    layer.lora_b[...] = jnp.asarray(b, layer.lora_b.dtype)
  return AuthorsImport(config, tuple(checks), report)
