"""Flax Linen twins of the NNX layers, drop-ins for ``flax.linen.Dense``.

``smoa_jax.linen.SMoADense`` (and ``LoRADense``, ``HiRADense``, ``refresh_spectral``); the
implementation is :mod:`smoa_jax.layers.linen_dense`.
"""

from smoa_jax.layers.linen_dense import (AdaptedDense, HiRADense, LoRADense, SMoADense,
                                         refresh_spectral)

__all__ = ["AdaptedDense", "SMoADense", "LoRADense", "HiRADense", "refresh_spectral"]
