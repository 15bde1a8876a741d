"""LoRA, the low-rank baseline: ``dW = (alpha/r) a @ b`` with ``a (in, r)``, ``b (r, out)``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smoa_jax.core.config import LowRankConfig
from smoa_jax.core.ops import HIGHEST, AdapterOp, BlockLayout, FactorBlocks, Perms, wide_dtype

__all__ = ["LoRAConfig", "LoRAOp"]


@dataclasses.dataclass(frozen=True)
class LoRAConfig(LowRankConfig):
  """LoRA baseline: ``dW = (alpha/r) a @ b``, ``a`` uniform in ``+-1/sqrt(in)``, ``b`` zeros."""

  method: ClassVar[str] = "lora"

  def make_op(self, in_features: int, out_features: int, blocks: object = None) -> "LoRAOp":
    del blocks
    return LoRAOp(in_features, out_features, self.r, self.scaling, self.adapter_dtype)


@dataclasses.dataclass(frozen=True)
class LoRAOp(AdapterOp):
  """LoRA: ``dW = scaling a @ b`` with ``a (in, r)``, ``b (r, out)``."""

  in_features: int
  out_features: int
  r: int
  scaling: float
  adapter_dtype: str = "float32"

  @property
  def layout(self) -> BlockLayout:
    """One block over the whole kernel, of rank r."""
    return BlockLayout((self.in_features,), (self.out_features,), (self.r,))

  @property
  def a_shape(self) -> tuple[int, int]:
    return self.in_features, self.r

  @property
  def b_shape(self) -> tuple[int, int]:
    return self.r, self.out_features

  def factor_blocks(self, a: Any, b: Any) -> FactorBlocks:
    return [(a, b)]

  def stack_blocks(self, blocks: Sequence[tuple[Any, Any]]) -> tuple[jax.Array, jax.Array]:
    ((a, b),) = blocks
    return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  def init_factors(self, key: jax.Array, param_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``a ~ U(+-1/sqrt(in))``, ``b = 0``."""
    bound = 1.0 / np.sqrt(self.in_features)
    a = jax.random.uniform(key, (self.in_features, self.r), jnp.float32, -bound, bound)
    return a.astype(param_dtype), jnp.zeros((self.r, self.out_features), param_dtype)

  def delta(self, kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms = None) -> jax.Array:
    dt = jnp.dtype(self.adapter_dtype)
    return self.scaling * jnp.matmul(a.astype(dt), b.astype(dt), precision=HIGHEST)

  def merged_kernel(self, kernel, a, b, perms: Perms = None) -> jax.Array:
    wide = wide_dtype(kernel.dtype, self.adapter_dtype)
    return (kernel.astype(wide) + self.delta(kernel, a, b).astype(wide)).astype(kernel.dtype)

  def unmerged_kernel(self, merged, a, b, perms: Perms = None) -> jax.Array:
    wide = wide_dtype(merged.dtype, self.adapter_dtype)
    return (merged.astype(wide) - self.delta(merged, a, b).astype(wide)).astype(merged.dtype)

  def apply(self, x, x_adapter, kernel, a, b, perms: Perms = None, precision: Any = None):
    """``x @ W + scaling (x_adapter @ a) @ b`` for ``x (..., in)`` (no bias)."""
    x_adapter = x if x_adapter is None else x_adapter
    y = jnp.matmul(x, kernel, precision=precision)
    dt = jnp.dtype(self.adapter_dtype)
    h = jnp.matmul(x_adapter.astype(dt), a.astype(dt), precision=precision)
    return y + (self.scaling * jnp.matmul(h, b.astype(dt), precision=precision)).astype(y.dtype)
