"""SMoA (and HiRA) adapters as LoRA, for serving stacks that only know LoRA.

An SMoA or HiRA update ``dW`` is high-rank (it follows W's entries), so no LoRA equals it; the
closest rank-k one is its truncated SVD (:func:`smoa_jax.core.lora.truncated_factors`).
:func:`to_lora` replaces the active adapter of every SMoA and HiRA layer by that LoRA, at a fixed
rank or at the smallest rank keeping an ``energy`` fraction of ``||dW||^2``, and reports what each
layer lost: ``||dW - dW_k|| / ||dW||``. LoRA layers are left as they are. The converted model
saves as a PEFT LoRA adapter (:func:`smoa_jax.save_peft_adapter`), which vLLM and PEFT serve.
"""

from __future__ import annotations

import dataclasses
import io

import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

from smoa_jax.core.lora import LoRAConfig, truncated_factors
from smoa_jax.errors import ConfigError
from smoa_jax.layers.dense import LoRADense
from smoa_jax.layers.sites import linear_sites
from smoa_jax.layers.stacked import adapt_stacked

__all__ = ["to_lora", "LayerConversion", "LoRAConversion"]


@dataclasses.dataclass(frozen=True)
class LayerConversion:
  """One converted layer (of a stacked layer: one row per unrolled layer).

  Attributes:
    path: module path.
    method: the method converted (``smoa`` or ``hira``).
    rank: the LoRA rank it got.
    relative_error: ``||dW - dW_k||_F / ||dW||_F``.
  """

  path: str
  method: str
  rank: int
  relative_error: float


@dataclasses.dataclass(frozen=True)
class LoRAConversion:
  """What :func:`to_lora` did, layer by layer; ``str()`` is a table and a summary line."""

  layers: tuple[LayerConversion, ...]

  @property
  def max_error(self) -> float:
    return max((c.relative_error for c in self.layers), default=0.0)

  @property
  def mean_error(self) -> float:
    return float(np.mean([c.relative_error for c in self.layers])) if self.layers else 0.0

  @property
  def mean_rank(self) -> float:
    return float(np.mean([c.rank for c in self.layers])) if self.layers else 0.0

  def summary(self) -> str:
    return (f"{len(self.layers)} layers as LoRA: mean rank {self.mean_rank:.1f}, relative error "
            f"||dW - dW_k|| / ||dW|| mean {self.mean_error:.4f}, max {self.max_error:.4f}")

  def __str__(self) -> str:
    table = Table(title="adapters as LoRA")
    for column in ("module", "method", "rank", "relative error"):
      table.add_column(column, justify="left" if column == "module" else "right")
    for c in self.layers:
      table.add_row(c.path, c.method, str(c.rank), f"{c.relative_error:.4f}")
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table)
    console.print(self.summary(), soft_wrap=True)
    return console.export_text()


def _check(rank: int | None, energy: float | None) -> None:
  if (rank is None) == (energy is None):
    raise ConfigError("to_lora needs exactly one of rank= (a fixed LoRA rank) or energy= (the "
                      "fraction of ||dW||^2 each layer keeps).")
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                           or rank < 1):
    raise ConfigError(f"to_lora: rank={rank!r} is invalid: expected an int >= 1.")
  if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                             or not 0.0 < float(energy) <= 1.0):
    raise ConfigError(f"to_lora: energy={energy!r} is invalid: expected a number in (0, 1].")


def to_lora(model: nnx.Module, *, rank: int | None = None,
            energy: float | None = None) -> LoRAConversion:
  """Replace the active adapter of every SMoA and HiRA layer by a truncated-SVD LoRA of its dW.

  Each layer gets ``LoRAConfig(r=k, alpha=k)`` (scaling 1) holding the best rank-k approximation
  of its ``dW`` (see :mod:`smoa_jax.layers.convert`): ``k = rank`` (at most ``min(in, out)``), or
  per layer the smallest k keeping the ``energy`` fraction of ``||dW||^2`` (a stacked layer of a
  scanned model takes the largest k of its layers). The adapter keeps its name, dropout and
  dtypes; other adapters the layers hold are untouched; the kernels stay the same Variables.

  Returns:
    A :class:`LoRAConversion`: each converted layer's rank and relative error.

  Raises:
    ConfigError: neither or both of ``rank`` / ``energy``, invalid values, or a merged layer.
  """
  _check(rank, energy)
  rows = []
  for site in linear_sites(model):
    if not site.adapted or site.module.config.method not in ("smoa", "hira"):
      continue
    layer = site.module
    if layer.merged:
      raise ConfigError(f"{site.name}: the adapter is merged into the kernel; unmerge it "
                        "(smoa_jax.unmerge_adapters) before converting it to LoRA.")
    dw = np.asarray(layer.delta_weight(), np.float32)
    slices = [dw] if layer.num_layers is None else list(dw)
    found = [truncated_factors(d, rank=rank, energy=energy) for d in slices]
    k = max(a.shape[1] for a, _, _ in found)
    if len({a.shape[1] for a, _, _ in found}) > 1:  # a stacked layer has one rank: the largest
      found = [truncated_factors(d, rank=k) for d in slices]
    names = site.unrolled() or [(site.name, None)]
    rows += [LayerConversion(n, layer.config.method, k, err) for (n, _), (_, _, err)
             in zip(names, found)]
    old = layer.config
    config = LoRAConfig(r=k, alpha=float(k), dropout=old.dropout, target_modules=(site.name,),
                        param_dtype=old.param_dtype, adapter_dtype=old.adapter_dtype)
    base, rngs = layer.base_linear(), nnx.Rngs(0)
    new = (adapt_stacked(base, config, rngs=rngs) if layer.num_layers
           else LoRADense.from_linear(base, config, rngs=rngs))
    a = np.stack([f[0] for f in found]) if layer.num_layers else found[0][0]
    b = np.stack([f[1] for f in found]) if layer.num_layers else found[0][1]
    new.lora_a[...] = jnp.asarray(a, new.lora_a.dtype)
    new.lora_b[...] = jnp.asarray(b, new.lora_b.dtype)
    name = layer.adapter_name
    layer.remove_adapter(name)
    layer.adopt(new, name)
  return LoRAConversion(tuple(rows))
