"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p.

:class:`SamplingConfig` validates the knobs once (a :class:`~smoa_jax.ConfigError` naming the bad
one); :func:`next_tokens` is the pure, jittable choice from logits ``(B, V)``, applied in
Hugging Face's order (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``)::

    temperature 0        argmax (the first maximal id on ties, like torch.argmax)
    temperature T > 0    sample from softmax(logits / T)
    top_k = k            ... restricted to the k largest logits
    top_p = p            ... restricted to the smallest head of the sorted distribution whose
                         mass reaches p: token i (descending) is kept iff the mass before it < p

Randomness: prompt ``i`` (its index in the caller's list) draws its token ``t`` with
``fold_in(fold_in(key(seed), t), i)``, so a seed reproduces the same tokens, and a prompt's draws
do not depend on the other prompts, the batch size or how the prompts are split into batches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from smoa_jax.errors import ConfigError

__all__ = ["SamplingConfig", "next_tokens", "top_p_keep"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """How :func:`smoa_jax.generate` decodes.

  Attributes:
    max_new_tokens: tokens to generate at most per prompt (>= 1); a row stops earlier at EOS.
    temperature: 0 for greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
    top_k: sample among the k most likely tokens only (>= 1; None: no limit). Sampling only.
    top_p: nucleus sampling: the most likely tokens whose probabilities sum to p, in (0, 1]
      (None or 1: no limit). Sampling only.
    seed: the random seed of sampling (``jax.random.key(seed)``).
  """

  max_new_tokens: int
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or \
        self.max_new_tokens < 1:
      raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}.")
    if not self.temperature >= 0:  # also refuses NaN
      raise ConfigError(f"temperature must be >= 0 (0 = greedy decoding), got "
                        f"{self.temperature!r}.")
    if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                   or self.top_k < 1):
      raise ConfigError(f"top_k must be an integer >= 1 (or None for no top-k limit), got "
                        f"{self.top_k!r}.")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p must be in (0, 1] (1 or None: no nucleus limit), got "
                        f"{self.top_p!r}.")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ConfigError(f"seed must be an integer, got {self.seed!r}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def uses_top_p(self) -> bool:
    return not self.greedy and self.top_p is not None and self.top_p < 1

  def static_key(self, vocab_size: int) -> tuple[bool, int | None, bool]:
    """What changes the compiled program: greedy or not, the top-k size, top-p on or off
    (the temperature, ``p`` and the seed are runtime values)."""
    top_k = None if self.greedy or self.top_k is None or self.top_k >= vocab_size else self.top_k
    return self.greedy, top_k, self.uses_top_p


def top_p_keep(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Boolean mask of the nucleus over logits sorted descending ``(..., n)``: keep token i iff the
  probability mass of the tokens before it is < ``top_p`` (so the first is always kept)."""
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  return before < top_p


def next_tokens(logits: jax.Array, key: jax.Array, rows: jax.Array, step: jax.Array, *,
                greedy: bool, top_k: int | None, use_top_p: bool, temperature: jax.Array,
                top_p: jax.Array) -> jax.Array:
  """The next token of every row, ``logits (B, V)`` -> ``(B,)`` int32 (see the module docstring).

  ``greedy``, ``top_k`` and ``use_top_p`` are static (:meth:`SamplingConfig.static_key`);
  ``key`` is the seed's key, ``rows (B,)`` the prompts' indices, ``step`` the index of the token
  being chosen.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    values, index = jax.lax.top_k(scaled, top_k)  # sorted descending
  elif use_top_p:
    values, index = jax.lax.top_k(scaled, scaled.shape[-1])
  else:
    values, index = scaled, None
  if use_top_p:
    values = jnp.where(top_p_keep(values, top_p), values, -jnp.inf)
  keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(key, step), row))(rows)
  choice = jax.vmap(jax.random.categorical)(keys, values)
  if index is not None:
    choice = jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0]
  return choice.astype(jnp.int32)
