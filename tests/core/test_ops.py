"""Tests for smoa_jax/core/ops.py: the SMoA formula, its facts, both compute paths and their gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import smoa_jax
from smoa_jax.core import ops
from smoa_jax.core.config import split_sizes
from smoa_jax.core.smoa import SMoAOp
from tests.support import reference


def _random_factors(rng, blocks, ranks):
  return [(rng.standard_normal((c, r)).astype(np.float32), rng.standard_normal((r, o)).astype(np.float32))
          for c, o, r in zip(blocks.in_sizes, blocks.out_sizes, ranks)]


@st.composite
def layer_cases(draw):
  m, n = draw(st.integers(1, 20)), draw(st.integers(1, 20))
  k = draw(st.integers(1, min(m, n)))
  r = draw(st.integers(1, 9))
  if draw(st.booleans()):
    cuts = sorted(draw(st.lists(st.integers(0, r), min_size=k - 1, max_size=k - 1)))
    ranks = tuple(b - a for a, b in zip([0] + cuts, cuts + [r]))
  else:
    ranks = split_sizes(r, k)
  return m, n, k, r, ranks, draw(st.integers(0, 2**31 - 1))


@pytest.mark.slow  # hypothesis over shapes; the fixed-shape reference tests run by default
@settings(max_examples=30, deadline=None)
@given(case=layer_cases())
def test_delta_weight_matches_reference(case):
  m, n, k, r, ranks, seed = case
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((m, n)).astype(np.float32)
  blocks = smoa_jax.spectral_blocks(w, k)
  factors = _random_factors(rng, blocks, ranks)
  scaling = 1.7 / r
  got = np.asarray(smoa_jax.delta_weight(w, blocks, factors, scaling))
  # The reference uses OUR permutations (the ordering itself is tested in test_spectral).
  in_pieces = np.split(np.asarray(blocks.in_perm), np.cumsum(blocks.in_sizes)[:-1])
  out_pieces = np.split(np.asarray(blocks.out_perm), np.cumsum(blocks.out_sizes)[:-1])
  want = reference.delta(w, in_pieces, out_pieces, factors, scaling)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _case(m=23, n=17, k=3, ranks=(3, 2, 2), seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((m, n)).astype(np.float32)
  blocks = smoa_jax.spectral_blocks(w, k)
  return w, blocks, _random_factors(rng, blocks, ranks)


def test_delta_is_zero_outside_blocks_and_low_rank_inside():
  w, blocks, factors = _case(ranks=(3, 0, 1))
  dw = np.asarray(smoa_jax.delta_weight(w, blocks, factors, 0.5))
  inside = np.zeros_like(dw, bool)
  for k, rank in enumerate((3, 0, 1)):
    c, r = blocks.block_indices(k)
    inside[np.ix_(c, r)] = True
    ratio = dw[np.ix_(c, r)] / w[np.ix_(c, r)]
    assert np.linalg.matrix_rank(ratio, tol=1e-4) <= rank
  assert np.all(dw[~inside] == 0.0)
  # A rank-0 block is frozen: exactly zero.
  c1, r1 = blocks.block_indices(1)
  assert np.all(dw[np.ix_(c1, r1)] == 0.0)


def test_rank_of_delta_exceeds_lora_rank():
  # Same parameter count as a rank-r/K LoRA, but rank(dW) reaches min(in, out).
  rng = np.random.default_rng(0)
  w = rng.standard_normal((64, 48)).astype(np.float32)
  blocks = smoa_jax.spectral_blocks(w, 4)
  factors = _random_factors(rng, blocks, (2, 2, 2, 2))
  dw = np.asarray(smoa_jax.delta_weight(w, blocks, factors, 1.0))
  assert np.linalg.matrix_rank(dw) == 48
  layout = ops.BlockLayout(blocks.in_sizes, blocks.out_sizes, (2, 2, 2, 2))
  assert layout.num_params == sum(2 * (c + o) for c, o in zip(blocks.in_sizes, blocks.out_sizes))
  assert layout.num_params == 2 * (64 + 48)  # = a rank-2 LoRA, i.e. rank r/K with r = 8


def test_smoa_k1_identity_order_is_hira():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((12, 9)), jnp.float32)
  a, b = rng.standard_normal((12, 4)), rng.standard_normal((4, 9))
  smoa_dw = smoa_jax.delta_weight(w, smoa_jax.identity_blocks(12, 9, 1), [(a, b)], 0.25)
  hira = smoa_jax.HiRAConfig(r=4, alpha=1.0).make_op(12, 9)
  hira_dw = hira.delta(w, jnp.asarray(a, jnp.float32)[None], jnp.asarray(b, jnp.float32)[None], None)
  np.testing.assert_allclose(smoa_dw, hira_dw, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(hira_dw, 0.25 * (a @ b) * np.asarray(w), rtol=1e-5, atol=1e-5)


def test_lora_formula():
  rng = np.random.default_rng(2)
  op = smoa_jax.LoRAConfig(r=3, alpha=6.0).make_op(7, 5)
  a, b = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
  w = rng.standard_normal((7, 5)).astype(np.float32)
  x = rng.standard_normal((4, 7)).astype(np.float32)
  np.testing.assert_allclose(op.apply(x, None, w, a, b), x @ (w + 2.0 * a @ b), rtol=1e-5, atol=1e-5)


def _smoa_op(w, blocks, ranks, scaling=0.8):
  layout = ops.BlockLayout(blocks.in_sizes, blocks.out_sizes, ranks)
  return SMoAOp(layout, scaling), (blocks.in_perm, blocks.out_perm)


def test_zero_init_is_exact_no_op_and_init_bounds():
  w, blocks, _ = _case(m=31, n=10, k=3, ranks=(2, 2, 2))
  op, perms = _smoa_op(w, blocks, (2, 2, 2))
  a, b = op.init_factors(jax.random.key(0))
  assert np.all(np.asarray(b) == 0)
  for k, c in enumerate(blocks.in_sizes):
    real = np.asarray(a[k, :c, :2])
    assert np.all(np.abs(real) <= 1 / np.sqrt(c)) and np.any(real != 0)
    assert np.all(np.asarray(a[k, c:]) == 0)
  x = np.random.default_rng(0).standard_normal((5, 31)).astype(np.float32)
  np.testing.assert_array_equal(op.apply(x, None, w, a, b, perms), jnp.matmul(x, w))


def test_folded_and_unfolded_paths_agree_in_value_and_gradient():
  w, blocks, factors = _case()
  op, perms = _smoa_op(w, blocks, (3, 2, 2))
  a, b = ops.stack_factors(factors, op.layout)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 23)), jnp.float32)

  # Jitted (static ``fold``): each path compiles once instead of op by op.
  @functools.partial(jax.jit, static_argnums=4)
  def apply(x, w, a, b, fold):
    return op.apply(x, None if fold else x, w, a, b, perms)

  def loss(x, w, a, b, fold):
    return jnp.sum(jnp.sin(apply(x, w, a, b, fold)))

  np.testing.assert_allclose(apply(x, w, a, b, True), apply(x, w, a, b, False),
                             rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
  g_fold, g_unfold = grad(x, w, a, b, True), grad(x, w, a, b, False)
  for got, want in zip(g_fold, g_unfold):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fold", [pytest.param(True, marks=pytest.mark.slow), False])
def test_gradients_match_finite_differences(fold):
  w, blocks, factors = _case(m=9, n=7, k=2, ranks=(2, 1))
  layout = ops.BlockLayout(blocks.in_sizes, blocks.out_sizes, (2, 1))
  op, perms = SMoAOp(layout, 0.8, adapter_dtype="float64"), (blocks.in_perm, blocks.out_perm)
  a, b = ops.stack_factors(factors, op.layout)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 9)), jnp.float32)

  def f(x, w, a, b):
    return op.apply(x, None if fold else x, w, a, b, perms)

  with jax.enable_x64(True):  # finite differences need float64 to be meaningful
    cast = lambda t: jnp.asarray(t, jnp.float64)
    check_grads(f, (cast(x), cast(w), cast(a), cast(b)), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_padded_entries_get_zero_gradient():
  # Uneven blocks (23 = 8+8+7, 17 = 6+6+5) and uneven ranks (3, 1, 0) need padding.
  w, blocks, factors = _case(ranks=(3, 1, 0))
  op, perms = _smoa_op(w, blocks, (3, 1, 0))
  a, b = ops.stack_factors(factors, op.layout)
  a = a + 1.0  # even garbage in the padding must not leak into the output or get a gradient
  b = b + 1.0
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 23)), jnp.float32)
  for fold in (True, False):
    ga, gb = jax.grad(lambda a, b: jnp.sum(op.apply(x, None if fold else x, w, a, b, perms) ** 2),
                      argnums=(0, 1))(a, b)
    ga, gb = np.asarray(ga), np.asarray(gb)
    for k, (c, o, r) in enumerate(zip(blocks.in_sizes, blocks.out_sizes, (3, 1, 0))):
      assert np.all(ga[k, c:] == 0) and np.all(ga[k, :, r:] == 0)
      assert np.all(gb[k, r:] == 0) and np.all(gb[k, :, o:] == 0)


def test_merge_then_unmerge_restores_kernel():
  w, blocks, factors = _case()
  op, perms = _smoa_op(w, blocks, (3, 2, 2), scaling=0.05)
  a, b = ops.stack_factors(factors, op.layout)
  merged = op.merged_kernel(jnp.asarray(w), a, b, perms)
  np.testing.assert_allclose(merged, w + op.delta(jnp.asarray(w), a, b, perms), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(op.unmerged_kernel(merged, a, b, perms), w, rtol=1e-5, atol=1e-6)


def test_delta_weight_rejects_wrong_factor_shapes():
  w, blocks, factors = _case()
  with pytest.raises(smoa_jax.ConfigError, match="factor pairs"):
    smoa_jax.delta_weight(w, blocks, factors[:2], 1.0)
  bad = list(factors)
  bad[1] = (factors[1][0][:-1], factors[1][1])
  with pytest.raises(smoa_jax.ConfigError, match=r"factors\[1\]"):
    smoa_jax.delta_weight(w, blocks, bad, 1.0)


def test_ops_are_jittable():
  w, blocks, factors = _case()
  got = jax.jit(smoa_jax.delta_weight, static_argnums=3)(w, blocks, factors, 0.5)
  np.testing.assert_allclose(got, smoa_jax.delta_weight(w, blocks, factors, 0.5), rtol=1e-5, atol=1e-7)
