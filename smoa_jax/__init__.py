"""smoa-jax: the Spectrum Modulation Adapter (SMoA) for JAX / Flax.

The public surface; import from here, not from submodules (they may move)::

    import smoa_jax
    layer = smoa_jax.SMoADense.from_linear(linear, smoa_jax.SMoAConfig(r=8, num_blocks=2, alpha=16),
                                           rngs=nnx.Rngs(0))
"""

from smoa_jax import assets, data, datasets, linen
from smoa_jax.adapter_io import load_adapter, save_adapter
from smoa_jax.authors import load_authors_adapter, save_authors_adapter
from smoa_jax.checkpoint import TrainCheckpointer
from smoa_jax.convert import from_hf, to_hf
from smoa_jax.config import (AdapterConfig, FullFineTuneConfig, HiRAConfig, LoRAConfig, SMoAConfig,
                             config_from_dict)
from smoa_jax.errors import (AdapterMismatchError, CheckpointError, ConfigError, DataError,
                             KernelError, NonFiniteLossError, SMoAError, TargetError)
from smoa_jax.inject import (AdapterReport, adapter_layers, apply_adapter, disable_adapter,
                             mark_trainable, merge_adapters, merge_and_unload, unmerge_adapters)
from smoa_jax.nnx import (AdaptedDense, HiRADense, LoRADense, SMoADense, SMoAParam, SpectralIndex,
                          adapter_class)
from smoa_jax.ops import delta_weight
from smoa_jax.partition import freeze_base, masked_recipe, trainable_labels, trainable_mask
from smoa_jax.sharding import initialize_distributed, is_main_process, make_mesh, parse_mesh
from smoa_jax.spectral import (SpectralBlocks, centroid_scores, identity_blocks, spectral_blocks,
                               spectral_blocks_batched, spectral_orders)
from smoa_jax.spmd import shard_model, sharding_plan
from smoa_jax.training import (CausalLMTask, ClassificationTask, TrainConfig, TrainResult, evaluate,
                            train)

__version__ = "0.1.0"

__all__ = [
    "AdaptedDense", "AdapterConfig", "AdapterMismatchError", "AdapterReport", "CausalLMTask",
    "CheckpointError", "ClassificationTask", "ConfigError", "DataError", "FullFineTuneConfig",
    "HiRAConfig", "HiRADense", "KernelError", "LoRAConfig", "LoRADense", "NonFiniteLossError",
    "SMoAConfig", "SMoADense", "SMoAError", "SMoAParam", "SpectralBlocks", "SpectralIndex",
    "TargetError", "TrainCheckpointer", "TrainConfig", "TrainResult", "adapter_class",
    "adapter_layers", "apply_adapter", "centroid_scores", "config_from_dict", "delta_weight",
    "assets", "data", "datasets", "disable_adapter", "evaluate", "freeze_base", "from_hf", "to_hf", "load_authors_adapter",
    "save_authors_adapter", "identity_blocks", "linen", "load_adapter",
    "initialize_distributed", "is_main_process", "make_mesh", "mark_trainable", "masked_recipe",
    "merge_adapters", "merge_and_unload", "parse_mesh", "save_adapter", "shard_model",
    "sharding_plan", "spectral_blocks", "spectral_blocks_batched", "spectral_orders", "train",
    "trainable_labels", "trainable_mask", "unmerge_adapters",
]
