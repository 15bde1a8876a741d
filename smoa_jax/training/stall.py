"""Catch a learning rate too small to move the adapters, once, right after the warmup.

A learning rate that suits one method can leave another almost still: SMoA's and HiRA's update
``dW = s (a b) * W`` is scaled by ``W``'s entries, so they need a step several times larger than
LoRA's (:func:`smoa_jax.training.config.resolve_learning_rate`). Such a run shows no error, only
a loss that does not move. This check measures how far the adapters have moved the model, as the
median over adapter layers of

    rho = ||dW||_F / ||W||_F

at the first step after the warmup (at least :data:`MIN_CHECK_STEP`), and warns when ``rho`` is
below :data:`STALL_RATIO`. The threshold sits between what working and stalled runs reach. MiniLM
on movie-review sentiment (SMoA K=2 r=8 on query/value, batch 16, 8 warmup steps, then 32 more):

=============  ==================  ======================
learning rate  rho after warmup    validation accuracy
=============  ==================  ======================
3e-2 (default) 6.2e-3              70.7%
1e-3           1.7e-4              46.5% (no learning)
1e-4           1.7e-5              49.2% (no learning)
=============  ==================  ======================

LoRA r=4 on the same task at its default 5e-3 reaches rho = 1.2e-2 (73.8%). rho grows in
proportion to the learning rate, so here the warning fires for SMoA below about 5e-3 and for
LoRA below about 4e-4.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smoa_jax.layers.sites import adapter_layers

__all__ = ["MIN_CHECK_STEP", "STALL_RATIO", "check_step", "update_ratio", "stall_message"]

MIN_CHECK_STEP = 8
STALL_RATIO = 1e-3


def check_step(warmup_steps: int, total_steps: int) -> int | None:
  """The step after which the check runs, or ``None`` when the run ends before it."""
  step = max(warmup_steps, MIN_CHECK_STEP)
  return step if step <= total_steps else None


def update_ratio(model: nnx.Module) -> tuple[float, int] | None:
  """``(median rho, number of adapter layers)`` of ``model``; ``None`` without adapter layers
  (full fine-tuning has no frozen ``W`` to compare against)."""
  # jnp, not numpy: under a mesh the arrays may be sharded over several hosts, and every
  # process runs this same computation (only the replicated scalars come to the host).
  ratios = [jnp.linalg.norm(layer.delta_weight().astype(jnp.float32))
            / jnp.maximum(jnp.linalg.norm(layer.base_kernel().astype(jnp.float32)), 1e-30)
            for _, layer in adapter_layers(model)]
  if not ratios:
    return None
  return float(np.median(jax.device_get(ratios))), len(ratios)


def stall_message(step: int, ratio: float, layers: int, learning_rate: float, source: str,
                  model: nnx.Module) -> str | None:
  """The warning for a stalled run, or ``None`` when ``ratio`` shows the adapters moving."""
  if not math.isfinite(ratio) or ratio >= STALL_RATIO:
    return None
  methods: dict[str, Any] = {type(layer.config).__name__: layer.config
                             for _, layer in adapter_layers(model)}
  defaults = ", ".join(f"{config.method} {config.default_learning_rate:g}"
                       for config in methods.values())
  return (f"after {step} steps the adapters have changed the frozen weights by a median "
          f"{ratio:.1e} of their norm (||dW|| / ||W|| over {layers} layers; runs that learn are "
          f"above {STALL_RATIO:g} by then): the learning rate {learning_rate:g} ({source}) is "
          f"probably too small, so the loss will barely move. The methods' defaults: {defaults}; "
          "pass a larger learning rate (--lr / TrainConfig.learning_rate).")
