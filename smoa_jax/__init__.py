"""smoa-jax: the Spectrum Modulation Adapter (SMoA) for JAX / Flax.

The public surface; import from here (and ``smoa_jax.linen`` for the Linen layers), not from the
subpackages, which may move::

    import smoa_jax
    layer = smoa_jax.SMoADense.from_linear(linear, smoa_jax.SMoAConfig(r=8, num_blocks=2, alpha=16),
                                           rngs=nnx.Rngs(0))

The subpackages show the architecture (``docs/design.md``); data flows one way through them:
``core`` (configs, spectral blocks, pure ops) -> ``layers`` (NNX / Linen shells, injection) ->
``models`` (Hugging Face families and conversion) -> ``io`` (adapter formats, checkpoints) ->
``training`` (loop, tasks, data) -> ``app`` (command line, demo, assets, analysis);
``inference`` (generation with a KV cache) sits beside ``training`` between ``models`` and
``app``; ``parallel`` holds the mesh helpers used throughout.
"""

from smoa_jax import linen
from smoa_jax.app import assets, datasets
from smoa_jax.core.methods import (AdapterConfig, FullFineTuneConfig, HiRAConfig, LoRAConfig,
                                   SMoAConfig, config_from_dict, delta_weight)
from smoa_jax.core.spectral import (SpectralBlocks, centroid_scores, identity_blocks,
                                    spectral_blocks, spectral_blocks_batched, spectral_orders)
from smoa_jax.errors import (AdapterMismatchError, CheckpointError, ConfigError, DataError,
                             KernelError, NonFiniteLossError, SMoAError, TargetError)
from smoa_jax.inference import generate, generate_ids
from smoa_jax.io.authors import load_authors_adapter, save_authors_adapter
from smoa_jax.io.checkpoint import TrainCheckpointer
from smoa_jax.io.peft import load_peft_adapter, save_peft_adapter
from smoa_jax.io.portable import load_adapter, save_adapter
from smoa_jax.layers.convert import LoRAConversion, to_lora
from smoa_jax.layers.dense import AdaptedDense, HiRADense, LoRADense, SMoADense, adapter_class
from smoa_jax.layers.inject import (AdapterReport, active_adapter, adapt_modules, apply_adapter,
                                    delete_adapter, disable_adapter, list_adapters, mark_trainable,
                                    merge_adapters, merge_and_unload, set_adapter,
                                    unmerge_adapters)
from smoa_jax.layers.sites import adapter_layers
from smoa_jax.layers.variables import SMoAParam, SpectralIndex, TrainableParam
from smoa_jax.layers.partition import freeze_base, masked_recipe, trainable_labels, trainable_mask
from smoa_jax.models.blocks import set_remat
from smoa_jax.models.hf import from_hf, to_hf
from smoa_jax.parallel.sharding import (initialize_distributed, is_main_process, make_mesh,
                                        parse_mesh)
from smoa_jax.parallel.spmd import shard_model, sharding_plan
from smoa_jax.training import data
from smoa_jax.training.loop import (CausalLMTask, ClassificationTask, TrainConfig, TrainResult,
                                    evaluate, train)

__version__ = "0.1.0"

__all__ = [
    "AdaptedDense", "AdapterConfig", "AdapterMismatchError", "AdapterReport", "CausalLMTask",
    "CheckpointError", "ClassificationTask", "ConfigError", "DataError", "FullFineTuneConfig",
    "HiRAConfig", "HiRADense", "KernelError", "LoRAConfig", "LoRAConversion", "LoRADense",
    "NonFiniteLossError", "SMoAConfig", "SMoADense", "SMoAError", "SMoAParam", "SpectralBlocks",
    "SpectralIndex", "TargetError", "TrainableParam", "TrainCheckpointer", "TrainConfig",
    "TrainResult", "active_adapter", "adapt_modules", "adapter_class", "adapter_layers",
    "apply_adapter", "assets", "centroid_scores", "config_from_dict", "data", "datasets",
    "delete_adapter", "delta_weight", "disable_adapter", "evaluate", "freeze_base", "from_hf",
    "generate", "generate_ids", "identity_blocks", "initialize_distributed", "is_main_process",
    "linen", "list_adapters", "load_adapter", "load_authors_adapter", "load_peft_adapter",
    "make_mesh", "mark_trainable", "masked_recipe", "merge_adapters", "merge_and_unload",
    "parse_mesh", "save_adapter", "save_authors_adapter", "save_peft_adapter", "set_adapter",
    "set_remat",
    "shard_model", "sharding_plan", "spectral_blocks", "spectral_blocks_batched",
    "spectral_orders", "to_hf", "to_lora", "train", "trainable_labels", "trainable_mask",
    "unmerge_adapters",
]
