"""A straightforward float64 NumPy re-derivation of docs/design.md section 1, for tests only.

Deliberately written without the library's tricks (no Gram matrix, no padding, no permutation
takes): a reduced SVD, the centroid formula, a stable argsort, array_split, and a dense loop
over blocks.
"""

from __future__ import annotations

import numpy as np


def scores(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Spectral centroids of input and output coordinates of a kernel (in, out), float64."""
  w = np.asarray(kernel, np.float64)
  p, s, qt = np.linalg.svd(w, full_matrices=False)
  eps = np.finfo(np.float32).eps

  def centroid(u: np.ndarray, is_zero: np.ndarray) -> np.ndarray:
    energy = u**2 * s[None, :]**2
    score = (energy * np.arange(len(s))[None, :]).sum(1) / np.maximum(energy.sum(1), eps)
    return np.where(is_zero, 0.0, score)  # docs/design.md section 1: an all-zero coordinate scores 0

  return centroid(p, np.all(w == 0, axis=1)), centroid(qt.T, np.all(w == 0, axis=0))


def blocks(kernel: np.ndarray, num_blocks: int):
  """(in_perm, out_perm, in_pieces, out_pieces) with numpy's stable argsort and array_split."""
  s_in, s_out = scores(kernel)
  in_perm = np.argsort(s_in, kind="stable")
  out_perm = np.argsort(s_out, kind="stable")
  return in_perm, out_perm, np.array_split(in_perm, num_blocks), np.array_split(out_perm, num_blocks)


def delta(kernel: np.ndarray, in_pieces, out_pieces, factors, scaling: float) -> np.ndarray:
  """Dense dW (in, out): dW[C_k, R_k] = scaling (a_k @ b_k) * W[C_k, R_k]; zero elsewhere."""
  w = np.asarray(kernel, np.float64)
  dw = np.zeros_like(w)
  for c, r, (a, b) in zip(in_pieces, out_pieces, factors):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dw[np.ix_(c, r)] = scaling * (a @ b) * w[np.ix_(c, r)]
  return dw


def split(total: int, pieces: int) -> list[int]:
  return [len(p) for p in np.array_split(np.arange(total), pieces)]
