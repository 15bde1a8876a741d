"""Tests for smoa_jax/core/spectral.py against the float64 reference in tests/reference.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import smoa_jax
from smoa_jax.errors import ConfigError, KernelError
from tests.support import reference


def _sorted_by_reference(perm: np.ndarray, ref_scores: np.ndarray, tol: float) -> bool:
  """True if ``perm`` orders the float64 reference scores ascending, up to float32 noise ``tol``."""
  return bool(np.all(np.diff(ref_scores[np.asarray(perm)]) >= -tol))


def _structured(name: str, shape, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  m, n = shape
  if name == "random":
    return rng.standard_normal(shape)
  if name == "low_rank_plus_noise":
    return rng.standard_normal((m, 5)) @ rng.standard_normal((5, n)) + 1e-3 * rng.standard_normal(shape)
  if name == "scaled_rows":
    return rng.standard_normal(shape) * np.geomspace(0.3, 3.0, m)[:, None]
  if name == "ill_conditioned_rows":
    return rng.standard_normal(shape) * np.geomspace(1e-2, 1e2, m)[:, None]
  if name == "zero_rows_and_cols":
    w = rng.standard_normal(shape)
    w[::3] = 0.0
    w[:, 1::4] = 0.0
    return w
  if name == "decaying_spectrum":
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q = min(m, n)
    return (u[:, :q] * np.exp(-np.arange(q) / 4.0)) @ v[:, :q].T
  raise ValueError(name)


STRUCTURED = ["random", "low_rank_plus_noise", "scaled_rows", "ill_conditioned_rows",
              "zero_rows_and_cols", "decaying_spectrum"]


def _simple_spectrum(w: np.ndarray) -> bool:
  """Centroids are only defined when the non-negligible singular values are distinct."""
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  big = s[s > 1e-3 * max(s[0], 1e-12)]
  return bool(len(big) < 2 or np.min(-np.diff(big)) > 1e-3 * big[0])


@pytest.mark.slow  # 25 hypothesis shapes; the fixed-shape reference tests below run by default
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_blocks_match_reference(m, n, seed, data):
  k = data.draw(st.integers(1, min(m, n)), label="num_blocks")
  w = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
  assume(_simple_spectrum(w))
  blocks = smoa_jax.spectral_blocks(w, k)
  ref_in, ref_out = reference.scores(w)
  q = min(m, n)
  assert blocks.in_sizes == tuple(reference.split(m, k))
  assert blocks.out_sizes == tuple(reference.split(n, k))
  assert sorted(np.asarray(blocks.in_perm).tolist()) == list(range(m))
  assert sorted(np.asarray(blocks.out_perm).tolist()) == list(range(n))
  tol = 1e-4 * q + 1e-5
  assert _sorted_by_reference(blocks.in_perm, ref_in, tol)
  assert _sorted_by_reference(blocks.out_perm, ref_out, tol)


@pytest.mark.parametrize("shape", [(40, 64), (64, 40), (37, 37), (90, 31)])
@pytest.mark.parametrize("name", STRUCTURED)
def test_gram_svd_and_auto_give_the_reference_permutations(name, shape):
  w = _structured(name, shape).astype(np.float32)
  ref_in, ref_out, _, _ = reference.blocks(w, 3)
  methods = ("gram", "svd", "auto") if name != "ill_conditioned_rows" else ("auto",)
  for method in methods:
    blocks = smoa_jax.spectral_blocks(w, 3, method=method)
    np.testing.assert_array_equal(blocks.in_perm, ref_in, err_msg=method)
    np.testing.assert_array_equal(blocks.out_perm, ref_out, err_msg=method)


def test_auto_falls_back_to_svd_when_the_gram_matrix_cannot_resolve_rows():
  # Rows spanning four decades: the small rows live below the float32 Gram noise floor.
  w = _structured("ill_conditioned_rows", (40, 64)).astype(np.float32)
  ref_in, _, _, _ = reference.blocks(w, 2)
  gram = smoa_jax.spectral_blocks(w, 2, method="gram")
  auto = smoa_jax.spectral_blocks(w, 2, method="auto")
  assert not np.array_equal(gram.in_perm, ref_in)  # the failure the guard exists for
  np.testing.assert_array_equal(auto.in_perm, ref_in)
  batched = smoa_jax.spectral_blocks_batched([w, _structured("random", (40, 64))], 2)
  np.testing.assert_array_equal(batched[0].in_perm, ref_in)


@pytest.mark.parametrize("method", ["gram", pytest.param("svd", marks=pytest.mark.slow)])
def test_large_matrix_agrees_with_reference_up_to_near_ties(method):
  # At 576 x 1536 neighbouring float64 scores can be closer than float32 resolution, so positions
  # may swap between near-equal neighbours, but the order is right up to that noise and the block
  # membership is almost entirely the same.
  w = np.random.default_rng(1).standard_normal((576, 1536)).astype(np.float32)
  blocks = smoa_jax.spectral_blocks(w, 4, method=method)
  ref_in, ref_out = reference.scores(w)
  assert _sorted_by_reference(blocks.in_perm, ref_in, 1e-3)
  assert _sorted_by_reference(blocks.out_perm, ref_out, 1e-3)
  _, _, ref_pieces, _ = reference.blocks(w, 4)
  ours = [set(c.tolist()) for c in np.array_split(np.asarray(blocks.in_perm), 4)]
  moved = sum(len(set(r.tolist()) - o) for r, o in zip(ref_pieces, ours))
  assert moved <= 2


def test_zero_coordinates_score_zero_and_ties_break_by_index():
  w = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
  w[[2, 5, 6]] = 0.0
  w[:, [1, 4]] = 0.0
  for method in ("gram", "svd"):
    s_in, s_out = smoa_jax.centroid_scores(jnp.asarray(w), method)
    assert np.all(np.asarray(s_in)[[2, 5, 6]] == 0.0)
    assert np.all(np.asarray(s_out)[[1, 4]] == 0.0)
    blocks = smoa_jax.spectral_blocks(w, 2, method=method)
    # All other scores are positive, so the zero rows come first, in index order (stable sort).
    assert np.asarray(blocks.in_perm)[:3].tolist() == [2, 5, 6]
    assert np.asarray(blocks.out_perm)[:2].tolist() == [1, 4]


def test_bf16_kernel_is_processed_in_float32():
  w = np.random.default_rng(2).standard_normal((33, 20)).astype(np.float32)
  w_bf16 = jnp.asarray(w, jnp.bfloat16)
  blocks = smoa_jax.spectral_blocks(w_bf16, 3)
  expected = smoa_jax.spectral_blocks(np.asarray(w_bf16.astype(jnp.float32)), 3)
  np.testing.assert_array_equal(blocks.in_perm, expected.in_perm)
  np.testing.assert_array_equal(blocks.out_perm, expected.out_perm)
  assert blocks.in_perm.dtype == jnp.int32


def test_jit_and_vmap_batched_equal_single():
  ws = np.random.default_rng(3).standard_normal((5, 24, 18)).astype(np.float32)
  batched = smoa_jax.spectral_blocks_batched(ws, 3, chunk_size=2)
  assert len(batched) == 5
  for w, got in zip(ws, batched):
    single = smoa_jax.spectral_blocks(w, 3)
    np.testing.assert_array_equal(got.in_perm, single.in_perm)
    np.testing.assert_array_equal(got.out_perm, single.out_perm)
  # The pure core jits and vmaps directly.
  in_perms, _ = jax.jit(jax.vmap(smoa_jax.spectral_orders))(jnp.asarray(ws))
  np.testing.assert_array_equal(in_perms[0], batched[0].in_perm)


def test_blocks_are_a_pytree_with_static_sizes():
  blocks = smoa_jax.spectral_blocks(np.eye(4, 3, dtype=np.float32) + 0.1, 2)
  leaves, treedef = jax.tree.flatten(blocks)
  assert len(leaves) == 2
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.in_sizes == (2, 2) and rebuilt.out_sizes == (2, 1)
  c0, r0 = blocks.block_indices(0)
  assert len(c0) == 2 and len(r0) == 2


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, True])
def test_bad_num_blocks(k):
  with pytest.raises(ConfigError, match="num_blocks"):
    smoa_jax.spectral_blocks(np.ones((4, 6), np.float32), k)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_kernel_is_refused(bad):
  w = np.ones((4, 6), np.float32)
  w[1, 2] = bad
  with pytest.raises(KernelError, match="NaN or Inf"):
    smoa_jax.spectral_blocks(w, 2)


def test_wrong_rank_kernel_is_refused():
  with pytest.raises(KernelError, match="2-D"):
    smoa_jax.spectral_blocks(np.ones((4,), np.float32), 1)
  with pytest.raises(KernelError, match="one shape"):
    smoa_jax.spectral_blocks_batched([np.ones((4, 4)), np.ones((4, 5))], 1)


def test_unknown_method():
  with pytest.raises(ConfigError, match="method"):
    smoa_jax.spectral_blocks(np.ones((4, 4), np.float32), 1, method="qr")
