"""The KV cache of the causal families (smoa_jax/models/cache.py): cached decoding gives the logits
of the full-sequence forward, for every family, unrolled and scanned, with left padding and
sliding windows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

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
  full = np.asarray(model(ids, mask, positions))
  cache = model.init_cache(2, 16)
  # A prefill of 5 tokens, a chunk of 3, then one token at a time.
  pieces = []
  for start, stop in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, LENGTH)]:
    logits, cache = model(ids[:, start:stop], mask[:, start:stop], positions[:, start:stop],
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
  assert cache.keys.shape[:3] == (layers, 3, 20) and cache.keys.dtype == jnp.float32
  assert cache.mask.shape == (3, 20) and int(cache.index) == 0
  ids, mask, positions = (jnp.asarray(a) for a in inputs())
  last, _ = model(ids, mask, positions, cache=model.init_cache(2, 16), logits_to_keep=1)
  full = model(ids, mask, positions)
  assert last.shape == (2, 1, CAUSAL_VOCAB)
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=2e-5)


def test_cache_follows_the_compute_dtype(checkpoint):
  model = smoa_jax.from_hf(checkpoint, dtype=jnp.bfloat16)
  assert model.init_cache(1, 8).keys.dtype == jnp.bfloat16
  assert model.init_cache(1, 8, dtype=jnp.float32).values.dtype == jnp.float32
