"""The KV cache of the causal families (smoa_jax/models/cache.py): cached decoding gives the logits
of the full-sequence forward, for every family, unrolled and scanned, with left padding and
sliding windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.models.cache import KVCache
from tests.support.hf import CAUSAL_VOCAB, family_params, tiny_causal_lm

LENGTH = 11  # longer than the sliding windows (4) of mistral and qwen2


# By default GPT-2 and Gemma 2 (alternating sliding windows, soft-capping); the rest with -m slow.
@pytest.fixture(scope="module", params=family_params(("gemma2", "gpt2")))
def checkpoint(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  tiny_causal_lm(request.param, path)
  return path


def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ids, a mask whose row 1 is left-padded by 3, and per-row positions counting real tokens."""
  ids = np.random.RandomState(0).randint(0, CAUSAL_VOCAB, (2, LENGTH))
  mask = np.ones((2, LENGTH), np.int32)
  mask[1, :3] = 0
  return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


# Scanned caches also run by default in tests/inference/test_decode.py (scanned generation).
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["unrolled", "scanned"])
def test_cached_decoding_equals_the_full_forward(checkpoint, scan):
  model = smoa_jax.from_hf(checkpoint, scan_layers=scan)
  ids, mask, positions = (jnp.asarray(a) for a in inputs())
  # Jitted: one program per input length (op by op, every call compiled each primitive).
  call = nnx.jit(lambda model, *args, cache=None: model(*args, cache=cache))
  full = np.asarray(call(model, ids, mask, positions))
  cache = model.init_cache(2, 16)
  # A prefill of 5 tokens, a chunk of 3, then one token at a time.
  pieces = []
  for start, stop in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, LENGTH)]:
    logits, cache = call(model, ids[:, start:stop], mask[:, start:stop], positions[:, start:stop],
                         cache=cache)
    pieces.append(np.asarray(logits))
  cached = np.concatenate(pieces, axis=1)
  valid = np.asarray(mask).astype(bool)  # padded query positions are undefined in both
  np.testing.assert_allclose(cached[valid], full[valid], atol=2e-5, rtol=0)
  assert int(cache.index) == LENGTH
  np.testing.assert_array_equal(np.asarray(cache.mask)[:, :LENGTH], valid)
  assert not np.asarray(cache.mask)[:, LENGTH:].any()


def test_cache_layout_and_logits_to_keep(checkpoint):
  model = smoa_jax.from_hf(checkpoint)
  cache = model.init_cache(3, 20)
  assert isinstance(cache, KVCache) and cache.max_length == 20
  layers = model.hf_config.get("num_hidden_layers") or model.hf_config["n_layer"]
  _, kv_heads, head_dim = model.cache_layout()
  # One (B * K, S, D) buffer per layer (read in place by the attention), stacked when scanned.
  assert len(cache.keys) == len(cache.values) == layers and cache.dtype == jnp.float32
  assert all(k.shape == (3 * kv_heads, 20, head_dim) for k in cache.keys + cache.values)
  stacked = smoa_jax.from_hf(checkpoint, scan_layers=True).init_cache(3, 20)
  assert stacked.keys.shape == (layers, 3 * kv_heads, 20, head_dim)
  assert cache.mask.shape == (3, 20) and int(cache.index) == 0
  ids, mask, positions = (jnp.asarray(a) for a in inputs())
  last, _ = model(ids, mask, positions, cache=model.init_cache(2, 16), logits_to_keep=1)
  full = model(ids, mask, positions)
  assert last.shape == (2, 1, CAUSAL_VOCAB)
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=2e-5)


def test_cache_follows_the_compute_dtype(checkpoint):
  model = smoa_jax.from_hf(checkpoint, dtype=jnp.bfloat16)
  assert model.init_cache(1, 8).dtype == jnp.bfloat16
  assert model.init_cache(1, 8, dtype=jnp.float32).dtype == jnp.float32


def _step_counts(model, slots: int) -> tuple[float, int, int]:
  """XLA's bytes accessed and temporary bytes of a compiled one-token step (cache donated, as in
  the decode loop) at ``slots`` cache slots, and the bytes of the cache's keys and values."""
  graphdef, state = nnx.split(model)

  def step(state, cache, tokens):
    return nnx.merge(graphdef, state)(tokens, cache=cache)

  # Batch 2: with B*K = 1 (one KV head at batch 1) XLA drops the unit axis and copies the
  # cache after all, the limit that models/cache.py documents.
  cache = jax.eval_shape(lambda: model.init_cache(2, slots))
  tokens = jax.ShapeDtypeStruct((2, 1), jnp.int32)
  compiled = jax.jit(step, donate_argnums=1).lower(state, cache, tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  kv = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((cache.keys, cache.values)))
  return cost["bytes accessed"], compiled.memory_analysis().temp_size_in_bytes, kv


def test_a_decode_step_reads_the_cache_in_place(checkpoint):
  # XLA's static counts, no timing. From 64 to 1,024 slots a step must read the extra keys and
  # values once, plus float32 scores that tiny heads make comparable (1.4-2.3x the extra cache
  # bytes here, 1.2x on SmolLM2). The former (L, B, S, K, D) cache, transposed into temporaries
  # per layer and step, read 3.4-4.5x with 0.5x of it in temporaries; now under 0.15x.
  model = smoa_jax.from_hf(checkpoint)
  (short_bytes, short_temp, short_kv), (long_bytes, long_temp, long_kv) = (
      _step_counts(model, slots) for slots in (64, 1024))
  extra = long_kv - short_kv
  assert long_bytes - short_bytes < 2.75 * extra, (long_bytes - short_bytes) / extra
  assert long_temp - short_temp < 0.25 * extra, (long_temp - short_temp) / extra
