"""Token-level generation: prefill, then a jitted decode loop, for any causal LM of smoa-jax.

:func:`generate_ids` takes prompts as token ids and returns the new ids of every prompt. The
model may be plain, merged, carry unmerged SMoA / LoRA / HiRA adapters, hold bfloat16 weights,
be laid out on a mesh, or stack its layers (``scan_layers=True``): anything with the causal-LM
cache protocol of :mod:`smoa_jax.models.cache` (``init_cache`` and ``cache=``).

One program per bucket
    Prompts are left-padded to a power-of-two length ``P`` (at least 16) and the output buffer
    has a power-of-two length ``N`` >= ``max_new_tokens`` (at least 8); the cache holds ``P + N``
    slots, allocated once. ONE jitted program runs the prefill (only the last position's logits
    are computed) and then ``lax.while_loop`` over decode steps, one token per row per step,
    until ``max_new_tokens`` or every row has produced an EOS id. ``max_new_tokens``, the
    temperature, top-p and the seed are runtime values, so every call with the same batch size,
    buckets, model structure and sampling mode (greedy / top-k size / top-p on or off) reuses one
    compiled program; :func:`traces` counts the programs traced in this process.

Positions
    Row ``b``'s prompt token ``j`` gets position ``(number of real tokens before it)``, so RoPE
    (Llama family) and learned positions (GPT-2) are the same as for the unpadded prompt; the
    t-th new token gets position ``len(prompt_b) + t``. Padded slots are masked as keys.

Adapters are folded once per call
    Before the program runs, every adapter layer's kernel is replaced by ``W + dW``
    (:meth:`~smoa_jax.AdaptedDense.folded_kernel`; the base ``W`` if the adapter is disabled)
    in a copy of the model that shares all other arrays (:func:`folded_copy`, one jitted program
    over the whole model, compiled once per model structure; :func:`fold_traces` counts them;
    folding layer by layer cost SmolLM2 a split and a dispatch per layer), so a decode step
    costs the base model's matmuls whatever the adapter: SMoA's op would otherwise rebuild
    ``W * (1 + M)`` at every step (XLA's loop-invariant code motion happens to hoist that out of
    the loop on CPU -- measured -- but folding does not depend on the compiler), and LoRA would
    add two matmuls per layer. Folding outside the program also keeps its compile time that of
    the base model: 150 folded SMoA kernels inside it made SmolLM2's program compile ~3x longer.
    The caller's model is unchanged; the price is one extra copy of each adapted kernel while
    the call runs. Adapter dropout is off.

Stopping
    A row stops after the first id in ``eos_token_ids`` (that id is returned as its last token) or
    after ``max_new_tokens``; finished rows are padded with ``pad_token_id`` inside the program
    and trimmed here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smoa_jax.errors import ConfigError, DataError
from smoa_jax.inference.sampling import SamplingConfig, next_tokens
from smoa_jax.layers.inject import adapter_layers
from smoa_jax.models.base import CausalLM

__all__ = ["generate_ids", "folded_copy", "bucket", "traces", "fold_traces", "check_prompts",
           "PROMPT_BUCKET_MIN", "NEW_TOKENS_BUCKET_MIN"]

PROMPT_BUCKET_MIN = 16
NEW_TOKENS_BUCKET_MIN = 8

_traces = 0
_fold_traces = 0
# The callback of the streaming program being run (see generate_ids(on_token=...)).
_on_token: Callable[[np.ndarray], None] | None = None


def traces() -> int:
  """Decode programs traced (and so compiled) in this process so far."""
  return _traces


def bucket(n: int, minimum: int) -> int:
  """The smallest power of two >= ``max(n, minimum)``."""
  return 1 << (max(n, minimum) - 1).bit_length()


@functools.partial(jax.jit, static_argnames="graphdef")
def _folded_kernels(graphdef: Any, state: Any) -> list[jax.Array]:
  """``W + dW`` (``W`` if disabled) of every adapter layer of the model, in
  :func:`~smoa_jax.adapter_layers` order: ONE program per model structure."""
  global _fold_traces
  _fold_traces += 1
  return [layer.base_kernel() if layer.disabled else layer.folded_kernel()
          for _, layer in adapter_layers(nnx.merge(graphdef, state))]


def fold_traces() -> int:
  """Fold programs (:func:`folded_copy`) traced (and so compiled) in this process so far."""
  return _fold_traces


def folded_copy(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` sharing its arrays, whose adapter layers hold ``W + dW`` (``W`` when
  disabled) and are marked merged, so their forward is a plain matmul; ``model`` is unchanged.

  All kernels are folded by one jitted program, compiled once per model structure (graphdef):
  a call then costs one dispatch and the arithmetic, not a dispatch and a split per layer."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state, copy=True)  # new Variables, same (immutable) arrays
  layers = adapter_layers(copy)
  if not layers:
    return copy
  for (_, layer), kernel in zip(layers, _folded_kernels(graphdef, state)):
    layer.kernel[...] = kernel
    layer.merged, layer.disabled = True, False
  return copy


def check_prompts(model: nnx.Module, prompt_ids: Sequence[Sequence[int]],
                  max_new_tokens: int) -> list[np.ndarray]:
  """Validate prompts (non-empty, ids in the vocabulary, room for ``max_new_tokens``); returns
  them as int32 arrays. Raises DataError naming the first bad prompt, ConfigError for a model
  that cannot generate."""
  if not isinstance(model, CausalLM):
    raise ConfigError(f"{type(model).__name__} cannot generate text; generation needs a causal "
                      "LM (Llama, Mistral, Qwen2, Qwen3, GPT-2).")
  if isinstance(prompt_ids, (str, bytes)) or len(prompt_ids) == 0:
    raise DataError("no prompts to generate from; expected a list of prompts (token-id lists).")
  config = model.hf_config
  vocab = config["vocab_size"]
  context = model.context_length
  prompts = []
  for i, ids in enumerate(prompt_ids):
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
      raise DataError(f"prompt {i} is not a list of token ids (got an array of shape "
                      f"{array.shape}, dtype {array.dtype}).")
    if array.size == 0:
      raise DataError(f"prompt {i} is empty; every prompt needs at least one token.")
    outside = array[(array < 0) | (array >= vocab)]
    if outside.size:
      raise DataError(f"prompt {i} holds token id {int(outside[0])}, outside the model's "
                      f"vocabulary 0..{vocab - 1}; was it tokenized for another model?")
    if context and array.size + max_new_tokens > context:
      raise DataError(f"prompt {i} has {array.size} tokens; with max_new_tokens={max_new_tokens} "
                      f"that needs {array.size + max_new_tokens} positions, but the model has "
                      f"{context} (max_position_embeddings / n_positions). Shorten the prompt to "
                      f"at most {context - max_new_tokens} tokens or lower max_new_tokens.")
    prompts.append(array.astype(np.int32))
  return prompts


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about a program that is not a runtime value (part of its jit cache key)."""

  new_tokens: int  # N, the output buffer (power of two)
  greedy: bool
  top_k: int | None
  use_top_p: bool
  stream: bool


def _emit(tokens: np.ndarray) -> None:
  if _on_token is not None:
    _on_token(np.asarray(tokens))


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _program(graphdef: Any, static: _Static, state: Any, ids: jax.Array, mask: jax.Array,
             rows: jax.Array, max_new_tokens: jax.Array, key: jax.Array, temperature: jax.Array,
             top_p: jax.Array, eos: jax.Array, pad: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``ids``/``mask (B, P)`` left-padded prompts (``rows (B,)``: their indices in the caller's
  list, for the random keys) -> new tokens ``(B, N)`` and the steps run."""
  global _traces
  _traces += 1
  # Modules are rebuilt inside each traced body (nnx.scan refuses modules of an enclosing trace).
  forward = lambda *args, **kwargs: nnx.merge(graphdef, state, copy=True)(*args, **kwargs)
  batch, length = ids.shape
  pick = functools.partial(next_tokens, key=key, rows=rows, greedy=static.greedy,
                           top_k=static.top_k, use_top_p=static.use_top_p,
                           temperature=temperature, top_p=top_p)

  def record(out, done, step, tokens):
    tokens = jnp.where(done, pad, tokens)
    if static.stream:
      jax.debug.callback(_emit, tokens, ordered=True)
    return out.at[:, step].set(tokens), done | jnp.isin(tokens, eos), tokens

  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = nnx.merge(graphdef, state).init_cache(batch, length + static.new_tokens)
  logits, cache = forward(ids, mask, positions, cache=cache, logits_to_keep=1)
  out = jnp.full((batch, static.new_tokens), pad, jnp.int32)
  out, done, tokens = record(out, jnp.zeros(batch, bool), 0, pick(logits[:, -1], step=0))

  def cond(carry):
    step, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tokens, position, done, out, cache = carry
    logits, cache = forward(tokens[:, None], None, position[:, None], cache=cache)
    out, done, tokens = record(out, done, step, pick(logits[:, 0], step=step))
    return step + 1, tokens, position + 1, done, out, cache

  carry = (jnp.asarray(1, jnp.int32), tokens, positions[:, -1] + 1, done, out, cache)
  steps, _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out, steps


def generate_ids(model: nnx.Module, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, batch_size: int | None = None,
                 on_token: Callable[[np.ndarray], None] | None = None) -> list[list[int]]:
  """Generate from token-id prompts; returns the new ids of every prompt (see module docstring).

  Args:
    model: a causal LM of smoa-jax (any adapter state, dtype, mesh, scan layout); not changed.
    prompt_ids: one list of token ids per prompt (of any lengths; none empty).
    max_new_tokens, temperature, top_k, top_p, seed: as in :class:`SamplingConfig`.
    eos_token_ids: ids that end a row (it keeps that id as its last token); () never stops early.
    pad_token_id: fills the padding of prompts and finished rows (never returned).
    batch_size: prompts per program call (default: all at once).
    on_token: called with every step's new tokens ``(B,)`` (``pad_token_id`` for finished rows)
      while the program runs, for streaming; compiles a separate program.

  Returns:
    ``list[list[int]]``: per prompt, at most ``max_new_tokens`` ids, ending at the first EOS.

  Raises:
    ConfigError: bad sampling values, or a model that cannot generate.
    DataError: no prompts, an empty prompt, ids outside the vocabulary, or a prompt that leaves
      no room for ``max_new_tokens`` in the model's context.
  """
  global _on_token
  config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed)
  if batch_size is not None and batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
  prompts = check_prompts(model, prompt_ids, max_new_tokens)
  greedy, k, use_top_p = config.static_key(model.hf_config["vocab_size"])
  static = _Static(bucket(max_new_tokens, NEW_TOKENS_BUCKET_MIN), greedy, k, use_top_p,
                   on_token is not None)
  graphdef, state = nnx.split(folded_copy(model))
  eos = jnp.asarray(sorted(set(int(i) for i in eos_token_ids)) or [-1], jnp.int32)
  runtime = dict(max_new_tokens=jnp.int32(max_new_tokens), key=jax.random.key(seed),
                 temperature=jnp.float32(temperature or 1.0),
                 top_p=jnp.float32(1.0 if top_p is None else top_p), eos=eos,
                 pad=jnp.int32(pad_token_id))
  size = batch_size or len(prompts)
  results: list[list[int]] = []
  for start in range(0, len(prompts), size):
    chunk = prompts[start:start + size]
    length = bucket(max(p.size for p in chunk), PROMPT_BUCKET_MIN)
    ids = np.full((len(chunk), length), pad_token_id, np.int32)
    mask = np.zeros((len(chunk), length), np.int32)
    for row, prompt in enumerate(chunk):
      ids[row, length - prompt.size:] = prompt
      mask[row, length - prompt.size:] = 1
    _on_token = on_token
    try:
      out, steps = _program(graphdef, static, state, jnp.asarray(ids), jnp.asarray(mask),
                            jnp.arange(start, start + len(chunk), dtype=jnp.int32), **runtime)
      out = np.asarray(out)[:, :int(steps)]
    finally:
      _on_token = None
    results += [_trim(row, eos_token_ids) for row in out.tolist()]
  return results


def _trim(tokens: list[int], eos_token_ids: Sequence[int]) -> list[int]:
  """Cut a row after its first EOS id."""
  stops = set(eos_token_ids)
  for i, token in enumerate(tokens):
    if token in stops:
      return tokens[:i + 1]
  return tokens
