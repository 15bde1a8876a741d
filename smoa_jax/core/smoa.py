"""SMoA, the Spectrum Modulation Adapter: its config and its op, in pure ``jax.numpy``.

Layout: kernel ``W`` is ``(in, out)``, ``y = x @ W + bias``. For SMoA, block ``k`` pairs input
coordinates ``C_k`` with output coordinates ``R_k`` (see :mod:`smoa_jax.core.spectral`) and::

    dW[C_k, R_k] = (alpha / r) * (a_k @ b_k) * W[C_k, R_k]        (zero outside the blocks)
    y = x @ W + bias + dropout(x) @ dW

Stacked, padded factors
    The K blocks are processed together with ``jax.vmap``-style batched einsums. Factors are
    stored stacked and zero-padded: ``a`` is ``(K, max|C_k|, max r_k)`` and ``b`` is
    ``(K, max r_k, max|R_k|)``. Padding rows/columns meet zero anchors and padded ranks are
    masked, so padded entries get exactly zero gradient and stay zero under any optimizer.

No second copy of W
    Anchors ``W[C_k, R_k]`` are gathered from the frozen kernel on the fly (a row gather and a
    per-block column gather touching ``in * out / K`` entries); ``W + dW = W * (1 + M)`` with
    ``M = (alpha/r) A @ B`` built from the factors scattered to their own coordinates (see
    :class:`SMoAOp`), so W itself is never permuted. Nothing of W is stored beside the kernel.

The folded path (dropout inactive); the cost model is in ``docs/design.md``
    ``y = x @ (W + dW)``: one matmul in the forward. A custom VJP then computes only
    ``dx = dy @ (W + dW)^T`` and the block gradients ``x[:, C_k]^T dy[:, R_k]`` (``2 T in out / K``
    flops), never the dense ``x^T dy`` that autodiff would build for the kernel; on CPU they are
    accumulated over token chunks so the gathered tiles stay in cache. ``W + dW`` is recomputed
    in the backward instead of saved, so training memory holds no extra kernel copy.
    Per adapted layer and token: about ``4 in out (1 + 1/(2K))`` flops vs ``4 in out`` for LoRA,
    against ``4 in out + 4 in out`` (+ a dense dW) for the authors' two-matmul forward.

The folded path on a mesh
    The permutations mix coordinates that live on different shards of W, so left to XLA the
    anchors ``W[C_k, R_k]`` become a kernel-sized all-reduce and the block gradients over the
    sharded tokens an ``in out / K`` one. When the layer passes its kernel's partition spec
    (``kernel_spec``) and a context mesh is set (``jax.set_mesh``, as :func:`smoa_jax.train`
    does), forward and backward run per device under ``jax.shard_map`` instead: W is gathered
    over the batch axes once (as FSDP gathers it for its matmul anyway) and stays split over
    its tensor-parallel axes; every device builds the anchors and block gradients of its own
    tokens and its piece of W (or, once W is split at least K ways, the piece's dense
    ``x^T dy`` pulled back through ``W * F``), and only ``dx`` (as any tensor-parallel matmul)
    and ``da``/``db`` (``r (in + out)`` numbers) are summed across devices.

The unfolded path (dropout active)
    ``x @ W`` plus a block-wise ``dropout(x)[:, C_k] @ dW_k``, differentiated by autodi
HiRA (:mod:`smoa_jax.core.hira`) is this op with one block over the natural order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from smoa_jax.core.config import AdapterConfig, _fail, _is_int, split_sizes
from smoa_jax.core.ops import HIGHEST, AdapterOp, BlockLayout, Perms, stack_factors, wide_dtype
from smoa_jax.core.spectral import SpectralBlocks
from smoa_jax.errors import ConfigError
from smoa_jax.parallel import sharding

__all__ = ["SMoAConfig", "SMoAOp", "delta_weight"]


@dataclasses.dataclass(frozen=True)
class SMoAConfig(AdapterConfig):
  """Spectrum Modulation Adapter: K spectral blocks, each ``dW_k = (alpha/r)(a_k b_k) * W_k``.

  Attributes:
    r: total rank, split over the blocks (``split_sizes(r, num_blocks)``) unless
      ``branch_ranks`` is given. Trainable parameters ``sum_k r_k (|C_k| + |R_k|)``.
    num_blocks: K, the number of aligned spectral blocks (``1 <= K <= min(in, out)``).
    alpha: scale numerator; the update is multiplied by ``alpha / r``.
    branch_ranks: optional per-block ranks, K non-negative ints summing to ``r``; a block with
      rank 0 stays frozen.
    spectral_method: ``"gram"`` (eigh of the smaller Gram matrix + one matmul, 3-5x faster),
      ``"svd"``, or ``"auto"`` (Gram, falling back to the SVD for kernels the float32 Gram matrix
      cannot resolve; see :mod:`smoa_jax.core.spectral`).
  """

  method: ClassVar[str] = "smoa"
  spectral_order: ClassVar[bool] = True
  # Best on validation: 0.04 on sentiment, 0.03 on Shakespeare; (a b) * W scales the update by
  # W's entries, so SMoA takes a larger step than LoRA.
  default_learning_rate: ClassVar[float] = 3e-2
  r: int = 8
  num_blocks: int = 2
  alpha: float = 16.0
  _: dataclasses.KW_ONLY
  branch_ranks: tuple[int, ...] | None = None
  spectral_method: str = "auto"

  def __post_init__(self):
    super().__post_init__()
    self._check_rank_and_alpha()
    k = self.num_blocks
    if not _is_int(k) or k < 1:
      raise _fail("SMoAConfig", "num_blocks", k, "an int >= 1")
    self._set("num_blocks", int(k))
    ranks = self.branch_ranks
    if ranks is not None:
      if isinstance(ranks, str) or not isinstance(ranks, Sequence):
        raise _fail("SMoAConfig", "branch_ranks", ranks, f"None or a list of {k} ints")
      ranks = tuple(ranks)
      if len(ranks) != k:
        raise _fail("SMoAConfig", "branch_ranks", ranks,
                    f"exactly num_blocks={k} entries, got {len(ranks)}")
      if not all(_is_int(x) and x >= 0 for x in ranks):
        raise _fail("SMoAConfig", "branch_ranks", ranks, "non-negative ints")
      if sum(ranks) != self.r:
        raise _fail("SMoAConfig", "branch_ranks", ranks,
                    f"entries summing to r={self.r}, got sum {sum(ranks)}")
      self._set("branch_ranks", tuple(int(x) for x in ranks))
    if self.spectral_method not in ("auto", "gram", "svd"):
      raise _fail("SMoAConfig", "spectral_method", self.spectral_method,
                  "one of 'auto', 'gram', 'svd'")

  @property
  def block_ranks(self) -> tuple[int, ...]:
    """The rank r_k of every block (``branch_ranks`` or the even split of ``r``)."""
    return self.branch_ranks if self.branch_ranks is not None else split_sizes(self.r, self.num_blocks)

  def check_layer(self, in_features: int, out_features: int, path: str = "<layer>") -> None:
    if self.num_blocks > min(in_features, out_features):
      raise ConfigError(
          f"SMoAConfig.num_blocks={self.num_blocks} is too large for {path} with kernel "
          f"(in={in_features}, out={out_features}): every block needs at least one input and one "
          f"output coordinate, so num_blocks must be <= {min(in_features, out_features)}. "
          "Lower num_blocks or exclude this module.")

  def make_op(self, in_features: int, out_features: int,
              blocks: SpectralBlocks | None = None) -> "SMoAOp":
    """The op of one layer; needs the layer's :class:`SpectralBlocks` (their block sizes)."""
    self.check_layer(in_features, out_features)
    if blocks is None:
      raise ConfigError("an SMoA op needs the layer's SpectralBlocks (see spectral_blocks).")
    if blocks.shape != (in_features, out_features):
      raise ConfigError(f"spectral blocks cut a {blocks.shape} kernel, but the layer is "
                        f"{(in_features, out_features)}; recompute them for this kernel.")
    if blocks.num_blocks != self.num_blocks:
      raise ConfigError(f"spectral blocks have K={blocks.num_blocks} but config.num_blocks="
                        f"{self.num_blocks}.")
    layout = BlockLayout(blocks.in_sizes, blocks.out_sizes, self.block_ranks)
    return SMoAOp(layout, self.scaling, self.adapter_dtype)


def _offsets(sizes: Sequence[int]) -> list[int]:
  return [int(o) for o in np.cumsum((0,) + tuple(sizes[:-1]))]


def _split_last(x: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  """``(..., sum(sizes))`` -> ``(K, ..., max(sizes))``: the K contiguous pieces, zero padded.

  Blocks go first so that the block einsums are plain batched matmuls (batch dim leading).
  """
  width = max(sizes)
  pad = [(0, 0)] * (x.ndim - 1)
  return jnp.stack([jnp.pad(x[..., start:start + size], pad + [(0, width - size)])
                    for start, size in zip(_offsets(sizes), sizes)])


def _join_last(x: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`_split_last`: ``(K, ..., max(sizes))`` -> ``(..., sum(sizes))``."""
  return jnp.concatenate([x[k, ..., :size] for k, size in enumerate(sizes)], axis=-1)


def _inverse(perm: jax.Array) -> jax.Array:
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute(x: jax.Array, perm: jax.Array, axis: int) -> jax.Array:
  """``take(x, perm, axis)`` whose VJP is a gather by the inverse permutation.

  Autodiff of a gather is a scatter-add, which is slow on CPU; for a permutation the transpose is
  another gather.
  """
  return jnp.take(x, perm, axis=axis)


def _permute_fwd(x, perm, axis):
  return jnp.take(x, perm, axis=axis), perm


def _permute_bwd(axis, perm, g):
  return jnp.take(g, _inverse(perm), axis=axis), None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _take_last(x: jax.Array, perm: jax.Array | None) -> jax.Array:
  return x if perm is None else _permute(x, perm, x.ndim - 1)


# Token chunk of the block-gradient accumulation on CPU: the gathered x and dy tiles of one chunk
# stay in cache (measured ~1.5x faster than one big gathered einsum at T=2048); accelerators get
# one einsum over all tokens.
CPU_TOKEN_CHUNK = 256


# A device's piece of a kernel: ``((in_start, in_size), (out_start, out_size))``; the starts may be
# traced (``jax.lax.axis_index``). None means the whole kernel.
Window = tuple[tuple[Any, int], tuple[Any, int]] | None


def _block_index(perm: jax.Array | None, sizes: tuple[int, ...],
                 part: tuple[Any, int] | None = None) -> jax.Array:
  """``(K * max(sizes),)`` int32: block k's coordinates in spectral order, as positions in ``part``.

  ``part = (start, size)`` is the slice ``[start, start + size)`` of the axis one device holds
  (default: the whole axis). Padding, and coordinates outside the slice, get ``size`` (the whole
  axis: ``n = sum(sizes)``), which is out of range, so a ``mode="fill"`` gather reads zeros there.
  """
  n, width = sum(sizes), max(sizes)
  perm = jnp.arange(n, dtype=jnp.int32) if perm is None else perm.astype(jnp.int32)
  pieces = []
  for start, size in zip(_offsets(sizes), sizes):
    pieces.append(perm[start:start + size])
    if width > size:
      pieces.append(jnp.full((width - size,), n, jnp.int32))
  index = jnp.concatenate(pieces)
  if part is None:
    return index
  start, size = part
  local = index - start
  return jnp.where((local >= 0) & (local < size), local, size)


def _membership(perm: jax.Array | None, sizes: tuple[int, ...],
                part: tuple[Any, int] | None = None) -> tuple[jax.Array, jax.Array]:
  """For every coordinate (of ``part``, default all): ``(block k, position within block k)``,
  each ``(n,)`` (or ``(size,)``) int32."""
  block_of = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
  position_of = np.concatenate([np.arange(size) for size in sizes]).astype(np.int32)
  if perm is None:
    block_of, position_of = jnp.asarray(block_of), jnp.asarray(position_of)
  else:
    rank = _inverse(perm.astype(jnp.int32))  # where each coordinate sits in the spectral order
    block_of, position_of = jnp.asarray(block_of)[rank], jnp.asarray(position_of)[rank]
  if part is None:
    return block_of, position_of
  start, size = part
  return (jax.lax.dynamic_slice_in_dim(block_of, start, size),
          jax.lax.dynamic_slice_in_dim(position_of, start, size))


@dataclasses.dataclass(frozen=True)
class SMoAOp(AdapterOp):
  """Static description of one SMoA (or HiRA) adapted layer; all methods are pure and jittable.

  Arrays: ``kernel (in, out)``, ``a (K, max|C_k|, max r_k)``, ``b (K, max r_k, max|R_k|)``,
  ``perms = (in_perm (in,), out_perm (out,))`` or ``None`` for the natural order (HiRA).

  Dense form without permuting W: scatter block k's factors to their own coordinates and their
  own rank columns, ``A (in, K r)`` and ``B (K r, out)``; then ``M = (alpha/r) A @ B`` holds
  ``(alpha/r) a_k b_k`` on block k and exactly 0 elsewhere (the blocks' rank columns do not
  overlap), and ``dW = M * W``, ``W + dW = W * (1 + M)``.
  """

  layout: BlockLayout
  scaling: float
  adapter_dtype: str = "float32"

  def init_factors(self, key: jax.Array, param_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``a_k ~ U(+-1/sqrt(|C_k|))`` on real entries (zeros on padding), ``b = 0``."""
    bound = 1.0 / np.sqrt(np.asarray(self.layout.in_sizes, np.float32))[:, None, None]
    a = jax.random.uniform(key, self.layout.a_shape, jnp.float32, -1.0, 1.0) * bound
    a = a * self.layout.rank_mask() * self.layout.in_mask()
    return a.astype(param_dtype), jnp.zeros(self.layout.b_shape, param_dtype)

  def _masked(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    dt = jnp.dtype(self.adapter_dtype)
    return a.astype(dt) * self.layout.rank_mask().astype(dt), b.astype(dt)

  def _low_rank(self, a: jax.Array, b: jax.Array) -> jax.Array:
    # (K, max_in, max_r) x (K, max_r, max_out) -> (K, max_in, max_out), padded ranks masked.
    a, b = self._masked(a, b)
    return jnp.einsum("kir,kro->kio", a, b, precision=HIGHEST)

  def modulation_matrix(self, a: jax.Array, b: jax.Array, perms: Perms,
                        window: Window = None) -> jax.Array:
    """``M (in, out)``: ``(alpha/r) a_k b_k`` on block k, exactly 0 outside the blocks.

    With ``window``, only that piece of M, ``(in_size, out_size)``.
    """
    a, b = self._masked(a, b)
    k, _, rank = a.shape
    in_part, out_part = window if window is not None else (None, None)
    in_block, in_pos = _membership(None if perms is None else perms[0], self.layout.in_sizes,
                                   in_part)
    out_block, out_pos = _membership(None if perms is None else perms[1], self.layout.out_sizes,
                                     out_part)
    full_a = jax.nn.one_hot(in_block, k, dtype=a.dtype)[:, :, None] * a[in_block, in_pos][:, None, :]
    b_cols = jnp.swapaxes(b, 1, 2)[out_block, out_pos]  # (out, max_r)
    full_b = jax.nn.one_hot(out_block, k, dtype=b.dtype)[:, :, None] * b_cols[:, None, :]
    return self.scaling * jnp.matmul(full_a.reshape(-1, k * rank), full_b.reshape(-1, k * rank).T,
                                     precision=HIGHEST)

  def anchors(self, kernel: jax.Array, perms: Perms, starts: tuple[Any, Any] | None = None
              ) -> jax.Array:
    """The frozen blocks ``W[C_k, R_k]`` as ``(K, max|C_k|, max|R_k|)``, zero padded.

    With ``starts = (in_start, out_start)``, ``kernel`` is the piece of W beginning there and
    only the block entries inside it are filled (zeros elsewhere).
    """
    k, max_in, max_out = self.layout.num_blocks, max(self.layout.in_sizes), max(self.layout.out_sizes)
    in_part, out_part = _parts(kernel.shape, starts)
    in_idx = _block_index(None if perms is None else perms[0], self.layout.in_sizes, in_part)
    out_idx = _block_index(None if perms is None else perms[1], self.layout.out_sizes, out_part)
    rows = jnp.take(kernel, in_idx, axis=0, mode="fill", fill_value=0).reshape(k, max_in, -1)
    blocks = jnp.take_along_axis(rows, out_idx.reshape(k, 1, max_out), axis=2, mode="fill",
                                 fill_value=0)
    return blocks.astype(self.adapter_dtype)

  def block_deltas(self, kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms) -> jax.Array:
    """``dW_k = scaling (a_k @ b_k) * W_k`` for every block, ``(K, max|C_k|, max|R_k|)``."""
    return self.scaling * self._low_rank(a, b) * self.anchors(kernel, perms)

  def delta(self, kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms) -> jax.Array:
    """The dense update ``dW (in, out)`` in ``adapter_dtype``, zero outside the K blocks."""
    return self.modulation_matrix(a, b, perms) * kernel.astype(self.adapter_dtype)

  def merged_kernel(self, kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms,
                    dtype: Any = None, window: Window = None) -> jax.Array:
    """``W + dW = W * (1 + M)`` in float32 (or wider), cast to ``dtype`` (default ``kernel.dtype``).

    With ``window``, ``kernel`` is that piece of W and the result that piece of ``W + dW``.
    """
    wide = wide_dtype(kernel.dtype, self.adapter_dtype)
    return (kernel.astype(wide) * self.modulation(a, b, perms, window).astype(wide)).astype(
        kernel.dtype if dtype is None else dtype)

  def modulation(self, a: jax.Array, b: jax.Array, perms: Perms,
                 window: Window = None) -> jax.Array:
    """The dense factor ``F = 1 + M (in, out)`` with ``W + dW = W * F`` (1 outside the blocks);
    with ``window``, that piece of it."""
    return 1.0 + self.modulation_matrix(a, b, perms, window).astype(wide_dtype(self.adapter_dtype))

  def invertible_merge(self, a: jax.Array, b: jax.Array, perms: Perms) -> jax.Array:
    """True unless some entry of ``F = 1 + M`` is ~0: ``W * F`` would then lose W there."""
    return jnp.all(jnp.abs(self.modulation(a, b, perms)) >= 1e-6)

  def unmerged_kernel(self, merged: jax.Array, a: jax.Array, b: jax.Array, perms: Perms) -> jax.Array:
    """Recover ``W`` from ``W + dW = W * F`` as ``merged / F`` (float32 or wider, cast back)."""
    wide = wide_dtype(merged.dtype, self.adapter_dtype)
    return (merged.astype(wide) / self.modulation(a, b, perms).astype(wide)).astype(merged.dtype)

  def apply(self, x: jax.Array, x_adapter: jax.Array | None, kernel: jax.Array, a: jax.Array,
            b: jax.Array, perms: Perms, precision: Any = None,
            kernel_spec: tuple[Any, ...] | None = None) -> jax.Array:
    """``x @ W + x_adapter @ dW`` for ``x (..., in)`` -> ``(..., out)`` (no bias).

    ``x_adapter=None`` means the adapter sees ``x`` itself (no dropout): the folded path. Its
    backward runs per device under a context mesh (``jax.set_mesh``) when ``kernel_spec`` says
    how the kernel is laid out on it (see the module docstring).
    """
    if x_adapter is None:
      return _folded_matmul(self, precision, kernel_spec, x, kernel, a, b, perms)
    # Unfolded: base matmul + block-wise adapter matmul of the dropped-out input.
    y = jnp.matmul(x, kernel, precision=precision)
    xb = _split_last(_take_last(x_adapter, None if perms is None else perms[0]),
                     self.layout.in_sizes)  # (K, ..., max_in)
    deltas = self.block_deltas(kernel, a, b, perms)
    lead = x.shape[:-1]
    xb = xb.reshape(xb.shape[0], -1, xb.shape[-1]).astype(deltas.dtype)
    yb = jnp.einsum("kti,kio->kto", xb, deltas, precision=precision)
    y_adapter = _join_last(yb, self.layout.out_sizes).reshape(*lead, -1)
    if perms is not None:
      y_adapter = _take_last(y_adapter, _inverse(perms[1]))
    return y + y_adapter.astype(y.dtype)


def _parts(shape: tuple[int, ...], starts: tuple[Any, Any] | None
           ) -> tuple[tuple[Any, int] | None, tuple[Any, int] | None]:
  """The ``(start, size)`` of a local ``(in, out)`` piece of ``shape`` beginning at ``starts``."""
  if starts is None:
    return None, None
  return (starts[0], shape[-2]), (starts[1], shape[-1])


def _block_gradients(op: SMoAOp, x: jax.Array, dy: jax.Array, perms: Perms, precision: Any,
                     starts: tuple[Any, Any] | None = None) -> jax.Array:
  """``G_k = x[:, C_k]^T dy[:, R_k]`` for all blocks: ``x (T, in)``, ``dy (T, out)`` ->
  ``(K, max|C_k|, max|R_k|)``.

  With ``starts``, ``x`` and ``dy`` hold the feature slices beginning there (one device's piece)
  and G holds the entries of those coordinates (zeros elsewhere).
  """
  layout = op.layout
  k, max_in, max_out = layout.num_blocks, max(layout.in_sizes), max(layout.out_sizes)
  in_part, out_part = _parts((x.shape[-1], dy.shape[-1]), starts)
  in_idx = _block_index(None if perms is None else perms[0], layout.in_sizes, in_part)
  out_idx = _block_index(None if perms is None else perms[1], layout.out_sizes, out_part)
  accumulate = wide_dtype(x.dtype)

  def chunk_gradients(xc, dyc):
    xg = jnp.take(xc, in_idx, axis=1, mode="fill", fill_value=0).reshape(-1, k, max_in)
    dg = jnp.take(dyc, out_idx, axis=1, mode="fill", fill_value=0).reshape(-1, k, max_out)
    return jnp.einsum("tki,tko->kio", xg, dg, precision=precision,
                      preferred_element_type=accumulate)

  tokens = x.shape[0]
  chunk = CPU_TOKEN_CHUNK if jax.default_backend() == "cpu" else tokens
  if tokens <= chunk:
    return chunk_gradients(x, dy)
  pad = (-tokens) % chunk  # zero rows add nothing to x^T dy
  x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[-1])
  dy = jnp.pad(dy, ((0, pad), (0, 0))).reshape(-1, chunk, dy.shape[-1])
  zero = jnp.zeros((k, max_in, max_out), accumulate)
  return jax.lax.scan(lambda g, xd: (g + chunk_gradients(*xd), None), zero, (x, dy))[0]


def _local_backward(op: SMoAOp, precision: Any, x: jax.Array, dy: jax.Array, kernel: jax.Array,
                    a: jax.Array, b: jax.Array, perms: Perms,
                    starts: tuple[Any, Any] | None = None, dense: bool = False
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(dx, da, db)`` of ``y = x @ (W * F)`` from one piece of the problem.

  ``x (T, in_piece)``, ``dy (T, out_piece)``, ``kernel (in_piece, out_piece)`` beginning at
  ``starts`` (None: the whole kernel). Nothing is summed across pieces: ``dx`` is this piece's
  share (sum it over the out pieces), ``da``/``db`` too (sum over every piece and token shard).

  ``dense``: form the piece's whole ``x^T dy`` (``2 T |piece|`` flops) and pull it back through
  ``W * F`` by autodiff, instead of every block at full size (``2 T in out / K`` flops, most of
  it zeros outside the piece); cheaper once tensor parallelism splits W at least K ways.
  """
  layout = op.layout
  window = None if starts is None else _parts(kernel.shape, starts)
  w_eff = op.merged_kernel(kernel, a, b, perms, x.dtype, window)  # recomputed, never stored
  dx = jnp.matmul(dy, w_eff.T, precision=precision).astype(x.dtype)
  if dense:
    wide = wide_dtype(x.dtype, op.adapter_dtype)
    grad_w = jnp.matmul(x.T, dy, precision=precision, preferred_element_type=wide)
    _, pullback = jax.vjp(lambda a, b: op.merged_kernel(kernel, a, b, perms, wide, window), a, b)
    da, db = pullback(grad_w)
    return dx, da, db
  # The block gradients x_k^T dy_k: the only O(T in out / K) work the adapter adds.
  grad_blocks = _block_gradients(op, x, dy, perms, precision, starts).astype(op.adapter_dtype)
  g = op.scaling * grad_blocks * op.anchors(kernel, perms, starts)  # dL/d(a_k b_k)
  a_masked, b_cast = op._masked(a, b)
  da = jnp.einsum("kio,kro->kir", g, b_cast, precision=HIGHEST) * layout.rank_mask()
  db = jnp.einsum("kir,kio->kro", a_masked, g, precision=HIGHEST)
  return dx, da, db


def _axis_names(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _shard_plan(kernel_spec: tuple[Any, ...] | None, tokens: int):
  """How the folded path splits over the context mesh: ``(mesh, token axes, in axes, out axes)``.

  None without a (multi-device, not manual) context mesh or a kernel spec: then XLA partitions
  the plain program. Token axes are the batch axes (``data``, ``fsdp``) when they divide the
  tokens; the kernel's own axes minus those stay split (tensor parallelism), and W is gathered
  over the rest, as FSDP gathers it for its matmul anyway.
  """
  if kernel_spec is None or len(kernel_spec) < 2:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Manual in mesh.axis_types:
    return None
  in_names, out_names = _axis_names(kernel_spec[-2]), _axis_names(kernel_spec[-1])
  if not set(in_names + out_names) <= set(mesh.axis_names):
    return None
  split = [a for a in mesh.axis_names if mesh.shape[a] > 1]  # size-1 axes need no collective
  token_axes = tuple(a for a in sharding.BATCH_AXES if a in split)
  if tokens % sharding.axis_size(mesh, token_axes):
    token_axes = ()
  return (mesh, token_axes, tuple(n for n in in_names if n in split and n not in token_axes),
          tuple(n for n in out_names if n in split and n not in token_axes))


def _spec(*entries: tuple[str, ...]) -> P:
  return P(*(e or None for e in entries))


def _gathered(plan, kernel: jax.Array, a: jax.Array, b: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """W split only over its tensor-parallel axes (gathered over the rest, as FSDP does for its
  matmul), the factors replicated: what every device needs, fetched once for forward and
  backward (the backward reuses these arrays)."""
  _, _, in_axes, out_axes = plan
  return (jax.lax.with_sharding_constraint(kernel, _spec(in_axes, out_axes)),
          jax.lax.with_sharding_constraint(a, P()), jax.lax.with_sharding_constraint(b, P()))


def _sharded_forward(op: SMoAOp, precision: Any, plan, x: jax.Array, kernel: jax.Array,
                     a: jax.Array, b: jax.Array, perms: Perms) -> jax.Array:
  """``x (T, in) @ (W * F)`` per device on its piece of W (:func:`_gathered`); the partial
  products are summed over the in axes, as in any row-parallel matmul."""
  mesh, token_axes, in_axes, out_axes = plan

  def local(x, kernel, a, b, perms):
    window = _parts(kernel.shape, _starts(plan, kernel.shape))
    y = jnp.matmul(x, op.merged_kernel(kernel, a, b, perms, x.dtype, window), precision=precision)
    return jax.lax.psum(y, in_axes) if in_axes else y

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(_spec(token_axes, in_axes), _spec(in_axes, out_axes), P(), P(),
                                 P()),
                       out_specs=_spec(token_axes, out_axes))(x, kernel, a, b, perms)


def _starts(plan, shape: tuple[int, int]) -> tuple[Any, Any]:
  """Where this device's piece of an ``(in, out)`` array begins (inside ``shard_map``)."""
  _, _, in_axes, out_axes = plan
  return tuple(jax.lax.axis_index(axes) * size if axes else 0
               for axes, size in ((in_axes, shape[0]), (out_axes, shape[1])))


def _sharded_backward(op: SMoAOp, precision: Any, plan, x: jax.Array, dy: jax.Array,
                      kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`_local_backward` on every device's piece under ``jax.shard_map``; then only ``dx``
  (over the out axes, as any tensor-parallel matmul) and ``da``/``db`` (``r (in + out)``
  numbers) are summed across devices. The anchors and block gradients never leave a device."""
  mesh, token_axes, in_axes, out_axes = plan
  every = token_axes + in_axes + out_axes
  ways = sharding.axis_size(mesh, in_axes + out_axes)  # pieces W stays split into

  def local(x, dy, kernel, a, b, perms):
    dx, da, db = _local_backward(op, precision, x, dy, kernel, a, b, perms,
                                 _starts(plan, kernel.shape),
                                 dense=ways > 1 and ways >= op.layout.num_blocks)
    dx = jax.lax.psum(dx, out_axes) if out_axes else dx
    return dx, jax.lax.psum(da, every), jax.lax.psum(db, every)

  # check_vma off: the psums above are the only reductions (autodiff of the dense branch must not
  # add its own over the axes the factors are replicated on).
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(_spec(token_axes, in_axes), _spec(token_axes, out_axes),
                                 _spec(in_axes, out_axes), P(), P(), P()),
                       out_specs=(_spec(token_axes, in_axes), P(), P()),
                       check_vma=False)(x, dy, kernel, a, b, perms)


def _forward(op: SMoAOp, precision: Any, kernel_spec: tuple[Any, ...] | None, x: jax.Array,
             kernel: jax.Array, a: jax.Array, b: jax.Array, perms: Perms):
  """``(y, residuals)`` of the folded path; on a mesh the residuals hold the gathered W."""
  x2 = x.reshape(-1, x.shape[-1])
  plan = _shard_plan(kernel_spec, x2.shape[0])
  if plan is None:
    y = jnp.matmul(x, op.merged_kernel(kernel, a, b, perms, x.dtype), precision=precision)
    return y, (x, kernel, a, b, perms)
  kernel, a, b = _gathered(plan, kernel, a, b)
  y = _sharded_forward(op, precision, plan, x2, kernel, a, b, perms)
  return y.reshape(*x.shape[:-1], -1), (x, kernel, a, b, perms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _folded_matmul(op: SMoAOp, precision, kernel_spec, x, kernel, a, b, perms):
  # x: (..., in), kernel: (in, out) -> (..., out); y = x @ (W + dW).
  return _forward(op, precision, kernel_spec, x, kernel, a, b, perms)[0]


def _folded_fwd(op, precision, kernel_spec, x, kernel, a, b, perms):
  return _forward(op, precision, kernel_spec, x, kernel, a, b, perms)


def _folded_bwd(op: SMoAOp, precision, kernel_spec, residuals, dy):
  x, kernel, a, b, perms = residuals
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  plan = _shard_plan(kernel_spec, x2.shape[0])
  if plan is None:
    dx, da, db = _local_backward(op, precision, x2, dy2, kernel, a, b, perms)
  else:
    dx, da, db = _sharded_backward(op, precision, plan, x2, dy2, kernel, a, b, perms)
  # Kernel cotangent (dead code under jit when the kernel is frozen, as it is in training):
  # y = x @ (W * F)  =>  dL/dW = (x^T dy) * F.
  wide = wide_dtype(x.dtype, kernel.dtype, op.adapter_dtype)
  dkernel = (jnp.matmul(x2.T, dy2, precision=precision, preferred_element_type=wide)
             * op.modulation(a, b, perms))
  return (dx.reshape(x.shape), dkernel.astype(kernel.dtype), da.astype(a.dtype),
          db.astype(b.dtype), None)


_folded_matmul.defvjp(_folded_fwd, _folded_bwd)


def delta_weight(kernel: jax.Array, blocks: SpectralBlocks,
                 factors: Sequence[tuple[jax.Array, jax.Array]], scaling: float) -> jax.Array:
  """Dense SMoA update ``dW (in, out)`` from per-block factors, in float32.

  ``dW[C_k, R_k] = scaling * (a_k @ b_k) * kernel[C_k, R_k]`` and zero elsewhere, with
  ``factors[k] = (a_k (|C_k|, r_k), b_k (r_k, |R_k|))``; ``scaling`` is ``alpha / r`` with ``r``
  the TOTAL rank. A block with ``r_k = 0`` contributes nothing.

  Example::

    >>> import jax.numpy as jnp, smoa_jax
    >>> w = jnp.arange(12.0).reshape(4, 3) - 5
    >>> blocks = smoa_jax.spectral_blocks(w, 2)
    >>> factors = [(jnp.ones((c, 1)), jnp.ones((1, o)))
    ...            for c, o in zip(blocks.in_sizes, blocks.out_sizes)]
    >>> dw = smoa_jax.delta_weight(w, blocks, factors, scaling=0.5)
    >>> dw.shape
    (4, 3)
  """
  if len(factors) != blocks.num_blocks:
    raise ConfigError(f"delta_weight got {len(factors)} factor pairs for {blocks.num_blocks} blocks.")
  ranks = []
  for k, (ak, bk) in enumerate(factors):
    if (np.ndim(ak) != 2 or np.ndim(bk) != 2 or np.shape(ak)[0] != blocks.in_sizes[k]
        or np.shape(bk)[1] != blocks.out_sizes[k] or np.shape(ak)[1] != np.shape(bk)[0]):
      raise ConfigError(
          f"factors[{k}] have shapes a={np.shape(ak)}, b={np.shape(bk)}; expected a=(|C_k|, r_k) "
          f"with |C_k|={blocks.in_sizes[k]} and b=(r_k, |R_k|) with |R_k|={blocks.out_sizes[k]}.")
    ranks.append(int(np.shape(ak)[1]))
  layout = BlockLayout(blocks.in_sizes, blocks.out_sizes, tuple(ranks))
  a, b = stack_factors(factors, layout)
  return SMoAOp(layout, float(scaling)).delta(jnp.asarray(kernel), a, b,
                                              (blocks.in_perm, blocks.out_perm))
