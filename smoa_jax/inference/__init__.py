"""Generation with a KV cache, for every causal LM of smoa-jax (with or without adapters).

* :mod:`~smoa_jax.inference.decode` -- the token-level loop, :func:`generate_ids`: prefill and a
  jitted ``lax.while_loop`` decode, one compiled program per batch size and length bucket;
  adapters folded once per call; stops per row at EOS.
* :mod:`~smoa_jax.inference.sampling` -- :class:`SamplingConfig` (validated knobs) and the choice
  of the next token: greedy, temperature, top-k, top-p, under a seed.
* :mod:`~smoa_jax.inference.text` -- :func:`generate`: text (or chat conversations) in, new text
  out, with the tokenizer's chat template and stop ids.
* :mod:`~smoa_jax.inference.answers` -- :func:`exact_match`: greedy answers to instruction data
  scored against the references after :func:`normalize_answer`.

The models provide the cache (:mod:`smoa_jax.models.cache`); ``smoa-jax generate`` and
``smoa-jax chat`` (:mod:`smoa_jax.app.commands`) are the command-line front ends.
"""

from smoa_jax.inference.answers import ExactMatch, exact_match, normalize_answer
from smoa_jax.inference.decode import generate_ids
from smoa_jax.inference.sampling import SamplingConfig
from smoa_jax.inference.text import generate

__all__ = ["ExactMatch", "SamplingConfig", "exact_match", "generate", "generate_ids",
           "normalize_answer"]
