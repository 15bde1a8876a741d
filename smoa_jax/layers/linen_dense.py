"""Flax Linen twins of the NNX layers: ``smoa_jax.linen.SMoADense`` (+ ``LoRADense``, ``HiRADense``).

Drop-ins for ``flax.linen.Dense``: same ``features`` / ``use_bias`` / ``dtype`` / ``param_dtype``
/ ``precision`` / ``kernel_init`` / ``bias_init`` fields, same ``params`` names ``kernel (in, out)``
and ``bias (out,)``, plus ``lora_a`` / ``lora_b`` in ``params`` and, for SMoA, ``in_perm`` /
``out_perm`` in the ``"spectral"`` collection. The math is :mod:`smoa_jax.core.ops`, shared with NNX.

The spectral permutations are computed from the kernel at ``init``. When you load pretrained
kernels into ``params`` afterwards, call :func:`refresh_spectral` so the permutations describe the
loaded weights, not the random initial ones::

    variables = model.init(key, x)
    variables = {**variables, "params": load_pretrained(variables["params"])}
    variables = smoa_jax.linen.refresh_spectral(variables)

Dropout on the adapter path uses the ``"dropout"`` rng and ``deterministic`` (attribute or call
argument, like ``flax.linen.Dropout``).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from flax.typing import Dtype, Initializer, PrecisionLike

from smoa_jax.core import ops
from smoa_jax.core.config import AdapterConfig, HiRAConfig, LoRAConfig, SMoAConfig, split_sizes
from smoa_jax.errors import ConfigError
from smoa_jax.core.spectral import SpectralBlocks, spectral_orders

__all__ = ["AdaptedDense", "SMoADense", "LoRADense", "HiRADense", "refresh_spectral"]

SPECTRAL = "spectral"


class AdaptedDense(nn.Module):
  """``flax.linen.Dense`` plus a trainable adapter; see the module docstring."""

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

  def _op_and_perms(self, kernel: jax.Array) -> tuple[ops.SMoAOp | ops.LoRAOp, ops.Perms]:
    return ops.make_op(self.config, *kernel.shape), None

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """``y = x @ W + bias + dropout(x) @ dW`` for ``inputs (..., in)`` -> ``(..., features)``."""
    if not isinstance(self.config, self.config_type):
      raise ConfigError(f"{type(self).__name__} needs a {self.config_type.__name__}, got "
                        f"{type(self.config).__name__}.")
    in_features = inputs.shape[-1]
    self.config.check_layer(in_features, self.features, self.name or type(self).__name__)
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    op, perms = self._op_and_perms(kernel)
    init_a, init_b = (lambda key: op.init_factors(key, self.config.param_dtype)[0],
                      lambda key: op.init_factors(key, self.config.param_dtype)[1])
    a = self.param("lora_a", init_a)
    b = self.param("lora_b", init_b)
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

  def _op_and_perms(self, kernel: jax.Array) -> tuple[ops.SMoAOp, ops.Perms]:
    config = self.config
    orders = None

    def order(which: int) -> jax.Array:
      nonlocal orders
      if orders is None:  # computed once, at init, from the freshly initialized kernel
        orders = spectral_orders(kernel, config.spectral_method)
      return orders[which]

    in_perm = self.variable(SPECTRAL, "in_perm", order, 0)
    out_perm = self.variable(SPECTRAL, "out_perm", order, 1)
    n_in, n_out = kernel.shape
    blocks = SpectralBlocks(in_perm.value, out_perm.value, split_sizes(n_in, config.num_blocks),
                            split_sizes(n_out, config.num_blocks))
    return ops.make_op(config, n_in, n_out, blocks), (in_perm.value, out_perm.value)


class HiRADense(AdaptedDense):
  """Linen HiRA baseline: ``dW = (alpha/r)(a @ b) * W`` over the whole kernel."""

  config_type = HiRAConfig


class LoRADense(AdaptedDense):
  """Linen LoRA baseline: ``dW = (alpha/r) a @ b``."""

  config_type = LoRAConfig


def refresh_spectral(variables: dict[str, Any], method: str = "auto") -> dict[str, Any]:
  """Recompute every ``"spectral"`` permutation from the kernel now in ``params``.

  Returns a new variables dict (inputs untouched). Raises :class:`ConfigError` if a spectral entry
  has no matching ``params/.../kernel``.
  """
  if SPECTRAL not in variables:
    return variables
  params = flatten_dict(variables["params"], sep="/")
  spectral = flatten_dict(variables[SPECTRAL], sep="/")
  refreshed: dict[str, jax.Array] = {}
  compute: Callable[[jax.Array], tuple[jax.Array, jax.Array]] = jax.jit(
      lambda w: spectral_orders(w, method))
  for module in sorted({key.rpartition("/")[0] for key in spectral}):
    prefix = f"{module}/" if module else ""
    kernel = params.get(f"{prefix}kernel")
    if kernel is None:
      raise ConfigError(f"spectral entry {module or '<top>'!r} has no params['{prefix}kernel'] to "
                        "refresh from; pass the variables of the whole model.")
    refreshed[f"{prefix}in_perm"], refreshed[f"{prefix}out_perm"] = compute(kernel)
  return {**variables, SPECTRAL: unflatten_dict(refreshed, sep="/")}
