"""smoa-jax: the Spectrum Modulation Adapter (SMoA) for JAX / Flax.

The public surface; import from here, not from submodules (they may move)::

    import smoa_jax
    layer = smoa_jax.SMoADense.from_linear(linear, smoa_jax.SMoAConfig(r=8, num_blocks=2, alpha=16),
                                           rngs=nnx.Rngs(0))
"""

from smoa_jax import linen
from smoa_jax.config import (AdapterConfig, FullFineTuneConfig, HiRAConfig, LoRAConfig, SMoAConfig,
                             config_from_dict)
from smoa_jax.errors import (AdapterMismatchError, CheckpointError, ConfigError, DataError,
                             KernelError, NonFiniteLossError, SMoAError, TargetError)
from smoa_jax.nnx import (AdaptedDense, HiRADense, LoRADense, SMoADense, SMoAParam, SpectralIndex,
                          adapter_class)
from smoa_jax.ops import delta_weight
from smoa_jax.spectral import (SpectralBlocks, centroid_scores, identity_blocks, spectral_blocks,
                               spectral_blocks_batched, spectral_orders)

__version__ = "0.1.0"

__all__ = [
    "AdaptedDense", "AdapterConfig", "AdapterMismatchError", "CheckpointError", "ConfigError",
    "DataError", "FullFineTuneConfig", "HiRAConfig", "HiRADense", "KernelError", "LoRAConfig",
    "LoRADense", "NonFiniteLossError", "SMoAConfig", "SMoADense", "SMoAError", "SMoAParam",
    "SpectralBlocks", "SpectralIndex", "TargetError", "adapter_class", "centroid_scores",
    "config_from_dict", "delta_weight", "identity_blocks", "linen", "spectral_blocks",
    "spectral_blocks_batched", "spectral_orders",
]
