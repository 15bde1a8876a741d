"""Put adapters into any NNX model, take them out again, and report what happened.

``apply_adapter(model, config, rngs=...)`` walks the module tree, selects ``nnx.Linear`` layers by
``config.target_modules`` / ``exclude_modules`` / ``layers_to_transform`` and replaces each, in
place, by the adapter layer of the config's method (``SMoADense``, ``LoRADense``, ``HiRADense``);
for :class:`~smoa_jax.FullFineTuneConfig` it re-types the selected kernels to ``TrainableParam``
instead. The frozen ``kernel``/``bias`` Variables are moved into the new layers, never copied.
Selection is the only step that interprets patterns: :func:`adapt_modules` adapts an exact list
of module paths, and the adapter loaders call it with the paths a file names.

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
from typing import Iterator

import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from smoa_jax.core.config import AdapterConfig
from smoa_jax.core.spectral import SpectralBlocks, spectral_blocks_batched
from smoa_jax.errors import ConfigError, TargetError
from smoa_jax.layers.dense import adapter_class
from smoa_jax.layers.paths import layer_index, module_path
from smoa_jax.layers.sites import (LinearSite, adapter_layers, linear_sites, replace_module,
                                   retype_variable, sites_by_name)
from smoa_jax.layers.stacked import adapt_stacked, stack_blocks
from smoa_jax.layers.variables import TrainableParam
from smoa_jax.parallel import sharding

__all__ = [
    "AdapterReport",
    "ModuleReport",
    "apply_adapter",
    "adapt_modules",
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


def count_params(model: nnx.Module) -> int:
  """Number of scalars in all ``nnx.Param`` (incl. ``TrainableParam``) Variables; shared ones once."""
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


def _select(model: nnx.Module, config: AdapterConfig) -> list[LinearSite]:
  """The unadapted linear layers ``config`` targets; raises naming the candidates if none."""
  sites = linear_sites(model)
  candidates = [s for s in sites if not s.adapted]
  chosen = [s for s in candidates if _matches(config.target_modules, s.name)]
  if config.exclude_modules is not None:
    chosen = [s for s in chosen if not _matches(config.exclude_modules, s.name)]
  if config.layers_to_transform is not None:
    found = sorted({i for s in candidates if (i := layer_index(s.name)) is not None})
    missing = sorted(set(config.layers_to_transform) - set(found))
    if missing:
      span = f"{found[0]}..{found[-1]}" if found else "none (no 'layers/<i>' in any path)"
      raise TargetError(f"layers_to_transform={list(config.layers_to_transform)}: layers {missing} "
                        f"do not exist; the model's layer indices are {span}.")
    chosen = [s for s in chosen if layer_index(s.name) in config.layers_to_transform]
  if not chosen:
    names = [s.name for s in candidates]
    adapted = [s.name for s in sites if s.adapted]
    shown = "\n  ".join(names[:40]) + ("\n  ..." if len(names) > 40 else "")
    hint = (f"\n{len(adapted)} modules are already adapted (call merge_and_unload first to "
            "adapt them again)." if adapted else "")
    exclude = "" if config.exclude_modules is None else f", exclude_modules={config.exclude_modules!r}"
    layers = ("" if config.layers_to_transform is None
              else f", layers_to_transform={list(config.layers_to_transform)}")
    raise TargetError(
        f"no linear layer matched target_modules={config.target_modules!r}{exclude}{layers}. "
        f"Candidate linear layers ({len(names)}):\n  {shown or '(none)'}{hint}")
  return chosen


def _spectral_blocks_by_shape(targets: list[LinearSite], config: AdapterConfig,
                              show_progress: bool | None) -> dict[str, SpectralBlocks]:
  """Spectral blocks of every target, one batched computation per kernel shape.

  A stacked (scanned) target ``kernel (L, in, out)`` contributes L kernels and gets its blocks
  stacked (:func:`smoa_jax.layers.stacked.stack_blocks`). Layers are sliced chunk by chunk, so
  at most one chunk of kernel copies exists at a time.
  """
  by_shape: dict[tuple[int, ...], list[tuple[str, int | None, nnx.Variable]]] = defaultdict(list)
  for site in targets:
    kernel = site.module.kernel
    for i in (range(site.num_layers) if site.num_layers else (None,)):
      by_shape[site.shape].append((site.name, i, kernel))
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
        for (name, _, _), b in zip(group, blocks):
          found[name].append(b)
        bar.update(len(group))
  stacked = {s.name for s in targets if s.num_layers}
  return {name: stack_blocks(bs) if name in stacked else bs[0] for name, bs in found.items()}


def _adapt(model: nnx.Module, site: LinearSite, config: AdapterConfig, rngs: nnx.Rngs,
           blocks: SpectralBlocks | None) -> ModuleReport:
  """Adapt one site in place (a new layer, or the kernel re-typed); its report row."""
  n_in, n_out = site.shape
  layers = site.num_layers or 1
  if config.trains_base_kernel:
    retype_variable(model, site.path + ("kernel",), TrainableParam)
    op = config.make_op(n_in, n_out)
  else:
    new = (adapt_stacked(site.module, config, rngs=rngs, blocks=blocks) if site.num_layers
           else adapter_class(config).from_linear(site.module, config, rngs=rngs, blocks=blocks))
    replace_module(model, site.path, new)
    op = new.op
  return ModuleReport(site.name, n_in, n_out, config.method, op.num_blocks, op.ranks,
                      op.num_params * layers)


def adapt_modules(model: nnx.Module, config: AdapterConfig, names: list[str], *,
                  rngs: nnx.Rngs, verbose: bool = True, show_progress: bool | None = None,
                  blocks: dict[str, SpectralBlocks] | None = None) -> AdapterReport:
  """Adapt exactly the linear layers at module paths ``names``, in place (no pattern matching).

  This is :func:`apply_adapter` after selection; the adapter loaders call it with the paths a
  file names. ``blocks`` (by path) are used where given, the rest are computed (methods in W's
  spectral order only).

  Raises:
    TargetError: a name is not a linear layer of the model, or is already adapted.
    ConfigError: the config does not fit a layer (e.g. ``num_blocks`` too large).
  """
  if not isinstance(config, AdapterConfig) or type(config) is AdapterConfig:
    raise ConfigError(f"apply_adapter needs an SMoAConfig, LoRAConfig, HiRAConfig or "
                      f"FullFineTuneConfig, got {type(config).__name__}.")
  sites = sites_by_name(model)
  unknown = [n for n in names if n not in sites]
  adapted = [n for n in names if n in sites and sites[n].adapted]
  if unknown or adapted:
    raise TargetError(f"cannot adapt {unknown + adapted}: "
                      + (f"not linear layers of {type(model).__name__} (e.g. {sorted(sites)[:6]})"
                         if unknown else "already adapted (call merge_and_unload first)") + ".")
  targets = [sites[n] for n in names]
  for site in targets:
    if len(site.module.kernel.shape) not in (2, 3):
      raise ConfigError(f"{site.name} has a kernel of shape {tuple(site.module.kernel.shape)}; "
                        "only (in, out) kernels and stacked (layers, in, out) kernels of scanned "
                        "models can be adapted.")
    config.check_layer(*site.shape, site.name)
  known = dict(blocks or {})
  if config.spectral_order:
    todo = [s for s in targets if s.name not in known]
    known.update(_spectral_blocks_by_shape(todo, config, show_progress) if todo else {})
  entries = [_adapt(model, site, config, rngs, known.get(site.name)) for site in targets]
  report = AdapterReport(config, tuple(entries), count_params(model))
  if verbose:
    report.print()
  return report


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
  names = [site.name for site in _select(model, config)]
  return adapt_modules(model, config, names, rngs=rngs, verbose=verbose,
                       show_progress=show_progress, blocks=blocks)


def mark_trainable(model: nnx.Module, pattern: str) -> list[str]:
  """Make every ``nnx.Param`` whose ``/``-joined path full-matches ``pattern`` trainable, in place.

  The Variables are re-typed to ``TrainableParam`` (values and metadata kept), so the same
  optimizer filter trains them and :func:`~smoa_jax.save_adapter` stores them with the adapter,
  like PEFT's ``modules_to_save`` (e.g. ``pattern=r"classifier/.*"`` for a fresh task head).

  Returns the re-typed paths; raises :class:`TargetError` if none matched.
  """
  regex = re.compile(pattern)
  chosen = [path for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param) and not isinstance(v, TrainableParam)
            and regex.fullmatch(module_path(path))]
  if not chosen:
    raise TargetError(f"mark_trainable: no frozen parameter path matched {pattern!r}.")
  for path in chosen:
    retype_variable(model, path, TrainableParam)
  return [module_path(p) for p in chosen]


def merge_and_unload(model: nnx.Module) -> nnx.Module:
  """Fold every adapter into its kernel and put back plain ``nnx.Linear`` layers (in place).

  Arrays made trainable by :class:`FullFineTuneConfig` or :func:`mark_trainable` become
  ``nnx.Param`` again. The merged kernel is ``W + dW`` summed in float32 and cast to the kernel
  dtype. Returns ``model``.
  """
  for site in [s for s in linear_sites(model) if s.adapted]:
    replace_module(model, site.path, site.module.to_linear())
  for path in [p for p, v in nnx.iter_graph(model) if isinstance(v, TrainableParam)]:
    retype_variable(model, path, nnx.Param)
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
