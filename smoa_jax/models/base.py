"""The base of every model family: :class:`HFModel` (config, key map, sharding rules) and the
:class:`LayerFactory` that builds HF-initialized layers. What a family reads from its config, and
the checks of it, are in :mod:`smoa_jax.models.config_schema`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping

from flax import nnx
from flax.typing import Dtype

from smoa_jax.models.keymap import KeyMap

__all__ = ["ShardingRule", "compute_dtype", "HFModel", "LayerFactory"]

# (regex over a Variable path, mesh axis or None per array axis); see smoa_jax.parallel.spmd.
ShardingRule = tuple[str, tuple[str | None, ...]]

def compute_dtype(layer: nnx.Module) -> Dtype:
  """The dtype a Flax layer computes in: its ``dtype``, else that of its parameters."""
  if getattr(layer, "dtype", None) is not None:
    return layer.dtype
  return layer.param_dtype


class HFModel(nnx.Module):
  """Base of every model family: keeps the HF config and knows its key map.

  Subclasses set ``architecture`` (the HF class name written to ``config.json``) and
  ``sharding_rules`` (Megatron-style partitioning, :mod:`smoa_jax.parallel.spmd`) and implement
  :meth:`key_map`. ``scan_layers`` is True when the layers are stacked (:func:`stack_layers`).
  ``hf_config`` is a copy of the Hugging Face config dict (stored as JSON so the module stays
  hashable under ``nnx.jit``); ``fresh_params`` the parameter paths the checkpoint lacked (freshly
  initialized, e.g. a new head); ``source_dir`` is the directory the weights came from (set by
  :func:`smoa_jax.from_hf`) so an export can copy its tokenizer files.

  A causal LM that generates (:mod:`smoa_jax.inference`) also has ``init_cache(batch,
  max_length, *, dtype=None)`` and accepts ``cache=`` and ``logits_to_keep=`` keywords in
  ``__call__`` (returning ``(logits, cache)`` with a cache); :mod:`smoa_jax.models.cache` holds
  the cache and its masks, shared by every family.
  """

  architecture: ClassVar[str] = ""
  sharding_rules: ClassVar[tuple[ShardingRule, ...]] = ()
  scan_layers: bool = False

  def _set_hf_config(self, hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Store the config (a dict or a ``transformers`` config object); returns it as a dict."""
    if hasattr(hf_config, "to_dict"):
      hf_config = hf_config.to_dict()
    config = json.loads(json.dumps(dict(hf_config), default=str))
    config["architectures"] = [self.architecture]
    self._hf_config_json = json.dumps(config, sort_keys=True)
    self.source_dir: str | None = None
    self.fresh_params: tuple[str, ...] = ()
    return config

  @property
  def hf_config(self) -> dict[str, Any]:
    """A fresh copy of the Hugging Face config dict (editing it does not change the model)."""
    return json.loads(self._hf_config_json)

  @property
  def context_length(self) -> int | None:
    """Positions the model knows (``max_position_embeddings`` / ``n_positions``), None if unset."""
    config = json.loads(self._hf_config_json)
    return config.get("max_position_embeddings") or config.get("n_positions")

  def key_map(self) -> KeyMap:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """Builds the ``nnx`` layers of one model with shared dtypes and HF-style initialization.

  ``dtype`` is the compute dtype (None: from the inputs and params), ``param_dtype`` the storage
  dtype; weights are ``normal(std)`` like Hugging Face's ``initializer_range``, biases zero and
  norm scales one.
  """

  dtype: Dtype | None
  param_dtype: Dtype
  std: float
  rngs: nnx.Rngs

  def linear(self, in_features: int, out_features: int, use_bias: bool) -> nnx.Linear:
    """``nnx.Linear`` with ``kernel (in, out)``."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, kernel_init=nnx.initializers.normal(self.std),
                      rngs=self.rngs)

  def embed(self, num_embeddings: int, features: int) -> nnx.Embed:
    """``nnx.Embed`` with ``embedding (num, features)``."""
    return nnx.Embed(num_embeddings, features, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nnx.initializers.normal(self.std), rngs=self.rngs)

  def rms_norm(self, features: int, eps: float) -> nnx.RMSNorm:
    return nnx.RMSNorm(features, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       rngs=self.rngs)

  def layer_norm(self, features: int, eps: float) -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         use_fast_variance=False, rngs=self.rngs)
