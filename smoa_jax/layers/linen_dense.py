"""Flax Linen twins of the NNX layers: ``smoa_jax.linen.SMoADense`` (+ ``LoRADense``, ``HiRADense``).

Drop-ins for ``flax.linen.Dense``: same ``features`` / ``use_bias`` / ``dtype`` / ``param_dtype``
/ ``precision`` / ``kernel_init`` / ``bias_init`` fields, same ``params`` names ``kernel (in, out)``
and ``bias (out,)``, plus ``lora_a`` / ``lora_b`` in ``params`` and, for methods in W's spectral
order (SMoA), ``in_perm`` / ``out_perm`` in the ``"spectral"`` collection. The math is the
method's op (:mod:`smoa_jax.core.ops`), shared with NNX.

The spectral permutations are computed from the kernel at ``init``. When you load pretrained
kernels into ``params`` afterwards, call :func:`refresh_spectral` so the permutations describe the
loaded weights, not the random initial ones::

    variables = model.init(key, x)
    variables = {**variables, "params": load_pretrained(variables["params"])}
    variables = smoa_jax.linen.refresh_spectral(model, variables, x)

(Any apply with the ``"spectral"`` collection mutable recomputes them the same way.)

Dropout on the adapter path uses the ``"dropout"`` rng and ``deterministic`` (attribute or call
argument, like ``flax.linen.Dropout``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PrecisionLike

from smoa_jax.core import ops
from smoa_jax.core.config import AdapterConfig, split_sizes
from smoa_jax.core.methods import HiRAConfig, LoRAConfig, SMoAConfig
from smoa_jax.core.spectral import SpectralBlocks, spectral_orders
from smoa_jax.errors import ConfigError

__all__ = ["AdaptedDense", "SMoADense", "LoRADense", "HiRADense", "refresh_spectral"]

SPECTRAL = "spectral"


class AdaptedDense(nn.Module):
  """``flax.linen.Dense`` plus a trainable adapter of any method; see the module docstring."""

  features: int
  config: AdapterConfig
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  deterministic: bool | None = None

  config_type: ClassVar[type[AdapterConfig]] = AdapterConfig

  def _op_and_perms(self, kernel: jax.Array) -> tuple[ops.AdapterOp, ops.Perms]:
    """The config's op; a method in W's spectral order reads (or, at init and whenever the
    ``"spectral"`` collection is mutable, computes) its permutations from the kernel."""
    config = self.config
    n_in, n_out = kernel.shape
    if not config.spectral_order:
      return config.make_op(n_in, n_out), None
    orders = None

    def order(which: int) -> jax.Array:
      nonlocal orders
      if orders is None:  # once, from the current kernel, with the layer's own method
        orders = spectral_orders(kernel, config.spectral_method)
      return orders[which]

    in_perm = self.variable(SPECTRAL, "in_perm", order, 0)
    out_perm = self.variable(SPECTRAL, "out_perm", order, 1)
    if self.is_mutable_collection(SPECTRAL) and not self.is_initializing():
      in_perm.value, out_perm.value = order(0), order(1)
    blocks = SpectralBlocks(in_perm.value, out_perm.value, split_sizes(n_in, config.num_blocks),
                            split_sizes(n_out, config.num_blocks))
    return config.make_op(n_in, n_out, blocks), (in_perm.value, out_perm.value)

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """``y = x @ W + bias + dropout(x) @ dW`` for ``inputs (..., in)`` -> ``(..., features)``."""
    if not isinstance(self.config, self.config_type) or self.config.trains_base_kernel:
      raise ConfigError(f"{type(self).__name__} needs a {self.config_type.__name__} of an adapter "
                        f"method, got {type(self.config).__name__}.")
    in_features = inputs.shape[-1]
    self.config.check_layer(in_features, self.features, self.name or type(self).__name__)
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    op, perms = self._op_and_perms(kernel)
    a = self.param("lora_a", lambda key: op.init_factors(key, self.config.param_dtype)[0])
    b = self.param("lora_b", lambda key: op.init_factors(key, self.config.param_dtype)[1])
    x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    x_adapter = None
    if self.config.dropout > 0 and not nn.merge_param("deterministic", self.deterministic,
                                                      deterministic):
      x_adapter = nn.Dropout(self.config.dropout, deterministic=False, name="dropout")(x)
    y = op.apply(x, x_adapter, kernel, a, b, perms, self.precision)
    if bias is not None:
      y = y + bias
    return y


class SMoADense(AdaptedDense):
  """Linen SMoA layer (see :class:`smoa_jax.SMoADense`); permutations live in ``"spectral"``."""

  config_type = SMoAConfig


class HiRADense(AdaptedDense):
  """Linen HiRA baseline: ``dW = (alpha/r)(a @ b) * W`` over the whole kernel."""

  config_type = HiRAConfig


class LoRADense(AdaptedDense):
  """Linen LoRA baseline: ``dW = (alpha/r) a @ b``."""

  config_type = LoRAConfig


def refresh_spectral(model: nn.Module, variables: dict[str, Any], *args: Any,
                     **kwargs: Any) -> dict[str, Any]:
  """Recompute every ``"spectral"`` permutation of ``model`` from the kernels now in ``params``.

  Runs ``model.apply(variables, *args, **kwargs)`` once (give the usual example inputs) with the
  ``"spectral"`` collection mutable: every spectral layer recomputes its permutations from its
  current kernel with its own ``config.spectral_method``. Returns a new variables dict; the input
  is untouched and ``params`` is the same object.

  Raises:
    ConfigError: ``variables`` lacks a parameter the model needs (pass the whole model's
      variables).
  """
  try:
    _, updated = model.apply(variables, *args, mutable=[SPECTRAL], **kwargs)
  except (flax.errors.ScopeParamNotFoundError, flax.errors.ScopeCollectionNotFound) as err:
    raise ConfigError(f"refresh_spectral: {err.__class__.__name__}: the variables lack a "
                      "parameter the model reads; pass the variables of the whole model (no "
                      "params to refresh from).") from err
  if SPECTRAL not in updated:
    return variables
  return {**variables, SPECTRAL: updated[SPECTRAL]}
