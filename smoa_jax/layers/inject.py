"""Put adapters into any NNX model, take them out again, and report what happened.

``apply_adapter(model, config, rngs=...)`` walks the module tree, selects ``nnx.Linear`` layers by
``config.target_modules`` / ``exclude_modules`` / ``layers_to_transform`` and replaces each, in
place, by the adapter layer of the config's method (``SMoADense``, ``LoRADense``, ``HiRADense``);
for :class:`~smoa_jax.FullFineTuneConfig` it re-types the selected kernels to ``SMoAParam``
instead. The frozen ``kernel``/``bias`` Variables are moved into the new layers, never copied.

Matching (module paths are the ``/``-joined attribute path, e.g. ``model/layers/3/self_attn/q_proj``):

* a list of names matches the last path component(s): ``"q_proj"`` or ``"self_attn/q_proj"``;
* a single string is a regex, full-matched against the whole path;
* ``layers_to_transform`` keeps modules whose path holds one of these indices right after a
  ``layers`` / ``layer`` / ``h`` / ``blocks`` component.

SMoA's spectral preprocessing runs batched over targets of one shape, with a progress bar when
there are many; kernels laid out on a device mesh are decomposed on the devices, a chunk of
(at least) one kernel per device at a time (:func:`smoa_jax.spectral_blocks_batched`). Stacked
kernels ``(L, in, out)`` of scanned models get stacked adapter layers with per-layer spectral
blocks (:mod:`smoa_jax.layers.stacked`). The returned :class:`AdapterReport` lists every adapted module;
printing it gives the table and the trainable share of parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from smoa_jax.parallel import sharding
from smoa_jax.core.config import AdapterConfig, FullFineTuneConfig, SMoAConfig
from smoa_jax.errors import ConfigError, TargetError
from smoa_jax.layers.paths import layer_index, module_path
from smoa_jax.layers.dense import AdaptedDense, SMoAParam, adapter_class
from smoa_jax.core.spectral import SpectralBlocks, spectral_blocks_batched
from smoa_jax.layers.stacked import adapt_stacked, stack_blocks

__all__ = [
    "AdapterReport",
    "ModuleReport",
    "apply_adapter",
    "adapter_layers",
    "merge_and_unload",
    "merge_adapters",
    "unmerge_adapters",
    "disable_adapter",
    "count_params",
    "mark_trainable",
]

# Show a progress bar for spectral preprocessing from this many SMoA targets on.
PROGRESS_MIN_TARGETS = 8


def _matches(patterns: tuple[str, ...] | str, path: str) -> bool:
  if isinstance(patterns, str):
    return re.fullmatch(patterns, path) is not None
  parts = path.split("/")
  for name in patterns:
    wanted = name.split("/")
    if parts[-len(wanted):] == wanted:
      return True
  return False


def _linear_layers(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
  """All ``nnx.Linear`` and adapter layers with their paths (shared modules once)."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, (nnx.Linear, AdaptedDense))]


def adapter_layers(model: nnx.Module) -> list[tuple[str, AdaptedDense]]:
  """Every adapter layer of ``model`` with its ``/``-joined path, in tree order."""
  return [(module_path(path), node) for path, node in nnx.iter_graph(model)
          if isinstance(node, AdaptedDense)]


def count_params(model: nnx.Module) -> int:
  """Number of scalars in all ``nnx.Param`` (incl. ``SMoAParam``) Variables; shared ones once."""
  return sum(int(np.prod(v.shape)) for _, v in nnx.iter_graph(model)
             if isinstance(v, nnx.Param))


@dataclasses.dataclass(frozen=True)
class ModuleReport:
  """One adapted module: its path, kernel shape, and the adapter's block structure."""

  path: str
  in_features: int
  out_features: int
  method: str
  num_blocks: int
  ranks: tuple[int, ...]
  trainable_params: int


@dataclasses.dataclass(frozen=True)
class AdapterReport:
  """What :func:`apply_adapter` did. ``str(report)`` is a table plus PEFT's one-line summary."""

  config: AdapterConfig
  modules: tuple[ModuleReport, ...]
  total_params: int

  @property
  def trainable_params(self) -> int:
    return sum(m.trainable_params for m in self.modules)

  @property
  def trainable_percent(self) -> float:
    return 100.0 * self.trainable_params / max(self.total_params, 1)

  def summary(self) -> str:
    """``trainable params: X || all params: Y || trainable%: Z`` (PEFT's wording)."""
    return (f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
            f"trainable%: {self.trainable_percent:.4f}")

  def table(self) -> Table:
    table = Table(title=f"{self.config.method} adapters on {len(self.modules)} modules")
    for column in ("module", "in x out", "K", "ranks", "trainable"):
      table.add_column(column, justify="left" if column == "module" else "right")
    for m in self.modules:
      table.add_row(m.path, f"{m.in_features}x{m.out_features}", str(m.num_blocks),
                    ",".join(map(str, m.ranks)), f"{m.trainable_params:,}")
    return table

  def print(self, console: Console | None = None) -> None:
    """Print the table and the summary line (to stdout unless a console is given)."""
    console = console or Console()
    console.print(self.table())
    console.print(self.summary(), soft_wrap=True)

  def __str__(self) -> str:
    console = Console(width=120, record=True, file=io.StringIO())  # record, don't print
    self.print(console)
    return console.export_text()


def _select(model: nnx.Module, config: AdapterConfig) -> list[tuple[tuple[Any, ...], nnx.Module]]:
  layers = _linear_layers(model)
  candidates = [(p, m) for p, m in layers if not isinstance(m, AdaptedDense)]
  chosen = [(p, m) for p, m in candidates if _matches(config.target_modules, module_path(p))]
  if config.exclude_modules is not None:
    chosen = [(p, m) for p, m in chosen if not _matches(config.exclude_modules, module_path(p))]
  if config.layers_to_transform is not None:
    found = sorted({i for p, _ in candidates if (i := layer_index(module_path(p))) is not None})
    missing = sorted(set(config.layers_to_transform) - set(found))
    if missing:
      span = f"{found[0]}..{found[-1]}" if found else "none (no 'layers/<i>' in any path)"
      raise TargetError(f"layers_to_transform={list(config.layers_to_transform)}: layers {missing} "
                        f"do not exist; the model's layer indices are {span}.")
    chosen = [(p, m) for p, m in chosen if layer_index(module_path(p)) in config.layers_to_transform]
  if not chosen:
    names = [module_path(p) for p, _ in candidates]
    adapted = [module_path(p) for p, m in layers if isinstance(m, AdaptedDense)]
    shown = "\n  ".join(names[:40]) + ("\n  ..." if len(names) > 40 else "")
    hint = (f"\n{len(adapted)} modules are already adapted (call merge_and_unload first to "
            "adapt them again)." if adapted else "")
    raise TargetError(
        f"no linear layer matched target_modules={config.target_modules!r}"
        f"{'' if config.exclude_modules is None else f', exclude_modules={config.exclude_modules!r}'}"
        f"{'' if config.layers_to_transform is None else f', layers_to_transform={list(config.layers_to_transform)}'}"
        f". Candidate linear layers ({len(names)}):\n  {shown or '(none)'}{hint}")
  return chosen


def _replace(model: nnx.Module, path: tuple[Any, ...], new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _spectral_blocks_by_shape(targets, config: SMoAConfig, show_progress: bool | None
                              ) -> dict[str, SpectralBlocks]:
  """Spectral blocks of every target, one batched computation per kernel shape.

  A stacked (scanned) target ``kernel (L, in, out)`` contributes L kernels and gets its blocks
  stacked (:func:`smoa_jax.layers.stacked.stack_blocks`). Layers are sliced chunk by chunk, so at most
  one chunk of kernel copies exists at a time.
  """
  by_shape: dict[tuple[int, ...], list[tuple[str, int | None, nnx.Variable]]] = defaultdict(list)
  for path, layer in targets:
    shape = tuple(layer.kernel.shape[-2:])
    config.check_layer(*shape, module_path(path))
    stacked = len(layer.kernel.shape) == 3
    for i in (range(layer.kernel.shape[0]) if stacked else (None,)):
      by_shape[shape].append((module_path(path), i, layer.kernel))
  total = sum(len(items) for items in by_shape.values())
  show = total >= PROGRESS_MIN_TARGETS if show_progress is None else show_progress
  found: dict[str, list[SpectralBlocks]] = defaultdict(list)
  with tqdm(total=total, desc="spectral blocks", unit="kernel", disable=not show,
            file=sys.stderr) as bar:
    for shape, items in by_shape.items():
      bar.set_postfix_str(f"{shape[0]}x{shape[1]}")
      mesh = sharding.mesh_of(items[0][2].get_value())
      chunk = max(8, mesh.size if mesh is not None else 1)  # on a mesh: >= one kernel per device
      for start in range(0, len(items), chunk):
        group = items[start:start + chunk]
        kernels = [var[...] if i is None else var[i] for _, i, var in group]
        blocks = spectral_blocks_batched(kernels, config.num_blocks,
                                         method=config.spectral_method, chunk_size=chunk)
        for (path, _, _), b in zip(group, blocks):
          found[path].append(b)
        bar.update(len(group))
  stacked_paths = {module_path(p) for p, layer in targets if len(layer.kernel.shape) == 3}
  return {path: stack_blocks(bs) if path in stacked_paths else bs[0] for path, bs in found.items()}


def apply_adapter(model: nnx.Module, config: AdapterConfig, *, rngs: nnx.Rngs,
                  verbose: bool = True, show_progress: bool | None = None,
                  blocks: dict[str, SpectralBlocks] | None = None) -> AdapterReport:
  """Adapt the selected ``nnx.Linear`` layers of ``model`` in place; see the module docstring.

  Args:
    model: any NNX module tree.
    config: ``SMoAConfig``, ``LoRAConfig``, ``HiRAConfig`` or ``FullFineTuneConfig``.
    rngs: initializes the factors (``params`` stream) and drives adapter dropout (``dropout``).
    verbose: print the report table and the trainable share.
    show_progress: progress bar for spectral preprocessing (default: from 8 SMoA targets on).
    blocks: precomputed spectral blocks by module path (e.g. from a saved adapter); modules not
      in it are preprocessed as usual.

  Returns:
    An :class:`AdapterReport`.

  Raises:
    TargetError: nothing matched (the message lists the candidate linear layers), or
      ``layers_to_transform`` names layers the model does not have.
    ConfigError: the config does not fit a matched layer (e.g. ``num_blocks`` too large).
  """
  if not isinstance(config, AdapterConfig) or type(config) is AdapterConfig:
    raise ConfigError(f"apply_adapter needs an SMoAConfig, LoRAConfig, HiRAConfig or "
                      f"FullFineTuneConfig, got {type(config).__name__}.")
  targets = _select(model, config)
  for path, layer in targets:
    if len(layer.kernel.shape) not in (2, 3):
      raise ConfigError(f"{module_path(path)} has a kernel of shape {tuple(layer.kernel.shape)}; "
                        "only (in, out) kernels and stacked (layers, in, out) kernels of scanned "
                        "models can be adapted.")
  entries = []
  if isinstance(config, FullFineTuneConfig):
    for path, layer in targets:
      n_in, n_out = layer.kernel.shape[-2:]
      _retype(model, path + ("kernel",), SMoAParam)
      entries.append(ModuleReport(module_path(path), n_in, n_out, config.method, 1, (),
                                  int(np.prod(layer.kernel.shape))))
  else:
    known = dict(blocks or {})
    if isinstance(config, SMoAConfig):
      todo = [(p, m) for p, m in targets if module_path(p) not in known]
      known.update(_spectral_blocks_by_shape(todo, config, show_progress) if todo else {})
    cls = adapter_class(config)
    for path, layer in targets:
      name = module_path(path)
      if len(layer.kernel.shape) == 3:
        new = adapt_stacked(layer, config, rngs=rngs, blocks=known.get(name))
      else:
        new = cls.from_linear(layer, config, rngs=rngs, blocks=known.get(name))
      _replace(model, path, new)
      layout = getattr(new.op, "layout", None)
      ranks = layout.ranks if layout is not None else (config.r,)
      entries.append(ModuleReport(name, new.in_features, new.out_features, config.method,
                                  len(ranks), ranks, new.num_trainable_params))
  report = AdapterReport(config, tuple(entries), count_params(model))
  if verbose:
    report.print()
  return report


def _retype(model: nnx.Module, path: tuple[Any, ...], cls: type[nnx.Variable]) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  old = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
  _replace(model, path, cls(old[...], **old.get_metadata()))


def mark_trainable(model: nnx.Module, pattern: str) -> list[str]:
  """Make every ``nnx.Param`` whose ``/``-joined path full-matches ``pattern`` trainable, in place.

  The Variables are re-typed to ``SMoAParam`` (values and metadata kept), so the same optimizer
  filter trains them and :func:`~smoa_jax.save_adapter` stores them with the adapter, like PEFT's
  ``modules_to_save`` (e.g. ``pattern=r"classifier/.*"`` for a fresh task head).

  Returns the re-typed paths; raises :class:`TargetError` if none matched.
  """
  regex = re.compile(pattern)
  chosen = [path for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param) and not isinstance(v, SMoAParam)
            and regex.fullmatch(module_path(path))]
  if not chosen:
    raise TargetError(f"mark_trainable: no frozen parameter path matched {pattern!r}.")
  for path in chosen:
    _retype(model, path, SMoAParam)
  return [module_path(p) for p in chosen]


def merge_and_unload(model: nnx.Module) -> nnx.Module:
  """Fold every adapter into its kernel and put back plain ``nnx.Linear`` layers (in place).

  Arrays made trainable by :class:`FullFineTuneConfig` or :func:`mark_trainable` become
  ``nnx.Param`` again. The
  merged kernel is ``W + dW`` summed in float32 and cast to the kernel dtype. Returns ``model``.
  """
  for path, layer in [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, AdaptedDense)]:
    _replace(model, path, layer.to_linear())
  for path in [p for p, v in nnx.iter_graph(model) if isinstance(v, SMoAParam)]:
    _retype(model, path, nnx.Param)
  return model


def merge_adapters(model: nnx.Module) -> None:
  """Merge every adapter layer in place (``layer.merge()``): inference then costs the base model."""
  for _, layer in adapter_layers(model):
    layer.merge()


def unmerge_adapters(model: nnx.Module) -> None:
  """Undo :func:`merge_adapters` (kernels recovered up to float rounding)."""
  for _, layer in adapter_layers(model):
    layer.unmerge()


@contextlib.contextmanager
def disable_adapter(model: nnx.Module) -> Iterator[nnx.Module]:
  """Context manager: inside, every adapter layer computes the base ``x @ W + bias``.

  Exception-safe and nestable: each layer's previous state is restored on exit.
  """
  with contextlib.ExitStack() as stack:
    for _, layer in adapter_layers(model):
      stack.enter_context(layer.disable())
    yield model
