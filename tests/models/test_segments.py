"""Packed sequences (smoa_jax/models/blocks.py ``segment_ids``): a row holding several examples
gives each example the logits it has alone, for every causal family and layer layout."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from smoa_jax.models import (
  GPT2LMHeadModel,
  LlamaForCausalLM,
  MistralForCausalLM,
  Qwen2ForCausalLM,
)
from smoa_jax.models.blocks import make_attention_mask

VOCAB = 61
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2 = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)

CASES = {
    "llama": lambda scan: LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0), scan_layers=scan),
    "mistral_sliding_window": lambda scan: MistralForCausalLM(
        {**LLAMA, "sliding_window": 3}, rngs=nnx.Rngs(1), scan_layers=scan),
    "qwen2_sliding_layers": lambda scan: Qwen2ForCausalLM(
        {**LLAMA, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
        rngs=nnx.Rngs(2), scan_layers=scan),
    "gpt2": lambda scan: GPT2LMHeadModel(GPT2, rngs=nnx.Rngs(3), scan_layers=scan),
}


def test_segment_mask_blocks_other_examples_and_padding():
  segments = np.array([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(make_attention_mask(segments > 0, 6, causal=True, segment_ids=segments))[0, 0]
  expected = np.zeros((6, 6), bool)
  expected[np.tril_indices(2)] = True  # example 1: tokens 0..1
  expected[2:5, 2:5] = np.tril(np.ones((3, 3), bool))  # example 2: tokens 2..4
  np.testing.assert_array_equal(mask, expected)
  alone = np.asarray(make_attention_mask(None, 4, causal=False,
                                         segment_ids=np.array([[1, 1, 2, 2]])))
  assert alone.shape == (1, 1, 4, 4) and alone[0, 0, 0].tolist() == [True, True, False, False]


# Stacked layers: the per-layer mask table (Qwen2's mixed windows) and the plain scan (GPT-2).
# By default Llama unrolled, and Qwen2's mixed windows and GPT-2 scanned; the rest with -m slow.
@pytest.mark.parametrize("case,scan", [
    (c, False) if c == "llama" else pytest.param(c, False, marks=pytest.mark.slow)
    for c in sorted(CASES)] + [("qwen2_sliding_layers", True), ("gpt2", True)])
def test_packed_row_gives_each_example_its_own_logits(case, scan):
  model = CASES[case](scan)
  rng = np.random.default_rng(0)
  lengths = (5, 7, 3)  # + 2 padding tokens in a row of 17
  examples = [rng.integers(0, VOCAB, n) for n in lengths]
  ids = np.concatenate(examples + [np.zeros(2, int)])[None]
  segments = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)] + [np.zeros(2)])
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(2)])
  forward = nnx.jit(lambda model, ids, **kwargs: model(ids, **kwargs))  # one program per length
  packed = np.asarray(forward(model, ids, attention_mask=(segments > 0)[None].astype(np.int32),
                              position_ids=positions[None].astype(np.int32),
                              segment_ids=segments[None].astype(np.int32)))
  start = 0
  for example in examples:
    alone = np.asarray(forward(model, example[None]))
    np.testing.assert_allclose(packed[0, start:start + len(example)], alone[0], atol=2e-5,
                               rtol=2e-5)
    start += len(example)
  assert np.isfinite(packed).all()
