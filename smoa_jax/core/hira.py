"""HiRA, the whole-matrix baseline: ``dW = (alpha/r) (a @ b) * W``.

It is exactly SMoA with one block over the natural coordinate order, so its op is
:class:`smoa_jax.core.smoa.SMoAOp` with ``K = 1`` and no permutation: ``a (1, in, r)``,
``b (1, r, out)``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from smoa_jax.core.config import LowRankConfig
from smoa_jax.core.ops import BlockLayout
from smoa_jax.core.smoa import SMoAOp

__all__ = ["HiRAConfig"]


@dataclasses.dataclass(frozen=True)
class HiRAConfig(LowRankConfig):
  """HiRA baseline: ``dW = (alpha/r) (a @ b) * W`` over the whole kernel (SMoA with K=1, no permutation)."""

  method: ClassVar[str] = "hira"
  # Best on validation: 0.04 on sentiment, 0.01 on Shakespeare (where 0.03 was worse).
  default_learning_rate: ClassVar[float] = 2e-2

  def make_op(self, in_features: int, out_features: int, blocks: object = None) -> SMoAOp:
    del blocks
    return SMoAOp(BlockLayout((in_features,), (out_features,), (self.r,)), self.scaling,
                  self.adapter_dtype)
