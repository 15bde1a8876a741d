"""LoRA, the low-rank baseline: ``dW = (alpha/r) a @ b`` with ``a (in, r)``, ``b (r, out)``; and
the best rank-k LoRA of any dense update (:func:`truncated_factors`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smoa_jax.core.config import LowRankConfig
from smoa_jax.core.ops import HIGHEST, AdapterOp, BlockLayout, FactorBlocks, Perms, wide_dtype

__all__ = ["LoRAConfig", "LoRAOp", "truncated_factors"]


@dataclasses.dataclass(frozen=True)
class LoRAConfig(LowRankConfig):
  """LoRA baseline: ``dW = (alpha/r) a @ b``, ``a`` uniform in ``+-1/sqrt(in)``, ``b`` zeros."""

  method: ClassVar[str] = "lora"
  # Best on validation: 0.008 on sentiment, 0.005 on Shakespeare (where 0.01 was worse).
  default_learning_rate: ClassVar[float] = 5e-3

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

  def apply(self, x, x_adapter, kernel, a, b, perms: Perms = None, precision: Any = None,
            kernel_spec: tuple[Any, ...] | None = None):
    """``x @ W + scaling (x_adapter @ a) @ b`` for ``x (..., in)`` (no bias); XLA partitions it
    well on any mesh, so ``kernel_spec`` is not needed."""
    del kernel_spec
    x_adapter = x if x_adapter is None else x_adapter
    y = jnp.matmul(x, kernel, precision=precision)
    dt = jnp.dtype(self.adapter_dtype)
    h = jnp.matmul(x_adapter.astype(dt), a.astype(dt), precision=precision)
    return y + (self.scaling * jnp.matmul(h, b.astype(dt), precision=precision)).astype(y.dtype)


def truncated_factors(dw: Any, *, rank: int | None = None, energy: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray, float]:
  """The best rank-k approximation of ``dW (in, out)`` as LoRA factors (Eckart-Young).

  With ``dW = U diag(s) V^T`` (float32 SVD), ``k = min(rank, in, out)``, or (``energy``) the
  smallest k with ``sum_{j<k} s_j^2 >= energy * ||dW||^2``; a zero dW gives k = 1 with zero
  factors. Returns ``(a (in, k), b (k, out), relative error)`` with ``a = U_k diag(sqrt(s_k))``,
  ``b = diag(sqrt(s_k)) V_k^T`` (so ``a @ b = dW_k``: a LoRA of scaling 1) and the relative error
  ``||dW - dW_k|| / ||dW|| = sqrt(sum_{j>=k} s_j^2 / sum_j s_j^2)`` (Frobenius; 0 for a zero dW).
  """
  u, s, vt = (np.asarray(x, np.float64) for x in jnp.linalg.svd(jnp.asarray(dw, jnp.float32),
                                                                 full_matrices=False))
  power = np.square(s)
  total = float(power.sum())
  if energy is not None:
    kept = np.cumsum(power) / max(total, np.finfo(np.float64).tiny)
    k = int(np.searchsorted(kept, energy - 1e-12) + 1) if total > 0 else 1
  else:
    k = rank
  k = max(1, min(k, len(s)))
  root = np.sqrt(s[:k])
  error = float(np.sqrt(power[k:].sum() / total)) if total > 0 else 0.0
  return ((u[:, :k] * root).astype(np.float32), (root[:, None] * vt[:k]).astype(np.float32), error)
