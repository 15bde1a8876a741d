"""Hyper-parameters of :func:`smoa_jax.train` and the optimizer they define."""

from __future__ import annotations

import dataclasses
import math

import optax

from smoa_jax.errors import ConfigError
from smoa_jax.training import data as data_lib

__all__ = ["TrainConfig", "make_optimizer"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Hyper-parameters of :func:`train` (validated on construction).

  Attributes:
    steps: optimizer steps; or give ``epochs`` (passes over the data, may be fractional).
    batch_size: examples per optimizer step (split into ``grad_accum_steps`` micro-batches).
    learning_rate, warmup_steps, schedule (``"cosine"``, ``"linear"``, ``"constant"``),
    weight_decay, max_grad_norm (``None``: no clipping): the AdamW optimizer.
    seed: data order (the model's own rngs drive init and dropout).
    log_every / eval_every / save_every: intervals in steps (``None``: never; a final save and
      eval always happen when an output directory / eval data is given).
    keep_checkpoints: how many orbax checkpoints to keep.
    progress: show a progress bar.
  """

  steps: int | None = None
  epochs: float | None = None
  batch_size: int = 8
  grad_accum_steps: int = 1
  learning_rate: float = 1e-3
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
    if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
            and self.learning_rate > 0):
      bad("learning_rate", "a finite number > 0")
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

  def total_steps(self, num_examples: int) -> int:
    if self.steps is not None:
      return self.steps
    per_epoch = data_lib.batches_per_epoch(num_examples, self.batch_size)
    return max(1, math.ceil(self.epochs * per_epoch))


def make_optimizer(config: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                     optax.Schedule]:
  """AdamW with optional clipping under the configured warmup + decay schedule."""
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
