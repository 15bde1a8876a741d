"""Greedy decoding without a KV cache: the plain reference that cached decoding is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_without_cache(model: nnx.Module, prompts: Sequence[Sequence[int]],
                         new_tokens: int) -> list[list[int]]:
  """The ``new_tokens`` greedy ids after each prompt, every step running the whole sequence.

  All rows share one right-padded ``(len(prompts), max prompt length + new_tokens)`` buffer, so the
  jitted forward compiles once: causal attention makes the logits at position ``t`` independent of
  the tokens after it, padding included.
  """
  forward = nnx.jit(lambda m, ids: m(ids))
  lengths = [len(p) for p in prompts]
  buffer = np.zeros((len(prompts), max(lengths) + new_tokens), np.int32)
  for row, prompt in enumerate(prompts):
    buffer[row, :len(prompt)] = prompt
  for step in range(new_tokens):
    logits = np.asarray(forward(model, jnp.asarray(buffer)))
    for row, length in enumerate(lengths):
      buffer[row, length + step] = int(np.argmax(logits[row, length + step - 1]))
  return [buffer[row, length:length + new_tokens].tolist() for row, length in enumerate(lengths)]
