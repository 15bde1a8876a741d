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

Several named adapters (``name=``; docs/design.md section 3): a layer may hold many adapters, one
active. :func:`apply_adapter` and :func:`adapt_modules` add the adapter ``name`` (``"default"``
unless given) to every selected layer, whether it is a plain ``nnx.Linear`` or already holds
other adapters, and make it the model's active adapter; :func:`set_adapter` switches (layers
without the adapter then have none active), :func:`list_adapters`, :func:`delete_adapter` and
``merge_and_unload(model, name=...)`` complete the set. Only the active adapter's arrays are
``TrainableParam``, so only it trains. Trainable arrays outside adapter layers (heads made
trainable, fully fine-tuned kernels) belong to the base, not to an adapter.

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
from typing import Iterator, Sequence

import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from smoa_jax.core.config import AdapterConfig
from smoa_jax.core.spectral import SpectralBlocks, spectral_blocks_batched
from smoa_jax.errors import AdapterMismatchError, ConfigError, TargetError
from smoa_jax.layers.dense import DEFAULT_ADAPTER, AdaptedDense, adapter_class, check_adapter_name
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
    "set_adapter",
    "list_adapters",
    "active_adapter",
    "delete_adapter",
    "using_adapter",
    "loading_adapter",
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


def _select(model: nnx.Module, config: AdapterConfig, name: str) -> list[LinearSite]:
  """The linear layers ``config`` targets that hold no adapter ``name`` yet; raises naming the
  candidates if none."""
  sites = linear_sites(model)
  candidates = [s for s in sites if not s.holds(name)]
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
    holding = [s.name for s in sites if s.holds(name)]
    shown = "\n  ".join(names[:40]) + ("\n  ..." if len(names) > 40 else "")
    hint = (f"\n{len(holding)} modules already hold an adapter named {name!r} (give the new "
            "adapter another name=, or call delete_adapter / merge_and_unload first)."
            if holding else "")
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
  show = show and sharding.is_main_process()  # one bar per job, not one per host
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
           blocks: SpectralBlocks | None, name: str) -> ModuleReport:
  """Adapt one site in place (a new layer, a new adapter of an adapter layer, or the kernel
  re-typed); its report row."""
  n_in, n_out = site.shape
  layers = site.num_layers or 1
  if config.trains_base_kernel:
    retype_variable(model, site.path + ("kernel",), TrainableParam)
    op = config.make_op(n_in, n_out)
  else:
    holder = site.module if isinstance(site.module, AdaptedDense) else None
    base = site.module if holder is None else holder.base_linear()
    new = (adapt_stacked(base, config, rngs=rngs, blocks=blocks, name=name) if site.num_layers
           else adapter_class(config).from_linear(base, config, rngs=rngs, blocks=blocks,
                                                  name=name))
    op = new.op
    if holder is None:
      replace_module(model, site.path, new)
    else:  # the layer keeps its other adapters; the new one becomes its active adapter
      holder.adopt(new, name)
  return ModuleReport(site.name, n_in, n_out, config.method, op.num_blocks, op.ranks,
                      op.num_params * layers)


def _check_config(config: AdapterConfig, name: str | None) -> str:
  """The adapter's name (``"default"`` for None) after checking the config can be one."""
  if not isinstance(config, AdapterConfig) or type(config) is AdapterConfig:
    raise ConfigError(f"apply_adapter needs an SMoAConfig, LoRAConfig, HiRAConfig or "
                      f"FullFineTuneConfig, got {type(config).__name__}.")
  name = check_adapter_name(DEFAULT_ADAPTER if name is None else name)
  if config.trains_base_kernel and name != DEFAULT_ADAPTER:
    raise ConfigError(f"{type(config).__name__} trains the base kernels themselves, so it cannot "
                      f"be a named adapter ({name!r}) beside others; apply it without name=.")
  return name


def adapt_modules(model: nnx.Module, config: AdapterConfig, names: list[str], *,
                  rngs: nnx.Rngs, verbose: bool = True, show_progress: bool | None = None,
                  blocks: dict[str, SpectralBlocks] | None = None,
                  name: str | None = None) -> AdapterReport:
  """Adapt exactly the linear layers at module paths ``names``, in place (no pattern matching).

  This is :func:`apply_adapter` after selection; the adapter loaders call it with the paths a
  file names. ``blocks`` (by path) are used where given, the rest are computed (methods in W's
  spectral order only). The adapter is named ``name`` (``"default"``) and becomes the model's
  active adapter (:func:`set_adapter`).

  Raises:
    TargetError: a name is not a linear layer of the model, or already holds an adapter ``name``.
    ConfigError: the config does not fit a layer (e.g. ``num_blocks`` too large), or a layer's
      active adapter is merged.
  """
  name = _check_config(config, name)
  sites = sites_by_name(model)
  unknown = [n for n in names if n not in sites]
  holding = [n for n in names if n in sites and sites[n].holds(name)]
  if unknown or holding:
    raise TargetError(f"cannot adapt {unknown + holding}: "
                      + (f"not linear layers of {type(model).__name__} (e.g. {sorted(sites)[:6]})"
                         if unknown else f"they already hold an adapter named {name!r} (give "
                         "the new one another name=, or call delete_adapter / merge_and_unload "
                         "first)") + ".")
  targets = [sites[n] for n in names]
  for site in targets:
    if isinstance(site.module, AdaptedDense) and config.trains_base_kernel:
      raise TargetError(f"{site.name} holds adapters {list(site.module.adapter_names)}; full "
                        "fine-tuning trains plain linear layers only (delete_adapter first).")
    if isinstance(site.module, AdaptedDense) and site.module.merged:
      raise ConfigError(f"{site.name}: its adapter {site.module.adapter_name!r} is merged into "
                        "the kernel; unmerge it before adding another adapter.")
    if len(site.module.kernel.shape) not in (2, 3):
      raise ConfigError(f"{site.name} has a kernel of shape {tuple(site.module.kernel.shape)}; "
                        "only (in, out) kernels and stacked (layers, in, out) kernels of scanned "
                        "models can be adapted.")
    config.check_layer(*site.shape, site.name)
  known = dict(blocks or {})
  if config.spectral_order:
    todo = [s for s in targets if s.name not in known]
    known.update(_spectral_blocks_by_shape(todo, config, show_progress) if todo else {})
  entries = [_adapt(model, site, config, rngs, known.get(site.name), name) for site in targets]
  if not config.trains_base_kernel:
    _activate(model, name)
  report = AdapterReport(config, tuple(entries), count_params(model))
  if verbose and sharding.is_main_process():
    report.print()
  return report


def apply_adapter(model: nnx.Module, config: AdapterConfig, *, rngs: nnx.Rngs,
                  verbose: bool = True, show_progress: bool | None = None,
                  blocks: dict[str, SpectralBlocks] | None = None,
                  name: str | None = None) -> AdapterReport:
  """Adapt the selected ``nnx.Linear`` layers of ``model`` in place; see the module docstring.

  Args:
    model: any NNX module tree.
    config: ``SMoAConfig``, ``LoRAConfig``, ``HiRAConfig`` or ``FullFineTuneConfig``.
    rngs: initializes the factors (``params`` stream) and drives adapter dropout (``dropout``).
    verbose: print the report table and the trainable share (on process 0 only).
    show_progress: progress bar for spectral preprocessing (default: from 8 SMoA targets on;
      on process 0 only).
    blocks: precomputed spectral blocks by module path (e.g. from a saved adapter); modules not
      in it are preprocessed as usual.
    name: name the adapter (default ``"default"``): layers that already hold other adapters
      keep them, and the new adapter becomes the model's active one (see the module docstring).

  Returns:
    An :class:`AdapterReport`.

  Raises:
    TargetError: nothing matched (the message lists the candidate linear layers), or
      ``layers_to_transform`` names layers the model does not have.
    ConfigError: the config does not fit a matched layer (e.g. ``num_blocks`` too large).
  """
  name = _check_config(config, name)
  names = [site.name for site in _select(model, config, name)]
  return adapt_modules(model, config, names, rngs=rngs, verbose=verbose,
                       show_progress=show_progress, blocks=blocks, name=name)


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


def merge_and_unload(model: nnx.Module, name: str | None = None) -> nnx.Module:
  """Fold the active adapter (or adapter ``name``) into the kernels and put back plain
  ``nnx.Linear`` layers (in place); every other adapter is dropped.

  Arrays made trainable by :class:`FullFineTuneConfig` or :func:`mark_trainable` become
  ``nnx.Param`` again. The merged kernel is ``W + dW`` summed in float32 and cast to the kernel
  dtype. Returns ``model``.

  Raises:
    AdapterMismatchError: no layer holds an adapter ``name``.
  """
  if name is not None:
    set_adapter(model, name)
  for site in [s for s in linear_sites(model) if isinstance(s.module, AdaptedDense)]:
    replace_module(model, site.path, site.module.to_linear())
  for path in [p for p, v in nnx.iter_graph(model) if isinstance(v, TrainableParam)]:
    retype_variable(model, path, nnx.Param)
  return model


def _adapter_holders(model: nnx.Module) -> list[LinearSite]:
  return [s for s in linear_sites(model) if isinstance(s.module, AdaptedDense)]


def list_adapters(model: nnx.Module) -> list[str]:
  """The names of every adapter the model's layers hold (sorted); :func:`active_adapter` says
  which one is active."""
  return sorted({n for site in _adapter_holders(model) for n in site.module.adapter_names})


def active_adapter(model: nnx.Module) -> str | None:
  """The name of the model's active adapter, or None when no layer has one active.

  Raises:
    AdapterMismatchError: layers have different adapters active (only layer-level calls to
      ``AdaptedDense.set_adapter`` can do that; :func:`set_adapter` mends it).
  """
  names = {s.module.adapter_name for s in _adapter_holders(model)} - {None}
  if len(names) > 1:
    raise AdapterMismatchError(f"the model's layers have different adapters active "
                               f"({sorted(names)}); call smoa_jax.set_adapter(model, name).")
  return names.pop() if names else None


def _activate(model: nnx.Module, name: str | None) -> None:
  """Activate ``name`` on every layer holding it and none on the others (checked first, so a
  merged layer leaves the model as it was)."""
  holders = _adapter_holders(model)
  for site in holders:
    wanted = name if site.holds(name) else None
    if site.module.merged and site.module.adapter_name != wanted:
      raise ConfigError(f"{site.name}: adapter {site.module.adapter_name!r} is merged into the "
                        "kernel; call smoa_jax.unmerge_adapters(model) before switching adapters.")
  for site in holders:
    site.module.set_adapter(name if site.holds(name) else None)


def set_adapter(model: nnx.Module, name: str | None) -> None:
  """Make adapter ``name`` the model's active adapter, in place; ``None`` deactivates all.

  Layers holding ``name`` switch to it; the other adapter layers have no active adapter and
  compute their base ``x @ W + bias``. Nothing is copied or recomputed: the kernels stay the same
  Variables and the adapters' arrays move between the active paths and ``inactive``, so
  switching back gives bit-identical outputs. Only the active adapter trains.

  Raises:
    AdapterMismatchError: no layer holds an adapter ``name`` (the message lists those held).
    ConfigError: a layer that would switch has its adapter merged (unmerge first).
  """
  if name is not None and name not in list_adapters(model):
    raise AdapterMismatchError(f"the model holds no adapter named {name!r}; it holds "
                               f"{list_adapters(model)}.")
  _activate(model, name)


@contextlib.contextmanager
def using_adapter(model: nnx.Module, name: str | None) -> Iterator[nnx.Module]:
  """Context manager: adapter ``name`` is active inside; the adapter active before is restored
  on exit (also on an exception)."""
  previous = active_adapter(model)
  set_adapter(model, name)
  try:
    yield model
  finally:
    _activate(model, previous)


@contextlib.contextmanager
def loading_adapter(model: nnx.Module, name: str | None, *,
                    extras: Sequence[str] = ()) -> Iterator[str]:
  """What every adapter loader does around its work; yields the adapter's name.

  Inside, the layers holding adapter ``name`` (``"default"``) have it active and the others none,
  so a loader sees exactly the layers it may fill (``site.adapted``) and adapts the rest under
  ``name``. An error inside removes the adapter again if it is new and restores the adapter
  active before. ``extras`` are the trainable
  arrays outside adapter layers (heads) the file carries: they belong to the base model, so they
  are refused when the model holds other adapters, whose outputs they would change.
  """
  name = check_adapter_name(DEFAULT_ADAPTER if name is None else name)
  others = [n for n in list_adapters(model) if n != name]
  if extras and others:
    raise AdapterMismatchError(
        f"the adapter carries trainable arrays outside adapter layers ({list(extras)[:4]}), "
        f"which every adapter of a model shares, but the model also holds adapters {others}: "
        "load it into a model of its own (or delete_adapter the others first).")
  previous, new = active_adapter(model), name not in list_adapters(model)
  _activate(model, name)
  try:
    yield name
  except BaseException:
    if new and name in list_adapters(model):
      delete_adapter(model, name)
    _activate(model, previous)
    raise


def delete_adapter(model: nnx.Module, name: str) -> None:
  """Remove adapter ``name`` from every layer, in place; a layer left without adapters becomes
  a plain ``nnx.Linear`` over its own kernel and bias Variables (no copy).

  Raises:
    AdapterMismatchError: no layer holds an adapter ``name``.
    ConfigError: the adapter is active and merged somewhere (unmerge first).
  """
  holders = [s for s in _adapter_holders(model) if s.holds(name)]
  if not holders:
    raise AdapterMismatchError(f"the model holds no adapter named {name!r}; it holds "
                               f"{list_adapters(model)}.")
  merged = [s.name for s in holders if s.module.merged and s.module.adapter_name == name]
  if merged:
    raise ConfigError(f"adapter {name!r} is merged into {merged[:4]}; call "
                      "smoa_jax.unmerge_adapters(model) before deleting it.")
  for site in holders:
    site.module.remove_adapter(name)
    if not site.module.adapter_names:
      replace_module(model, site.path, site.module.base_linear())


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
