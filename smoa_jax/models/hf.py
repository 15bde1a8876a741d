"""Hugging Face checkpoints <-> smoa-jax NNX models: :func:`from_hf` and :func:`to_hf`.

Loading never holds two copies of the weights. Before any module exists, every field of
``config.json`` the family reads is checked (:mod:`smoa_jax.models.config_schema`) and the
parameter bytes are computed from the config alone (:mod:`smoa_jax.models.sizes`, Python
integers: a config of absurd size is refused at once) and checked against the memory available.
Then the model is built abstractly (``nnx.eval_shape``: shapes only) and the checkpoint's names,
shapes and dtypes are all checked against it from the file headers alone; every mismatch goes
into ONE :class:`~smoa_jax.errors.CheckpointError`. Only then
are tensors read, one at a time (``safetensors.safe_open``), converted (a transpose for torch
``nn.Linear`` ``torch_weight (out, in)`` -> ``kernel (in, out)``) and placed into their Variables.

With ``mesh=``, the abstract model is annotated with its family's ``sharding_rules``
(:mod:`smoa_jax.parallel.spmd`) and every parameter is created by ``jax.make_array_from_callback``: each
device reads only its slice of the tensor from the file. With ``scan_layers=True`` the per-layer
tensors ``model.layers.{i}....`` fill the layer axis of stacked Params, and export writes them
back per layer.

The correspondence of names is each model's key map (:meth:`HFModel.key_map`), the same table
for both directions. Export folds adapters: a module that is an :class:`smoa_jax.AdaptedDense`
contributes ``folded_kernel()`` (``W + dW``) as its kernel and its bias; its adapter arrays
(``lora_a``, ``lora_b``, ``in_perm``, ``out_perm``) are dropped. A kernel re-typed to
``TrainableParam`` (full fine-tuning) is an ordinary parameter and exports as such. The directory is
written next to its destination and renamed into place, so a failure leaves nothing half-written.

Example::

    model = smoa_jax.from_hf("path/to/SmolLM2")        # LlamaForCausalLM, float32
    logits = model(input_ids)                         # (B, T, vocab)
    smoa_jax.to_hf(model, "out/merged")               # AutoModelForCausalLM.from_pretrained loads it
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from flax.typing import Dtype
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jax.sharding import Mesh

from smoa_jax.parallel import sharding
from smoa_jax.parallel import spmd
from smoa_jax.errors import CheckpointError, ConfigError
from smoa_jax.io.files import (as_path, atomic_directory, read_json_object, safe_torch_load,
                               torch_to_numpy)
from smoa_jax.models import (BertForSequenceClassification, build_model, config_schema, hub,
                             model_class, sizes)
from smoa_jax.models.base import HFModel
from smoa_jax.models.keymap import KeyMap
from smoa_jax.layers.paths import layer_path, module_path, split_layer_path
from smoa_jax.layers.sites import linear_sites

__all__ = ["from_hf", "to_hf", "param_bytes", "TOKENIZER_FILES"]

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Files copied with an export so the directory is a complete, loadable Hugging Face model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_PROGRESS_BYTES = 256 * 2**20  # show a progress bar above this many bytes of weights


# -- reading checkpoints ---------------------------------------------------------------------------
Index = tuple[slice, ...]


class _Checkpoint:
  """Tensor names -> ``(shape, dtype name, is_float)`` from headers; ``get(name, index)`` reads a slice.

  A reader takes a tuple of slices (one per axis) and returns only that part of the tensor
  (safetensors reads just those bytes), so a sharded load never materializes a whole tensor.
  """

  def __init__(self):
    self.meta: dict[str, tuple[tuple[int, ...], str, bool]] = {}
    self.problems: list[str] = []
    self._readers: dict[str, Callable[[Index], np.ndarray]] = {}

  def add(self, name: str, shape: tuple[int, ...], dtype: str, is_float: bool,
          reader: Callable[[Index], np.ndarray]) -> None:
    self.meta[name] = (tuple(shape), dtype, is_float)
    self._readers[name] = reader

  def get(self, name: str, index: Index | None = None) -> np.ndarray:
    if index is None:
      index = tuple(slice(None) for _ in self.meta[name][0])
    return self._readers[name](index)


def _read_index(index_path: Path) -> dict[str, str]:
  """``weight_map`` (tensor name -> shard file) of a sharded checkpoint's index."""
  try:
    weight_map = json.loads(index_path.read_text())["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise CheckpointError(f"{index_path} is not a valid shard index ({err}); expected JSON with a "
                          "'weight_map' of tensor name -> shard file. Re-export the checkpoint.") from err
  missing = sorted({f for f in weight_map.values() if not (index_path.parent / f).is_file()})
  if missing:
    raise CheckpointError(f"{index_path.name} names shard(s) missing from {index_path.parent}: "
                          f"{missing}. Copy the missing shard files or re-download the checkpoint.")
  return weight_map


def _open_safetensors(files: list[Path], stack: contextlib.ExitStack) -> _Checkpoint:
  ckpt = _Checkpoint()
  for file in files:
    try:
      handle = stack.enter_context(safe_open(str(file), framework="numpy"))
      names = list(handle.keys())
      for name in names:
        sl = handle.get_slice(name)
        dtype = sl.get_dtype()
        ckpt.add(name, sl.get_shape(), dtype, dtype.startswith(("F", "BF")),
                 lambda index, h=handle, n=name: h.get_slice(n)[index])
    except (SafetensorError, OSError) as err:
      raise CheckpointError(f"{file} is not a readable safetensors file ({err}); it may be truncated "
                            "or corrupted. Re-download or re-export it.") from err
  return ckpt


def _open_torch_bins(files: list[Path]) -> _Checkpoint:
  ckpt = _Checkpoint()
  for file in files:
    state = safe_torch_load(file, mmap=True)
    for name, tensor in state.items():
      ckpt.add(name, tensor.shape, str(tensor.dtype).removeprefix("torch."),
               tensor.is_floating_point(), lambda index, t=tensor: torch_to_numpy(t)[index])
  return ckpt


@contextlib.contextmanager
def _open_checkpoint(directory: Path) -> Iterator[_Checkpoint]:
  """The checkpoint in ``directory``: safetensors (single or sharded), else PyTorch pickles."""
  with contextlib.ExitStack() as stack:
    formats = ((SAFETENSORS_INDEX, SAFETENSORS, lambda files: _open_safetensors(files, stack)),
               (TORCH_BIN_INDEX, TORCH_BIN, _open_torch_bins))
    for index_name, single_name, open_files in formats:
      if (directory / index_name).is_file():
        weight_map = _read_index(directory / index_name)
        ckpt = open_files([directory / f for f in dict.fromkeys(weight_map.values())])
        ckpt.problems += [f"{index_name} names {name} (in {shard}) but that shard lacks it"
                          for name, shard in weight_map.items() if name not in ckpt.meta]
      elif (directory / single_name).is_file():
        ckpt = open_files([directory / single_name])
      else:
        continue
      yield ckpt
      return
    raise CheckpointError(f"{directory} holds no weights; expected {SAFETENSORS}, "
                          f"{SAFETENSORS_INDEX} (+ shards), {TORCH_BIN} or {TORCH_BIN_INDEX}.")


def _read_config(directory: Path) -> dict[str, Any]:
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint directory {directory} does not exist (or is not a "
                          "directory); expected a Hugging Face model directory with config.json.")
  file = directory / "config.json"
  if not file.is_file():
    raise CheckpointError(f"{directory} has no config.json; expected a Hugging Face model "
                          "directory (save it with save_pretrained, which writes config.json).")
  return read_json_object(file, "the model's config.json")


# -- memory ----------------------------------------------------------------------------------------
def param_bytes(model: nnx.Module, mesh: Mesh | None = None) -> int:
  """Bytes of all ``nnx.Param`` arrays of a (possibly abstract, ``nnx.eval_shape``) model.

  With ``mesh`` (and ``out_sharding`` metadata, :func:`smoa_jax.parallel.spmd.annotate`): the bytes one
  device holds.
  """
  total = 0
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    ways = 1
    if mesh is not None:
      ways = int(np.prod([sharding.axis_size(mesh, e) for e in v.get_metadata("out_sharding", ())]))
    total += int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize // ways
  return total


def _available_bytes() -> tuple[int | None, str]:
  """Free memory where this process's weights will live: its first local device's, else the
  host's (``jax.devices()[0]`` is another host's device on every process but the first)."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"free memory on {device}"
  with contextlib.suppress(OSError, ValueError):
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024, "available host memory"
  with contextlib.suppress(OSError, ValueError, AttributeError):
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host memory"
  return None, "available memory"


def _check_size(needed: int, max_bytes: int | None, what: str) -> None:
  limit, where = (max_bytes, "max_bytes") if max_bytes is not None else _available_bytes()
  if limit is not None and needed > limit:
    raise CheckpointError(
        f"{what} needs {needed / 1e9:.2f} GB for its parameters but {where} is "
        f"{limit / 1e9:.2f} GB; refusing to allocate. Load with a smaller param_dtype "
        "(e.g. jnp.bfloat16), use a machine with more memory, or raise max_bytes if the estimate "
        "is wrong.")


# -- loading ---------------------------------------------------------------------------------------
Piece = tuple[int | None, str, bool]  # (layer index of a stacked Param or None, name, transpose)


def _target(path: str, params: dict[str, nnx.Variable], scanned: bool) -> tuple[str, int | None] | None:
  """Our Param for a key-map path: itself, or (scanned models) one layer of a stacked Param."""
  if path in params:
    return path, None
  split = split_layer_path(path) if scanned else None
  if split is not None and split[0] in params and split[1] < params[split[0]].shape[0]:
    return split
  return None


def _plan(model: HFModel, ckpt: _Checkpoint, key_map: KeyMap, where: str
          ) -> tuple[dict[str, list[Piece]], list[str]]:
  """Match checkpoint tensors to the model's Params; raise one error listing every mismatch.

  Returns, per Param path, its pieces ``(layer, name in checkpoint, transpose)`` (one tensor, or
  one per layer of a stacked Param), and the paths that keep a fresh initialization.
  """
  params = {module_path(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  names = key_map.normalize(list(ckpt.meta))
  problems = list(ckpt.problems) + [
      f"{n} names the same tensor as another one (legacy and current spelling both present)"
      for n in sorted(set(ckpt.meta) - set(names.values()))]
  plan: dict[str, list[Piece]] = collections.defaultdict(list)
  unexpected, wrong = [], []
  for canon, name in sorted(names.items()):
    found = key_map.path_for(canon)
    target = None if found is None else _target(found[0], params, model.scan_layers)
    if target is None:
      if not key_map.ignored(canon):
        unexpected.append(name)
      continue
    (path, layer), transpose = target, found[1]
    var = params[path]
    var_shape = tuple(var.shape[1:] if layer is not None else var.shape)
    shape, dtype, is_float = ckpt.meta[name]
    expected = tuple(reversed(var_shape)) if transpose else var_shape
    if shape != expected:
      layout = (f" (torch_weight (out, in) of our kernel (in, out) {var_shape})"
                if transpose else "")
      wrong.append(f"{name}: checkpoint {shape}, model expects {expected}{layout}")
    elif not is_float and jnp.issubdtype(var.dtype, jnp.floating):
      wrong.append(f"{name}: checkpoint dtype {dtype}, model expects a floating dtype")
    else:
      plan[path].append((layer, name, transpose))
  absent = [p for p in params if p not in plan]
  fresh = [p for p in absent if key_map.may_be_fresh(p)]
  missing = []
  for p in params:
    if p in fresh:
      continue
    found = key_map.hf_for(p)
    if found is not None or not model.scan_layers or layer_path(p, 0) is None:  # a plain Param
      if p not in plan:
        missing.append(f"{found[0] if found else '(no Hugging Face name)'} (-> {p})")
      continue
    have = {layer for layer, _, _ in plan.get(p, ())}  # a stacked Param needs every layer
    missing += [f"{key_map.hf_for(layer_path(p, i))[0]} (-> {p}[{i}])"
                for i in range(params[p].shape[0]) if i not in have]
  for title, items in (("missing from the checkpoint", missing),
                       ("unexpected in the checkpoint", unexpected),
                       ("wrong shape or dtype", wrong)):
    if items:
      problems.append(f"{title} ({len(items)}):\n    " + "\n    ".join(items))
  if problems:
    raise CheckpointError(
        f"checkpoint {where} does not fit {type(model).__name__} built from its config.json:\n  "
        + "\n  ".join(problems)
        + "\nCheck that config.json belongs to these weights (sizes, biases, tie_word_embeddings, "
        "architectures) and that no file is from another model.")
  return dict(plan), fresh


def _read(ckpt: _Checkpoint, var: nnx.Variable, pieces: list[Piece], index: Index) -> np.ndarray:
  """The part ``index`` of a Param from its checkpoint pieces, in the Param's dtype (host array)."""
  dtype = np.dtype(var.dtype)
  if pieces[0][0] is None:
    _, name, transpose = pieces[0]
    part = ckpt.get(name, index[::-1]).T if transpose else ckpt.get(name, index)
    return part.astype(dtype, copy=False)
  by_layer = {layer: (name, transpose) for layer, name, transpose in pieces}
  rows = []
  for layer in range(var.shape[0])[index[0]]:
    name, transpose = by_layer[layer]
    rows.append(ckpt.get(name, index[:0:-1]).T if transpose else ckpt.get(name, index[1:]))
  return np.stack(rows).astype(dtype, copy=False)


def _load(ckpt: _Checkpoint, var: nnx.Variable, pieces: list[Piece], mesh: Mesh | None) -> jax.Array:
  """A Param's value on the device(s): on a mesh, each device reads and receives only its slice."""
  if mesh is not None:
    return jax.make_array_from_callback(
        tuple(var.shape), sharding.named(mesh, var.get_metadata("out_sharding")),
        lambda index: _read(ckpt, var, pieces, index))
  full = tuple(slice(None) for _ in var.shape)
  if pieces[0][0] is None:
    return jnp.asarray(_read(ckpt, var, pieces, full))
  # Stacked: one layer on the host at a time.
  return jnp.concatenate([jnp.asarray(_read(ckpt, var, pieces, (slice(i, i + 1),) + full[1:]))
                          for i in range(var.shape[0])])


def _fresh_value(path: str, shape: tuple[int, ...], dtype: Any, std: float,
                 key: jax.Array) -> jax.Array:
  """HF-style initialization of a parameter the checkpoint lacks (a new head)."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "bias":
    return jnp.zeros(shape, dtype)
  if leaf == "scale":
    return jnp.ones(shape, dtype)
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _checked_config(config: dict[str, Any], file: Path, *, num_labels: int | None,
                    param_dtype: Dtype, scan_layers: bool, mesh: Mesh | None
                    ) -> tuple[type[HFModel], dict[str, Any], int]:
  """``(model class, values, bytes)`` from config.json alone, before any module exists: every
  field checked (one :class:`CheckpointError` listing all violations), and the bytes the
  parameters will take on this process (on CPU a mesh's local devices share the host's
  memory)."""
  config_schema.check_selection(config, file=file)
  try:
    cls = model_class(config, num_labels)
    values = config_schema.check(config, cls.architecture, file=file)
    labels = (config_schema.label_count(values, num_labels)
              if cls is BertForSequenceClassification else None)
    needed = sizes.config_param_bytes(cls, values, param_dtype, num_labels=labels,
                                      scan_layers=scan_layers, mesh=mesh)
  except ConfigError as err:
    raise CheckpointError(f"{file}: {err}") from err
  if mesh is not None and jax.local_devices()[0].platform == "cpu":
    needed *= len(mesh.local_devices)
  return cls, values, needed


def _initialize_fresh(params: dict[str, nnx.Param], std: float, seed: int,
                      mesh: Mesh | None) -> None:
  """Fill the parameters the checkpoint lacks (module path -> Param), one key per path from
  ``seed``, laid out on ``mesh`` by their sharding annotation."""
  keys = jax.random.split(jax.random.key(seed), len(params))
  for key, (path, param) in zip(keys, params.items()):
    value = _fresh_value(path, param.shape, param.dtype, std, key)
    if mesh is not None:
      value = sharding.place(value, sharding.named(mesh, param.get_metadata("out_sharding")))
    param.set_value(value)


def from_hf(path: str | os.PathLike[str], dtype: Dtype = jnp.float32, *,
            revision: str | None = None, param_dtype: Dtype | None = None,
            num_labels: int | None = None, max_bytes: int | None = None, seed: int = 0,
            mesh: Mesh | None = None, scan_layers: bool = False,
            warn_fresh: bool = True) -> HFModel:
  """Load a Hugging Face model (a directory or a Hub id) as an NNX model of the matching family.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or shards with
      ``model.safetensors.index.json``, or ``pytorch_model.bin``, read with
      ``torch.load(weights_only=True)``; torch is then needed); or a Hugging Face Hub id
      ``"org/name"`` (no local path of that name), whose config, tokenizer and safetensors files
      are fetched into the ``huggingface_hub`` cache (:mod:`smoa_jax.models.hub`; honours
      ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``).
    revision: branch, tag or commit of a Hub id (default ``main``).
    dtype: compute dtype, and storage dtype unless ``param_dtype`` is given.
    param_dtype: storage dtype of the weights (checkpoint tensors are cast to it).
    num_labels: BERT only: build ``BertForSequenceClassification`` with this many classes; a
      head absent from the checkpoint is freshly initialized (a warning names it).
    max_bytes: refuse models whose parameters exceed this many bytes (default: the memory free on
      the default device, or the host's available memory on CPU); on a mesh, the bytes of one
      device (all local devices on CPU, which share the host's memory).
    seed: seeds fresh initializations (new heads).
    mesh: lay the weights out on this ``("data", "fsdp", "tp")`` mesh by the family's
      ``sharding_rules`` (:mod:`smoa_jax.parallel.spmd`): every tensor is read slice by slice straight into
      its sharding, so no host or device ever holds a full copy it does not own. Under
      multi-process JAX every process calls ``from_hf`` and reads only its devices' slices.
    scan_layers: stack the layers (``(L, ...)`` Params) and run them under ``nnx.scan``; the
      layer body compiles once instead of L times.
    warn_fresh: warn about parameters the checkpoint lacks (they are in ``model.fresh_params``
      either way); turn off when an adapter about to be loaded holds them.

  Returns:
    The model (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertModel``, ...) with ``hf_config``
    and ``source_dir`` set. Causal LMs: ``model(input_ids) -> logits (B, T, vocab)``.

  Raises:
    CheckpointError: a Hub id that cannot be fetched (unknown repo or revision, offline without a
      cached copy, no safetensors weights), missing directory/config/weights, invalid JSON,
      invalid config fields (wrong type, out of range, inconsistent: all listed at once), corrupt
      or truncated files, a shard index naming missing shards, unsupported architectures, an
      unsafe pickle, or weights that
      do not fit the config (all mismatches listed at once); also when the model would not fit
      in memory (decided from config.json alone, before anything is built).
  """
  directory = hub.resolve(path, revision)
  config = _read_config(directory)
  file = directory / "config.json"
  param_dtype = dtype if param_dtype is None else param_dtype
  cls, values, needed = _checked_config(config, file, num_labels=num_labels,
                                        param_dtype=param_dtype, scan_layers=scan_layers, mesh=mesh)
  _check_size(needed, max_bytes, f"{cls.__name__} from {directory}")
  try:
    model = nnx.eval_shape(lambda: build_model(config, num_labels=num_labels, dtype=dtype,
                                               param_dtype=param_dtype, rngs=nnx.Rngs(seed),
                                               scan_layers=scan_layers))
  except ConfigError as err:
    raise CheckpointError(f"{file}: {err}") from err
  if mesh is not None:
    spmd.annotate(model, mesh)
  key_map = model.key_map()
  params = {module_path(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  with _open_checkpoint(directory) as ckpt:
    plan, fresh = _plan(model, ckpt, key_map, str(directory))
    with tqdm(total=len(plan), desc=f"loading {directory.name}", unit="tensor",
              disable=needed < _PROGRESS_BYTES or not sharding.is_main_process()) as bar:
      for p, pieces in plan.items():
        params[p].set_value(_load(ckpt, params[p], pieces, mesh))
        bar.update()
  if fresh:
    _initialize_fresh({p: params[p] for p in fresh}, values["initializer_range"], seed, mesh)
    if warn_fresh:
      warnings.warn(f"{len(fresh)} parameters are not in {directory} and were freshly "
                    f"initialized (train them before use): {fresh}", stacklevel=2)
  model.source_dir = str(directory.resolve())
  model.fresh_params = tuple(fresh)
  return model


# -- export ----------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)


def _parse_size(size: int | str) -> int:
  """``"2GB"`` -> 2e9 bytes, ``"500MiB"`` -> 500 * 2**20; an int is bytes (as transformers)."""
  if isinstance(size, int) and size > 0:
    return size
  m = _SIZE.match(str(size))
  if not m or float(m.group(1)) <= 0:
    raise CheckpointError(f"max_shard_size={size!r} is invalid: expected a positive byte count "
                          "or a string such as '2GB', '500MB' or '1GiB'.")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def _export_entries(model: HFModel) -> list[tuple[str, tuple[int, ...], Any, Callable[[], Any]]]:
  """``(hf name, torch-layout shape, dtype, value getter)`` for every exported tensor.

  A stacked Param of a scanned model ``(L, ...)`` gives L tensors, one per layer (the value of
  the whole stack is computed once per Param, when its first layer is written).
  """
  key_map = model.key_map()
  adapters = {site.path: site.module for site in linear_sites(model) if site.adapted}
  entries, unmapped = [], []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    parent = tuple(path[:-1])
    if parent in adapters:
      if path[-1] not in ("kernel", "bias"):
        continue  # adapter factors, spectral permutations, dropout rng: folded or not exported
      getter = adapters[parent].folded_kernel if path[-1] == "kernel" else (lambda v=var: v[...])
    elif isinstance(var, nnx.Param):
      getter = lambda v=var: v[...]
    else:
      continue
    found = key_map.hf_for(module_path(path))
    if found is not None:
      layers = [(found, None)]
    elif model.scan_layers and layer_path(module_path(path), 0) is not None:
      layers = [(key_map.hf_for(layer_path(module_path(path), i)), i) for i in range(var.shape[0])]
      getter = functools.lru_cache(maxsize=1)(getter)
    else:
      layers = [(None, None)]
    for found, layer in layers:
      if found is None:
        unmapped.append(module_path(path))
        break
      name, transpose = found
      one = (lambda g=getter: g()) if layer is None else (lambda g=getter, i=layer: g()[i])
      shape = tuple(var.shape[0 if layer is None else 1:])
      entries.append((name, shape[::-1] if transpose else shape, var.dtype,
                      (lambda g=one: g().T) if transpose else one))
  if unmapped:
    raise CheckpointError(f"cannot export {type(model).__name__}: parameters with no Hugging Face "
                          f"name: {unmapped}. Only the family's own layers (and adapter layers "
                          "replacing its Linear layers) can be exported; merge or remove others.")
  return entries


def _check_target(target: Path) -> None:
  if target.exists() and (not target.is_dir() or (any(target.iterdir())
                                                  and not (target / "config.json").is_file())):
    raise CheckpointError(f"refusing to overwrite {target}: it exists and is not a model "
                          "directory (no config.json). Choose a new or empty directory.")


def _write_shards(entries: list, directory: Path, limit: int) -> None:
  shards: list[list] = [[]]
  size = 0
  for entry in entries:
    nbytes = int(np.prod(entry[1])) * jnp.dtype(entry[2]).itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  total = sum(int(np.prod(e[1])) * jnp.dtype(e[2]).itemsize for e in entries)
  names = ([SAFETENSORS] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  with tqdm(total=len(entries), desc=f"writing {directory.name}", unit="tensor",
            disable=total < _PROGRESS_BYTES) as bar:
    for file, shard in zip(names, shards):
      tensors = {}
      for name, _, _, getter in shard:
        tensors[name] = np.ascontiguousarray(sharding.to_host(getter()))
        bar.update()
      save_file(tensors, str(directory / file), metadata={"format": "pt"})
      del tensors
  if len(shards) > 1:
    weight_map = {e[0]: file for file, shard in zip(names, shards) for e in shard}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def _copy_tokenizer(model: HFModel, tokenizer_dir: str | os.PathLike[str] | None,
                    directory: Path) -> None:
  source = Path(tokenizer_dir) if tokenizer_dir is not None else (
      Path(model.source_dir) if model.source_dir else None)
  if source is None:
    return
  files = [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
  if tokenizer_dir is not None and not files:
    raise CheckpointError(f"tokenizer_dir={source} holds no tokenizer files; expected some of "
                          f"{list(TOKENIZER_FILES)}.")
  for file in files:
    shutil.copy2(file, directory / file.name)


def to_hf(model: HFModel, path: str | os.PathLike[str], *, max_shard_size: int | str = "2GB",
          tokenizer_dir: str | os.PathLike[str] | None = None) -> epath.Path:
  """Write ``model`` as a Hugging Face directory that ``transformers`` loads with equal outputs.

  Adapter layers are folded (``W + dW``) and their arrays dropped; weights keep their dtype.
  Under multi-process JAX every process must call this: each tensor is gathered from the hosts
  that hold its shards (one at a time, in the same order everywhere), and process 0 alone writes.

  Args:
    model: a model from :mod:`smoa_jax.models` / :func:`from_hf`, possibly with adapters.
    path: destination directory; an existing model directory there is replaced atomically.
    max_shard_size: above this, weights are split into ``model-0000i-of-0000n.safetensors`` with
      ``model.safetensors.index.json`` (bytes, or ``"2GB"``-style strings as transformers).
    tokenizer_dir: copy tokenizer files from here (default: the directory the model was loaded
      from, when known).

  Returns:
    The destination path.
  """
  if not isinstance(model, HFModel):
    raise CheckpointError(f"to_hf exports the models of smoa_jax.models (from from_hf), got "
                          f"{type(model).__name__}.")
  target = as_path(path)
  limit = _parse_size(max_shard_size)
  _check_target(target)
  if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
    raise CheckpointError(f"tokenizer_dir={tokenizer_dir} is not a directory.")
  entries = _export_entries(model)
  if not sharding.is_main_process():
    for _, _, _, getter in entries:  # take part in every gather that process 0 makes
      sharding.to_host(getter())
    return target
  with atomic_directory(target) as staged:
    _write_shards(entries, staged, limit)
    config = model.hf_config
    counts = collections.Counter()
    for _, shape, dtype, _ in entries:
      counts[jnp.dtype(dtype).name] += int(np.prod(shape))
    config.pop("torch_dtype", None)
    config["dtype"] = counts.most_common(1)[0][0]
    (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _copy_tokenizer(model, tokenizer_dir, staged)
  return target
