"""The op interface every adapter method implements, and what the ops share (no Flax in here).

An op is the static description of ONE adapted ``(in, out)`` layer under one method: a frozen,
hashable dataclass (a valid ``jit`` static argument) whose methods are pure ``jax.numpy``
functions of the layer's arrays::

    kernel (in, out)    the frozen W, y = x @ W + bias
    a, b                the trainable factors, in the op's own stacked layout
    perms               (in_perm (in,), out_perm (out,)) for methods that work in W's spectral
                        order (``config.spectral_order``), else None

Callers (layers, injection, file formats, analysis) use only this interface and never branch on
the method: sizes (:attr:`AdapterOp.ranks`, :attr:`AdapterOp.num_blocks`,
:attr:`AdapterOp.num_params`, :attr:`AdapterOp.a_shape` / ``b_shape``), the math (``apply``,
``delta``, ``merged_kernel``, ``unmerged_kernel``, ``invertible_merge``) and the per-block codec
(:meth:`AdapterOp.factor_blocks` / :meth:`AdapterOp.stack_blocks`) that file formats store.
Each method's module (:mod:`smoa_jax.core.smoa`, ``hira``, ``lora``, ``full``) holds its config
and its op, so adding a method adds one module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smoa_jax.errors import ConfigError

__all__ = ["AdapterOp", "BlockLayout", "Perms", "HIGHEST", "wide_dtype", "stack_factors",
           "unstack_factors"]

Perms = tuple[jax.Array, jax.Array] | None
# Adapter math runs at full float32 precision on every backend (TPUs default to bf16 passes).
HIGHEST = jax.lax.Precision.HIGHEST
# One (a_k (|C_k|, r_k), b_k (r_k, |R_k|)) pair per block, unpadded: the unit files store.
FactorBlocks = list[tuple[Any, Any]]


def wide_dtype(*dtypes: Any) -> jnp.dtype:
  """The dtype merges and sums use: float32, or wider if an input is wider (float64 under x64)."""
  return jnp.result_type(jnp.float32, *dtypes)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Static sizes of K aligned blocks and their ranks (hashable: a valid ``jit`` static arg).

  Factors of K blocks are stored stacked and zero-padded: ``a (K, max|C_k|, max r_k)`` and
  ``b (K, max r_k, max|R_k|)``.
  """

  in_sizes: tuple[int, ...]
  out_sizes: tuple[int, ...]
  ranks: tuple[int, ...]

  def __post_init__(self):
    if not len(self.in_sizes) == len(self.out_sizes) == len(self.ranks):
      raise ConfigError(
          f"block layout needs one in size, out size and rank per block, got in_sizes="
          f"{self.in_sizes}, out_sizes={self.out_sizes}, ranks={self.ranks}.")

  @property
  def num_blocks(self) -> int:
    return len(self.in_sizes)

  @property
  def a_shape(self) -> tuple[int, int, int]:
    """``(K, max|C_k|, max r_k)``."""
    return self.num_blocks, max(self.in_sizes), max(max(self.ranks), 1)

  @property
  def b_shape(self) -> tuple[int, int, int]:
    """``(K, max r_k, max|R_k|)``."""
    return self.num_blocks, max(max(self.ranks), 1), max(self.out_sizes)

  @property
  def num_params(self) -> int:
    """True trainable count ``sum_k r_k (|C_k| + |R_k|)`` (padding excluded)."""
    return sum(r * (c + o) for r, c, o in zip(self.ranks, self.in_sizes, self.out_sizes))

  def rank_mask(self) -> np.ndarray:
    """``(K, 1, max r_k)`` float mask, 1 on the ranks each block really has."""
    _, _, rmax = self.a_shape
    return (np.arange(rmax)[None, :] < np.asarray(self.ranks)[:, None]).astype(np.float32)[:, None, :]

  def in_mask(self) -> np.ndarray:
    """``(K, max|C_k|, 1)`` float mask, 1 on the rows each block really has."""
    return (np.arange(max(self.in_sizes))[None, :]
            < np.asarray(self.in_sizes)[:, None]).astype(np.float32)[:, :, None]


def stack_factors(factors: Sequence[tuple[Any, Any]],
                  layout: BlockLayout) -> tuple[jax.Array, jax.Array]:
  """Per-block ``[(a_k (|C_k|, r_k), b_k (r_k, |R_k|)), ...]`` -> stacked, zero-padded ``(a, b)``."""
  _, max_in, max_r = layout.a_shape
  max_out = layout.b_shape[2]
  a = jnp.stack([jnp.pad(jnp.asarray(ak, jnp.float32),
                         ((0, max_in - ak.shape[0]), (0, max_r - ak.shape[1]))) for ak, _ in factors])
  b = jnp.stack([jnp.pad(jnp.asarray(bk, jnp.float32),
                         ((0, max_r - bk.shape[0]), (0, max_out - bk.shape[1]))) for _, bk in factors])
  return a, b


def unstack_factors(a: Any, b: Any, layout: BlockLayout) -> FactorBlocks:
  """Inverse of :func:`stack_factors`: drop the padding of every block."""
  return [(a[k, :c, :r], b[k, :r, :o])
          for k, (c, o, r) in enumerate(zip(layout.in_sizes, layout.out_sizes, layout.ranks))]


class AdapterOp:
  """The interface of every adapter op; see the module docstring.

  Subclasses are frozen dataclasses. The defaults below serve block-factored ops whose
  ``layout`` is a :class:`BlockLayout` (SMoA, HiRA); others override what differs.
  """

  layout: BlockLayout

  # -- sizes ------------------------------------------------------------------------------------
  @property
  def ranks(self) -> tuple[int, ...]:
    """The rank of each block (empty when the op has no low-rank factors)."""
    return self.layout.ranks

  @property
  def num_blocks(self) -> int:
    return self.layout.num_blocks

  @property
  def num_params(self) -> int:
    """Trainable parameters of one layer, padding excluded."""
    return self.layout.num_params

  @property
  def a_shape(self) -> tuple[int, ...]:
    return self.layout.a_shape

  @property
  def b_shape(self) -> tuple[int, ...]:
    return self.layout.b_shape

  # -- the per-block codec ----------------------------------------------------------------------
  def factor_blocks(self, a: Any, b: Any) -> FactorBlocks:
    """``[(a_k (|C_k|, r_k), b_k (r_k, |R_k|)), ...]``: the factors of each block, unpadded."""
    return unstack_factors(a, b, self.layout)

  def stack_blocks(self, blocks: Sequence[tuple[Any, Any]]) -> tuple[jax.Array, jax.Array]:
    """Inverse of :meth:`factor_blocks`: the factors in this op's stored layout (float32)."""
    return stack_factors(blocks, self.layout)

  # -- the math (every factorized op implements these) ------------------------------------------
  def init_factors(self, key: jax.Array, param_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Fresh ``(a, b)``: ``b = 0``, so the adapter starts as an exact no-op."""
    raise NotImplementedError

  def apply(self, x: jax.Array, x_adapter: jax.Array | None, kernel: jax.Array, a: jax.Array,
            b: jax.Array, perms: Perms, precision: Any = None,
            kernel_spec: tuple[Any, ...] | None = None) -> jax.Array:
    """``x @ W + x_adapter @ dW`` for ``x (..., in)`` -> ``(..., out)`` (no bias);
    ``x_adapter=None`` means the adapter sees ``x`` itself (no dropout). ``kernel_spec`` is the
    kernel's ``(in, out)`` partition spec on the context mesh when the layer knows it; an op may
    use it to keep its collectives small (SMoA's backward does)."""
    raise NotImplementedError

  def delta(self, kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms) -> jax.Array:
    """The dense update ``dW (in, out)`` in the adapter dtype."""
    raise NotImplementedError

  def merged_kernel(self, kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms,
                    dtype: Any = None) -> jax.Array:
    """``W + dW`` summed in float32 (or wider), cast to ``dtype`` (default ``kernel.dtype``)."""
    raise NotImplementedError

  def unmerged_kernel(self, merged: jax.Array, a: jax.Array, b: jax.Array,
                      perms: Perms) -> jax.Array:
    """Recover ``W`` from :meth:`merged_kernel`'s result (up to float rounding)."""
    raise NotImplementedError

  def invertible_merge(self, a: jax.Array, b: jax.Array, perms: Perms) -> jax.Array:
    """Whether :meth:`unmerged_kernel` can recover W after a merge with these factors (a bool
    scalar, jittable)."""
    del a, b, perms
    return jnp.asarray(True)
