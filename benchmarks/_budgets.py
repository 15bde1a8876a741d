"""Adapter configs of the benchmarks, and the equal-trainable-parameter budget they compare at.

Scaling
    Every config built here has ``alpha = SCALE * r``: the scaling ``alpha / r`` of the update is
    :data:`SCALE` whatever the rank, so methods and ranks differ only in their parametrisation.

Equal budget
    On a kernel ``W (in, out)``, LoRA and HiRA of rank ``p`` train ``p (in + out)`` parameters.
    SMoA with K spectral blocks of rank ``p`` each (total rank ``r = K p``) trains
    ``sum_k p (|C_k| + |R_k|) = p (in + out)`` too, because the blocks partition the rows and the
    columns. :class:`EqualBudget` builds the three at the same ``p``: SMoA ``r = K p`` vs LoRA and
    HiRA ``r = p``, on every kernel of any shape (uneven blocks included).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import smoa_jax

__all__ = ["SCALE", "smoa_config", "lora_config", "hira_config", "EqualBudget"]

SCALE = 2.0  # alpha / r of every adapter config built here


def _targets(target_modules: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
  """``target_modules`` as config keyword arguments; ``None`` keeps the configs' default."""
  return {} if target_modules is None else {"target_modules": tuple(target_modules)}


def smoa_config(r: int, num_blocks: int,
                target_modules: Sequence[str] | None = None) -> smoa_jax.SMoAConfig:
  """SMoA of total rank ``r`` in ``num_blocks`` spectral blocks, ``alpha = SCALE * r``."""
  return smoa_jax.SMoAConfig(r=r, num_blocks=num_blocks, alpha=SCALE * r,
                             **_targets(target_modules))


def lora_config(r: int, target_modules: Sequence[str] | None = None) -> smoa_jax.LoRAConfig:
  """LoRA of rank ``r``, ``alpha = SCALE * r``."""
  return smoa_jax.LoRAConfig(r=r, alpha=SCALE * r, **_targets(target_modules))


def hira_config(r: int, target_modules: Sequence[str] | None = None) -> smoa_jax.HiRAConfig:
  """HiRA of rank ``r`` (``(a b) * W`` over the whole matrix), ``alpha = SCALE * r``."""
  return smoa_jax.HiRAConfig(r=r, alpha=SCALE * r, **_targets(target_modules))


@dataclasses.dataclass(frozen=True)
class EqualBudget:
  """SMoA, LoRA and HiRA configs that train the same ``p (in + out)`` parameters per kernel.

  Attributes:
    p: LoRA's and HiRA's rank, and the rank of each SMoA block.
    num_blocks: SMoA's K; its total rank is ``K p``.
  """

  p: int
  num_blocks: int = 2

  def __post_init__(self):
    if self.p < 1 or self.num_blocks < 1:
      raise ValueError(f"an equal budget needs p >= 1 and num_blocks >= 1, got p={self.p}, "
                       f"num_blocks={self.num_blocks}")

  @classmethod
  def of_smoa(cls, r: int, num_blocks: int) -> "EqualBudget":
    """The budget of SMoA with total rank ``r`` in ``num_blocks`` blocks (LoRA/HiRA: ``r / K``)."""
    if r % num_blocks:
      raise ValueError(f"SMoA r={r} with K={num_blocks} blocks has no equal-budget LoRA: r must be "
                       f"a multiple of K (LoRA's rank is r / K)")
    return cls(r // num_blocks, num_blocks)

  @property
  def smoa_rank(self) -> int:
    return self.num_blocks * self.p

  @property
  def lora_rank(self) -> int:
    return self.p

  def smoa(self, target_modules: Sequence[str] | None = None) -> smoa_jax.SMoAConfig:
    return smoa_config(self.smoa_rank, self.num_blocks, target_modules)

  def lora(self, target_modules: Sequence[str] | None = None) -> smoa_jax.LoRAConfig:
    return lora_config(self.lora_rank, target_modules)

  def hira(self, target_modules: Sequence[str] | None = None) -> smoa_jax.HiRAConfig:
    return hira_config(self.lora_rank, target_modules)
