"""The adapter file formats in one place: shared names, readers, detection, the per-block codec.

Every adapter directory smoa-jax reads or writes has PEFT's layout::

    adapter_config.json        a JSON object describing the adapter
    adapter_model.safetensors  (or adapter_model.bin, a PyTorch pickle) with tensors named
                               base_model.model.<module>.<factor>

Three formats use it; ``adapter_config.json`` tells them apart (:func:`detect_format`):

* ``portable`` -- smoa-jax's own (:mod:`smoa_jax.io.portable`): ``"library": "smoa-jax"``, any
  method, the spectral permutations and a fingerprint of every base kernel;
* ``authors`` -- the authors' PyTorch SMoA (:mod:`smoa_jax.io.authors`): ``"peft_type": "SMOA"``,
  SMoA factors only (the permutation is recomputed from the base weights);
* ``peft`` -- PEFT's own adapters (``"peft_type"`` of another method; :mod:`smoa_jax.io.peft`
  reads and writes ``LORA`` and ``HIRA``).

The authors' and PEFT's files name modules by their Hugging Face dotted names
(``model.layers.0.self_attn.q_proj``): :func:`hf_modules` and :func:`hf_layers` translate them
through the model's key map (:meth:`smoa_jax.models.base.HFModel.key_map`).

The factors of one module are stored per block in torch layout (:func:`encode_factors`):
``lora_A.<k>.weight = a_k^T (r_k, |C_k|)`` and ``lora_B.<k>.weight = b_k^T (|R_k|, r_k)`` for a
method in W's spectral order (a rank-0 block has no tensors), or ``lora_A.weight (r, in)`` and
``lora_B.weight (out, r)`` for a single-block method (LoRA, HiRA); PEFT's HiRA names the same
pair ``hira_A (r, in)`` and ``hira_B (out, r)`` (``names=HIRA_NAMES``). The op of the module
(:meth:`smoa_jax.core.ops.AdapterOp.factor_blocks`) converts between these blocks and the
layer's stored factors, so the codec never looks at the method.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Literal, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, load_file

from smoa_jax.core.ops import AdapterOp
from smoa_jax.errors import AdapterMismatchError, CheckpointError
from smoa_jax.io.files import as_path, is_local, read_json_object, safe_torch_load, torch_to_numpy
from smoa_jax.layers.sites import LinearSite, linear_sites
from smoa_jax.models.base import HFModel

__all__ = ["CONFIG_NAME", "SAFETENSORS_NAME", "TORCH_BIN_NAME", "PREFIX", "Format", "LORA_NAMES",
           "HIRA_NAMES", "read_config", "read_tensors", "detect_format", "expect_format",
           "module_key", "factor_keys", "encode_factors", "decode_factors", "checked_tensor",
           "HFModule", "hf_modules", "hf_layers", "check_hf_model", "warn_fan_in_fan_out",
           "peft_task_type"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
TORCH_BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# Which loader reads each format (for errors that point the user to the right one).
LOADERS = {"portable": "smoa_jax.load_adapter", "authors": "smoa_jax.load_authors_adapter",
           "peft": "smoa_jax.load_peft_adapter"}

Format = Literal["portable", "authors", "peft"]
# Tensor names of a module's (A, B) factors; ``{k}`` is ``.<block>`` per block, else empty.
LORA_NAMES = ("lora_A{k}.weight", "lora_B{k}.weight")
HIRA_NAMES = ("hira_A{k}", "hira_B{k}")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The ``adapter_config.json`` object of an adapter directory (clear errors when absent)."""
  directory = as_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"adapter directory {str(directory)!r} does not exist.")
  if not (directory / CONFIG_NAME).is_file():
    raise CheckpointError(f"{str(directory)!r} is not an adapter directory: {CONFIG_NAME} is "
                          "missing.")
  return read_json_object(directory / CONFIG_NAME, "an adapter config")


def detect_format(document: dict[str, Any]) -> Format:
  """``portable``, ``authors`` or ``peft`` from an ``adapter_config.json`` object."""
  if document.get("library") == "smoa-jax":
    return "portable"
  peft_type = document.get("peft_type")
  if peft_type == "SMOA":
    return "authors"
  if isinstance(peft_type, str):
    return "peft"
  raise CheckpointError(f"{CONFIG_NAME} has neither \"library\": \"smoa-jax\" nor a PEFT "
                        "\"peft_type\"; it was not written by smoa-jax, the authors' SMoA code or "
                        "PEFT.")


def expect_format(directory: str | os.PathLike, document: dict[str, Any], wanted: Format) -> None:
  """Raise, naming what the directory holds and the right loader, unless it is ``wanted``."""
  found = detect_format(document)
  if found == wanted:
    return
  what = ("an adapter saved by smoa_jax.save_adapter" if found == "portable" else
          "an adapter saved by the authors' SMoA code or save_authors_adapter" if found == "authors"
          else f"a PEFT adapter with peft_type={document.get('peft_type')!r}")
  raise CheckpointError(f"{str(directory)!r} holds {what}, not the {wanted} format; load it with "
                        f"{LOADERS[found]}(model, path).")


def read_tensors(directory: str | os.PathLike, *, torch_bin: bool = False) -> dict[str, np.ndarray]:
  """The adapter's tensors as numpy arrays: ``adapter_model.safetensors``, or (``torch_bin``)
  ``adapter_model.bin`` read safely (tensors only) when no safetensors file is there."""
  directory = as_path(directory)
  safetensors_file, torch_file = directory / SAFETENSORS_NAME, directory / TORCH_BIN_NAME
  if safetensors_file.is_file():
    try:
      if not is_local(safetensors_file):  # object storage: read the bytes, then parse them
        return load(safetensors_file.read_bytes())
      return load_file(str(safetensors_file))
    except (SafetensorError, OSError, ValueError) as err:
      raise CheckpointError(f"{safetensors_file} is unreadable as safetensors ({err}); it may be "
                            "truncated or corrupted: save the adapter again.") from err
  if torch_bin and torch_file.is_file():
    return {k: torch_to_numpy(v.detach().cpu()) for k, v in safe_torch_load(torch_file).items()}
  expected = f"{SAFETENSORS_NAME}{f' or {TORCH_BIN_NAME}' if torch_bin else ''}"
  raise CheckpointError(f"{str(directory)!r} holds no adapter weights: {expected} is missing.")


# -- the per-block codec ---------------------------------------------------------------------------
def module_key(module: str) -> str:
  """The tensor-name prefix of a module: ``model/layers/0/q_proj`` (or its dotted HF name)
  -> ``base_model.model.model.layers.0.q_proj``."""
  return PREFIX + module.replace("/", ".")


def _factor_key(module: str, names: tuple[str, str], factor: int, block: int | None) -> str:
  return f"{module_key(module)}.{names[factor].format(k='' if block is None else f'.{block}')}"


def factor_keys(module: str, ranks: Sequence[int], *, per_block: bool,
                names: tuple[str, str] = LORA_NAMES) -> list[str]:
  """The tensor names :func:`encode_factors` writes for a module with these block ``ranks``."""
  if not per_block:
    return [_factor_key(module, names, f, None) for f in (0, 1)]
  return [_factor_key(module, names, f, k) for k, r in enumerate(ranks) if r > 0 for f in (0, 1)]


def encode_factors(module: str, op: AdapterOp, a: Any, b: Any, *, per_block: bool,
                   names: tuple[str, str] = LORA_NAMES) -> dict[str, np.ndarray]:
  """One module's factors as torch-layout float32 tensors (see the module docstring)."""
  blocks = op.factor_blocks(np.asarray(a, np.float32), np.asarray(b, np.float32))
  if not per_block and len(blocks) != 1:
    raise AdapterMismatchError(f"module {module!r}: a single (A, B) pair cannot hold the "
                               f"{len(blocks)} blocks of its adapter.")
  out = {}
  for k, (a_k, b_k) in enumerate(blocks):
    if a_k.shape[1] > 0 or not per_block:  # rank-0 blocks are frozen: no tensors (as theirs)
      block = k if per_block else None
      out[_factor_key(module, names, 0, block)] = np.ascontiguousarray(a_k.T)
      out[_factor_key(module, names, 1, block)] = np.ascontiguousarray(b_k.T)
  return out


def checked_tensor(tensors: dict[str, np.ndarray], key: str,
                   shape: tuple[int, ...]) -> np.ndarray:
  """``tensors[key]`` after checking its shape and that it is finite."""
  value = tensors[key]
  if tuple(value.shape) != tuple(shape):
    raise AdapterMismatchError(f"tensor {key} has shape {tuple(value.shape)}, expected "
                               f"{tuple(shape)}.")
  if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
    raise AdapterMismatchError(f"tensor {key} holds NaN or Inf values.")
  return value


def decode_factors(module: str, op: AdapterOp, tensors: dict[str, np.ndarray], *,
                   per_block: bool, names: tuple[str, str] = LORA_NAMES
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of :func:`encode_factors`: the factors in the layer's stored layout (float32)."""
  layout = op.layout
  if not per_block and layout.num_blocks != 1:
    raise AdapterMismatchError(f"module {module!r}: a single (A, B) pair cannot hold the "
                               f"{layout.num_blocks} blocks of its adapter.")
  blocks = []
  for k, (c, o, r) in enumerate(zip(layout.in_sizes, layout.out_sizes, layout.ranks)):
    if r == 0 and per_block:
      blocks.append((np.zeros((c, 0), np.float32), np.zeros((0, o), np.float32)))
      continue
    block = k if per_block else None
    a_k = checked_tensor(tensors, _factor_key(module, names, 0, block), (r, c)).T
    b_k = checked_tensor(tensors, _factor_key(module, names, 1, block), (o, r)).T
    blocks.append((np.asarray(a_k, np.float32), np.asarray(b_k, np.float32)))
  a, b = op.stack_blocks(blocks)
  return np.asarray(a), np.asarray(b)


# -- Hugging Face module names ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HFModule:
  """A linear layer of a model under its Hugging Face dotted name (the name PEFT keys use).

  ``index`` is the layer of a stacked (scanned) site, else None; ``conv1d``: the PyTorch weight
  is stored ``(in, out)`` (GPT-2 ``Conv1D``, PEFT's ``fan_in_fan_out``).
  """

  hf_name: str
  site: LinearSite
  index: int | None
  conv1d: bool

  @property
  def path(self) -> str:
    """Our module path (of the stacked site for a scanned layer)."""
    return self.site.name


def check_hf_model(model: Any, what: str) -> None:
  """Refuse a model whose module names cannot be translated to Hugging Face's."""
  if not isinstance(model, HFModel):
    raise AdapterMismatchError(f"{what} needs a model from smoa_jax.from_hf (its module names are "
                               "the Hugging Face ones the file's keys use), got "
                               f"{type(model).__name__}.")


def hf_modules(model: HFModel) -> dict[str, HFModule]:
  """HF dotted name -> :class:`HFModule` for every unstacked linear layer the key map names."""
  key_map = model.key_map()
  out = {}
  for site in linear_sites(model):
    found = key_map.hf_for(site.name + "/kernel")
    if site.num_layers is None and found is not None and found[0].endswith(".weight"):
      name = found[0].removesuffix(".weight")
      out[name] = HFModule(name, site, None, not found[1])
  return out


def hf_layers(model: HFModel, sites: Sequence[LinearSite]) -> list[HFModule]:
  """Every layer of ``sites`` under its HF name, a stacked site's layers one by one.

  Raises:
    AdapterMismatchError: a layer has no Hugging Face name.
  """
  key_map, out = model.key_map(), []
  for site in sites:
    for name, index in site.unrolled() or [(site.name, None)]:
      found = key_map.hf_for(name + "/kernel")
      if found is None:
        raise AdapterMismatchError(f"adapted module {name!r} has no Hugging Face name.")
      out.append(HFModule(found[0].removesuffix(".weight"), site, index, not found[1]))
  return out


def warn_fan_in_fan_out(flag: bool, targets: Sequence[str], modules: dict[str, HFModule],
                        whose: str, stacklevel: int) -> None:
  """Warn when a config's ``fan_in_fan_out`` disagrees with how targeted modules store their
  weight. The factors' layout does not depend on it, and ``whose`` code (PEFT's, the authors')
  corrects the flag per module, so the import does too."""
  corrected = [n for n in targets if modules[n].conv1d != flag]
  if corrected:
    warnings.warn(f"{CONFIG_NAME} says fan_in_fan_out={flag}, but {len(corrected)} targeted "
                  f"modules (e.g. {corrected[0]}) store their weight the other way; like {whose}, "
                  "the flag is corrected per module (the factors' layout does not depend on it).",
                  stacklevel=stacklevel + 1)


def peft_task_type(model: HFModel) -> str | None:
  """PEFT's ``task_type`` for the model's architecture (``CAUSAL_LM`` or None)."""
  name = type(model).architecture
  return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None
