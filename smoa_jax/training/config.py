"""Hyper-parameters of :func:`smoa_jax.train` and the optimizer they define."""

from __future__ import annotations

import dataclasses
import math

import optax
from flax import nnx

from smoa_jax.errors import ConfigError
from smoa_jax.models.blocks import check_remat
from smoa_jax.training import data as data_lib

__all__ = ["TrainConfig", "make_optimizer", "resolve_learning_rate"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Hyper-parameters of :func:`train` (validated on construction).

  Attributes:
    steps: optimizer steps; or give ``epochs`` (passes over the data, may be fractional).
    batch_size: examples per optimizer step (split into ``grad_accum_steps`` micro-batches).
    learning_rate, warmup_steps, schedule (``"cosine"``, ``"linear"``, ``"constant"``),
    weight_decay, max_grad_norm (``None``: no clipping): the AdamW optimizer. ``learning_rate``
    ``None`` takes the adapter method's ``default_learning_rate`` (:func:`resolve_learning_rate`).
    seed: data order (the model's own rngs drive init and dropout).
    log_every / eval_every / save_every: intervals in steps (``None``: never; a final save and
      eval always happen when an output directory / eval data is given).
    keep_checkpoints: how many orbax checkpoints to keep.
    progress: show a progress bar.
    remat: rematerialisation of the model's layers during the run (:func:`smoa_jax.set_remat`,
      applied per decoder layer, inside the scanned body with ``scan_layers=True``):
      ``"none"`` keeps every activation for the backward pass; ``"full"`` keeps only each
      layer's input and recomputes the layer in the backward pass (about one more forward pass,
      activation memory of one layer plus one ``(B, T, hidden)`` per layer); ``"dots"`` also
      keeps the outputs of the weight matmuls (``jax.checkpoint_policies.
      dots_with_no_batch_dims_saveable``): attention scores, softmax, norms and activations are
      recomputed, no weight matmul is. Losses and gradients equal those of ``"none"``.
  """

  steps: int | None = None
  epochs: float | None = None
  batch_size: int = 8
  grad_accum_steps: int = 1
  learning_rate: float | None = None
  warmup_steps: int = 0
  schedule: str = "cosine"
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int | None = None
  save_every: int | None = None
  keep_checkpoints: int = 3
  progress: bool = True
  remat: str = "none"

  def __post_init__(self):
    def bad(field, expected):
      raise ConfigError(f"TrainConfig.{field}={getattr(self, field)!r} is invalid: expected {expected}.")

    if (self.steps is None) == (self.epochs is None):
      raise ConfigError("TrainConfig needs exactly one of steps or epochs.")
    if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
      bad("steps", "an int >= 1")
    if self.epochs is not None and not self.epochs > 0:
      bad("epochs", "a number > 0")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      bad("batch_size", "an int >= 1")
    if (not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1
        or self.batch_size % self.grad_accum_steps):
      bad("grad_accum_steps", f"an int >= 1 dividing batch_size={self.batch_size}")
    if self.learning_rate is not None and not (
        isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
        and self.learning_rate > 0):
      bad("learning_rate", "None (the method's default) or a finite number > 0")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      bad("warmup_steps", "an int >= 0")
    if self.schedule not in ("cosine", "linear", "constant"):
      bad("schedule", "'cosine', 'linear' or 'constant'")
    if not self.weight_decay >= 0:
      bad("weight_decay", "a number >= 0")
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      bad("max_grad_norm", "None or a number > 0")
    for field in ("log_every", "eval_every", "save_every"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or value < 1):
        bad(field, "None or an int >= 1")
    if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
      bad("keep_checkpoints", "an int >= 1")
    check_remat(self.remat, "TrainConfig.remat")

  def total_steps(self, num_examples: int) -> int:
    if self.steps is not None:
      return self.steps
    per_epoch = data_lib.batches_per_epoch(num_examples, self.batch_size)
    return max(1, math.ceil(self.epochs * per_epoch))


def resolve_learning_rate(config: TrainConfig, model: nnx.Module) -> tuple[float, str]:
  """``(learning rate, where it came from)``: ``config.learning_rate`` if given, else the
  ``default_learning_rate`` of the model's adapter method (SMoA 3e-2, HiRA 2e-2, LoRA 5e-3; full
  fine-tuning 3e-4 when the model has trainable arrays but no adapter layer).

  The defaults differ by method because the updates do: SMoA's and HiRA's ``(a b) * W`` is scaled
  by W's entries, so they need steps about 5x LoRA's (``benchmarks/RESULTS.md``, quality_real).

  Raises:
    ConfigError: ``learning_rate`` is None and the model mixes methods with different defaults.
  """
  from smoa_jax.core.full import FullFineTuneConfig
  from smoa_jax.layers.sites import adapter_layers

  if config.learning_rate is not None:
    return float(config.learning_rate), "given"
  configs = {type(layer.config) for _, layer in adapter_layers(model)} or {FullFineTuneConfig}
  rates = {cls.default_learning_rate for cls in configs}
  if len(rates) > 1:
    raise ConfigError(
        f"TrainConfig.learning_rate is None, but the model's adapters are of methods with "
        f"different default learning rates ({', '.join(sorted(c.method for c in configs))}); "
        "give learning_rate (--lr) explicitly.")
  return rates.pop(), f"the default of {', '.join(sorted(c.method for c in configs))}"


def make_optimizer(config: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                     optax.Schedule]:
  """AdamW with optional clipping under the configured warmup + decay schedule
  (``config.learning_rate`` must be set: see :func:`resolve_learning_rate`)."""
  if config.learning_rate is None:
    raise ConfigError("make_optimizer needs TrainConfig.learning_rate; resolve the method's "
                      "default first (smoa_jax.training.config.resolve_learning_rate).")
  lr, warmup = config.learning_rate, min(config.warmup_steps, total_steps)
  if config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total_steps)
  else:
    decay = (optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))
             if config.schedule == "linear" else optax.constant_schedule(lr))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) \
        if warmup else decay
  parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []
  parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
  return optax.chain(*parts), schedule
