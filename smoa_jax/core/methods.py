"""The adapter methods, one module each (its config and its op); importing this module
registers all of them for :func:`config_from_dict`.

To add a method, write its module (a config subclassing :class:`AdapterConfig` with a new
``method`` name and ``make_op``, and an op implementing :class:`smoa_jax.core.ops.AdapterOp`)
and import it here.
"""

from smoa_jax.core.config import AdapterConfig, config_from_dict
from smoa_jax.core.full import FullFineTuneConfig, FullOp
from smoa_jax.core.hira import HiRAConfig
from smoa_jax.core.lora import LoRAConfig, LoRAOp
from smoa_jax.core.smoa import SMoAConfig, SMoAOp, delta_weight

__all__ = ["AdapterConfig", "FullFineTuneConfig", "FullOp", "HiRAConfig", "LoRAConfig", "LoRAOp",
           "SMoAConfig", "SMoAOp", "config_from_dict", "delta_weight"]
