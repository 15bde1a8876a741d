"""The authors' SMoA algorithm in PyTorch: the speed baseline smoa-jax is compared against.

Written here from docs/design.md section 1 (no code copied) to do, per forward, what the authors'
implementation (misonsky/SMoA, ``cpeft/tuners/smoa.py``) does:

* the frozen weight is in torch layout, ``(out, in)``, ``y = F.linear(x, W, bias)``;
* the anchors are separate copies of the K frozen blocks ``W[R_k][:, C_k]`` (buffers), i.e. a
  second copy of the blocked part of W;
* every forward builds the full dense ``dW (out, in)``: a zero matrix into which the K blocks
  ``(alpha / r) (B_k @ A_k) * anchor_k`` are scattered, with ``lora_A[k] (r_k, |C_k|)`` and
  ``lora_B[k] (|R_k|, r_k)`` trainable;
* ``y = F.linear(x, W, bias) + F.linear(dropout(x), dW)``: a second full matmul; autograd's
  backward of that path adds two more (``dy^T x`` for the dense ``dW``, ``dy @ dW`` for the
  input), so a training step costs about ``10 T in out`` flops against ``(4 + 2/K) T in out``
  for smoa-jax's folded path (docs/design.md, section 4).

Conversion from smoa_jax (Flax layout ``(in, out)``): the torch weight is ``kernel.T``; our
``in_perm`` is their column order (``C_k`` indexes columns), our ``out_perm`` their row order;
``lora_A[k] = a_k.T`` and ``lora_B[k] = b_k.T``. :func:`compare_with_smoa_jax` checks that
both compute the same outputs and gradients for the same weights (used by the smoke test).
:func:`benchmarks._models.authors_spec` writes a layer's blocks and factors as NumPy arrays and
:meth:`AuthorsSMoALinear.from_spec` builds the layer from them, so that a process without JAX
(benchmarks/model_step.py's PyTorch worker) can rebuild the model a JAX process adapted. This
module imports JAX only inside the functions that read smoa_jax layers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
  import smoa_jax

__all__ = ["AuthorsSMoALinear", "compare_with_smoa_jax", "peak_live_bytes"]


def _pieces(order: Sequence[int], sizes: Sequence[int]) -> list[torch.Tensor]:
  """Cut a coordinate order into K contiguous index tensors of the given sizes."""
  order = torch.as_tensor(np.array(order), dtype=torch.long)
  return list(torch.split(order, list(sizes)))


class AuthorsSMoALinear(nn.Module):
  """A frozen ``(out, in)`` linear layer with the authors' SMoA adapter (see module docstring).

  Args:
    weight: ``(out, in)`` frozen weight (torch layout).
    bias: ``(out,)`` frozen bias or ``None``.
    row_order: the ``out`` output coordinates in spectral order (smoa_jax ``out_perm``).
    col_order: the ``in`` input coordinates in spectral order (smoa_jax ``in_perm``).
    row_sizes, col_sizes: ``|R_k|`` and ``|C_k|`` for k = 0..K-1.
    ranks: ``r_k`` per block; the total rank ``r = sum(ranks)`` sets the scaling ``alpha / r``.
    alpha: scale numerator.
    dropout: adapter-path dropout rate (``nn.Identity`` when 0).
  """

  def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, row_order: Sequence[int],
               col_order: Sequence[int], row_sizes: Sequence[int], col_sizes: Sequence[int],
               ranks: Sequence[int], alpha: float, dropout: float = 0.0):
    super().__init__()
    # Row-major (out, in) like any torch model's weight, whatever strides the caller passed.
    self.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format),
                               requires_grad=False)
    self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    self.scaling = alpha / sum(ranks)
    self.num_blocks = len(ranks)
    self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    rows, cols = _pieces(row_order, row_sizes), _pieces(col_order, col_sizes)
    self.lora_A = nn.ParameterList()
    self.lora_B = nn.ParameterList()
    for k, (r_k, rows_k, cols_k) in enumerate(zip(ranks, rows, cols)):
      self.register_buffer(f"rows_{k}", rows_k)
      self.register_buffer(f"cols_{k}", cols_k)
      self.register_buffer(f"anchor_{k}", self.weight[rows_k][:, cols_k].clone())
      bound = 1.0 / np.sqrt(len(cols_k))
      self.lora_A.append(nn.Parameter(torch.empty(r_k, len(cols_k)).uniform_(-bound, bound)))
      self.lora_B.append(nn.Parameter(torch.zeros(len(rows_k), r_k)))

  @classmethod
  def from_spec(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                spec: Mapping[str, np.ndarray]) -> "AuthorsSMoALinear":
    """The layer for a frozen ``(out, in)`` weight and the
    :func:`benchmarks._models.authors_spec` of the same layer."""
    ranks = [int(v) for v in spec["ranks"]]
    module = cls(weight, bias, row_order=spec["row_order"], col_order=spec["col_order"],
                 row_sizes=[int(v) for v in spec["row_sizes"]],
                 col_sizes=[int(v) for v in spec["col_sizes"]], ranks=ranks,
                 alpha=float(spec["alpha"]), dropout=float(spec["dropout"]))
    with torch.no_grad():
      for k in range(len(ranks)):
        module.lora_A[k].copy_(torch.from_numpy(np.asarray(spec[f"lora_A_{k}"])))
        module.lora_B[k].copy_(torch.from_numpy(np.asarray(spec[f"lora_B_{k}"])))
    return module

  @classmethod
  def from_smoa_dense(cls, layer: smoa_jax.SMoADense) -> "AuthorsSMoALinear":
    """The same frozen weights, blocks and current factors as an unmerged smoa_jax layer."""
    from benchmarks._models import authors_spec

    bias = None if layer.bias is None else torch.from_numpy(np.array(layer.bias[...]))
    return cls.from_spec(torch.from_numpy(np.array(layer.kernel[...]).T), bias,
                         authors_spec(layer))

  def delta_weight(self) -> torch.Tensor:
    """Dense ``dW (out, in)``: the K scaled, anchored blocks scattered into zeros."""
    dw = self.weight.new_zeros(self.weight.shape)
    for k in range(self.num_blocks):
      rows, cols = getattr(self, f"rows_{k}"), getattr(self, f"cols_{k}")
      block = self.scaling * (self.lora_B[k] @ self.lora_A[k]) * getattr(self, f"anchor_{k}")
      dw[rows[:, None], cols[None, :]] = block
    return dw

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # x: (..., in) -> (..., out)
    return F.linear(x, self.weight, self.bias) + F.linear(self.dropout(x), self.delta_weight())


def compare_with_smoa_jax(layer: smoa_jax.SMoADense, x: np.ndarray,
                          dy: np.ndarray) -> dict[str, float]:
  """Max abs differences between smoa_jax and :class:`AuthorsSMoALinear` on the same weights.

  Runs the (dropout-free) forward on ``x (T, in)`` and the backward of ``sum(y * dy)`` in both,
  and returns the largest absolute difference of ``y``, ``dx``, and the factor gradients
  (``a``/``b`` against ``lora_A.T``/``lora_B.T``, block by block).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import smoa_jax

  graphdef, params, rest = nnx.split(layer, smoa_jax.TrainableParam, ...)

  @jax.jit
  def forward_backward(params, rest, x, dy):
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x)
    return y, *vjp(dy)

  y_jax, dparams, dx_jax = forward_backward(params, rest, jnp.asarray(x), jnp.asarray(dy))
  grads_jax = layer.op.factor_blocks(dparams["lora_a"][...], dparams["lora_b"][...])

  module = AuthorsSMoALinear.from_smoa_dense(layer)
  x_torch = torch.from_numpy(np.array(x)).requires_grad_(True)
  y_torch = module(x_torch)
  y_torch.backward(torch.from_numpy(np.array(dy)))

  def diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b.detach().numpy()), initial=0.0))

  return {
      "y": diff(y_jax, y_torch),
      "dx": diff(dx_jax, x_torch.grad),
      "da": max(diff(da, module.lora_A[k].grad.T) for k, (da, _) in enumerate(grads_jax)),
      "db": max(diff(db, module.lora_B[k].grad.T) for k, (_, db) in enumerate(grads_jax)),
  }


def peak_live_bytes(step: Callable[[], Any]) -> int:
  """Peak of the live bytes torch allocates during one ``step()`` (profiler memory timeline).

  Only tensors created inside the step count, so clear gradients first if the number must not
  depend on what the previous step left behind.
  """
  os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence kineto's start/stop lines
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              profile_memory=True, record_shapes=True, with_stack=True) as prof:
    step()
  created, live, peak = set(), 0, 0
  for _, action, key, size in prof._memory_profile().timeline:  # torch is pinned (pyproject)
    if action.name == "CREATE":
      created.add(key)
      live += size
    elif action.name == "DESTROY" and key in created:
      live -= size
    peak = max(peak, live)
  return peak
