"""Full fine-tuning of the targeted kernels: the upper bound in comparisons.

No adapter layer is injected: the targeted ``nnx.Linear`` layers stay, and their ``kernel``
becomes a :class:`~smoa_jax.TrainableParam` so the same optimizer filter trains it. The op only
describes the layer's size (``num_params = in * out``, no low-rank blocks).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from smoa_jax.core.config import AdapterConfig
from smoa_jax.core.ops import AdapterOp

__all__ = ["FullFineTuneConfig", "FullOp"]


@dataclasses.dataclass(frozen=True)
class FullFineTuneConfig(AdapterConfig):
  """Full fine-tuning of the targeted kernels (the upper bound in comparisons).

  The targeted layers stay plain ``nnx.Linear``; their ``kernel`` becomes a ``TrainableParam`` so
  the same optimizer filter trains them. ``dropout``, ``param_dtype`` and ``adapter_dtype`` are
  unused.
  """

  method: ClassVar[str] = "full"
  trains_base_kernel: ClassVar[bool] = True
  default_learning_rate: ClassVar[float] = 3e-4  # best: 4e-4 sentiment, 3e-4 Shakespeare

  def make_op(self, in_features: int, out_features: int, blocks: object = None) -> "FullOp":
    del blocks
    return FullOp(in_features, out_features)


@dataclasses.dataclass(frozen=True)
class FullOp(AdapterOp):
  """The size of a fully fine-tuned ``(in, out)`` kernel: every entry trains, no factors."""

  in_features: int
  out_features: int

  @property
  def ranks(self) -> tuple[int, ...]:
    return ()

  @property
  def num_blocks(self) -> int:
    return 1

  @property
  def num_params(self) -> int:
    return self.in_features * self.out_features
