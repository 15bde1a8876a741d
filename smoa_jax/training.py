"""The training loop: a jit-compiled, donated step over the trainable arrays only.

``train(model, task, train_data, config)`` splits the NNX model into

* ``params``   -- ``SMoAParam`` arrays (adapter factors; fully fine-tuned kernels; heads marked
  trainable), the only thing differentiated and updated;
* ``rng``      -- rng streams (adapter dropout);
* the rest     -- frozen weights and spectral permutations, passed to the step, never differentiated.

One step runs ``grad_accum_steps`` micro-batches under ``lax.scan`` and averages gradients by
weight (tokens for causal LM, examples for classification), so it equals the big-batch step.
The optimizer is AdamW (+ global-norm clipping) under a warmup + cosine/linear/constant schedule;
its state exists only for ``params``. Metrics go to ``metrics.jsonl`` (one JSON object per line,
``step``/``split``/``loss``/...), a progress bar shows loss and tokens/s, and orbax checkpoints
make the run resumable exactly. A non-finite loss stops training with
:class:`~smoa_jax.errors.NonFiniteLossError`; the last checkpoint (taken before it) stays valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from smoa_jax import data as data_lib
from smoa_jax import sharding, spmd
from smoa_jax.checkpoint import TrainCheckpointer
from smoa_jax.errors import ConfigError, NonFiniteLossError
from smoa_jax.nnx import SMoAParam, SpectralIndex

__all__ = ["TrainConfig", "Task", "CausalLMTask", "ClassificationTask", "TrainResult", "train",
           "evaluate", "make_optimizer"]

METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


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


class Task(Protocol):
  """A loss on a batch: returns ``(loss_sum, weight, metric_sums)``; the mean is sum / weight.

  ``metric_names`` lists the keys of ``metric_sums`` (summed over micro-batches and batches).
  """

  name: str
  metric_names: tuple[str, ...]

  def loss(self, model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array,
                                                                          dict[str, jax.Array]]:
    ...

  def summarize(self, sums: dict[str, float], weight: float) -> dict[str, float]:
    ...


class CausalLMTask:
  """Next-token cross-entropy over positions whose target is a real (unpadded) token.

  ``model(input_ids (B, T), attention_mask=(B, T)) -> logits (B, T, V)``; the loss weight is the
  number of predicted tokens.
  """

  name = "causal-lm"
  metric_names = ()

  def loss(self, model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = batch["input_ids"][:, 1:]
    valid = batch["attention_mask"][:, 1:].astype(jnp.float32)
    if "example_weight" in batch:
      valid = valid * batch["example_weight"][:, None]
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), targets)
    return jnp.sum(nll * valid), jnp.sum(valid), {}

  def summarize(self, sums, weight):
    loss = sums["loss"] / max(weight, 1e-9)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0)))}


class ClassificationTask:
  """Cross-entropy of ``model(input_ids, attention_mask=...) -> logits (B, num_labels)``."""

  name = "classification"
  metric_names = ("correct",)

  def loss(self, model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).astype(jnp.float32)
    weight = batch.get("example_weight", jnp.ones(logits.shape[0], jnp.float32))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight), {"correct": jnp.sum(correct * weight)}

  def summarize(self, sums, weight):
    return {"loss": sums["loss"] / max(weight, 1e-9),
            "accuracy": sums.get("correct", 0.0) / max(weight, 1e-9)}


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns: final step, last train/eval metrics, and the metrics file."""

  step: int
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float] | None
  metrics_path: Path | None
  history: list[dict[str, Any]]


def _split(model: nnx.Module):
  return nnx.split(model, SMoAParam, nnx.RngState, SpectralIndex, ...)


def _check_trainable(params) -> None:
  if not jax.tree.leaves(params):
    raise ConfigError("the model has no trainable arrays (SMoAParam): call smoa_jax.apply_adapter "
                      "(or mark_trainable) before train().")


def _make_eval_step(task: Task, graphdef):
  @jax.jit
  def eval_step(params, rng, spectral, rest, batch):
    model = nnx.merge(graphdef, params, rng, spectral, rest)
    loss_sum, weight, metrics = task.loss(model, batch)
    return {"loss": loss_sum, **metrics}, weight
  return eval_step


def evaluate(model: nnx.Module, task: Task, eval_data: dict[str, np.ndarray], *,
             batch_size: int = 16) -> dict[str, float]:
  """Mean loss (and accuracy / perplexity) of ``model`` over all of ``eval_data`` (eval mode)."""
  model.eval()
  try:
    graphdef, params, rng, spectral, rest = _split(model)
    return _evaluate(_make_eval_step(task, graphdef), task, (params, rng, spectral, rest),
                     eval_data, batch_size)
  finally:
    model.train()


def _under_mesh(fn: Callable[..., Any], mesh: jax.sharding.Mesh | None) -> Callable[..., Any]:
  """``fn`` called (hence traced) under ``jax.set_mesh(mesh)``, so the models' activation
  constraints (:func:`smoa_jax.sharding.constrain_batch`) apply."""
  if mesh is None:
    return fn

  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return call


def _place_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh | None,
                 batch_axis: int = 0) -> dict[str, jax.Array]:
  """A host batch on the device(s): split over ``data`` x ``fsdp`` when it divides, else replicated."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, batch)
  rows = next(iter(batch.values())).shape[batch_axis]
  if rows % sharding.axis_size(mesh, sharding.BATCH_AXES):
    return sharding.replicate(batch, mesh)
  return sharding.shard_batch(batch, mesh, batch_axis=batch_axis)


def _evaluate(eval_step, task, state, eval_data, batch_size,
              mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  sums: dict[str, float] = {}
  total = 0.0
  for batch in data_lib.eval_batches(eval_data, batch_size):
    metrics, weight = eval_step(*state, _place_batch(batch, mesh))
    for k, v in jax.device_get(metrics).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    total += float(weight)
  return task.summarize(sums, total)


class _MetricsLog:
  """Append-only JSONL metrics; on resume, lines after the restored step are dropped first.

  Under multi-process JAX only process 0 touches the file (every process keeps the history).
  """

  def __init__(self, path: Path | None, resume_step: int | None):
    self.path = path
    self.history: list[dict[str, Any]] = []
    self._writes = path is not None and jax.process_index() == 0
    if not self._writes:
      return
    if resume_step is not None and path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      os.replace(tmp, path)
    elif path.exists():
      path.unlink()

  def write(self, record: dict[str, Any]) -> None:
    self.history.append(record)
    if self._writes:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(model: nnx.Module, task: Task, train_data: dict[str, np.ndarray], config: TrainConfig,
          *, eval_data: dict[str, np.ndarray] | None = None,
          output_dir: str | os.PathLike | None = None, resume: bool = False,
          on_save: Callable[[int], None] | None = None,
          mesh: jax.sharding.Mesh | None = None) -> TrainResult:
  """Train the ``SMoAParam`` arrays of ``model`` in place; see the module docstring.

  Args:
    model: an NNX model with adapters applied (``apply_adapter``).
    task: :class:`CausalLMTask` or :class:`ClassificationTask` (or your own :class:`Task`).
    train_data / eval_data: dicts of numpy arrays with a common leading dimension, e.g. from
      :func:`smoa_jax.data.tokenize` (``.arrays``).
    config: :class:`TrainConfig`.
    output_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (``None``: nothing written).
    resume: continue from the latest checkpoint in ``output_dir``.
    on_save: called with the step after every checkpoint (e.g. to export the adapter).
    mesh: a ``("data", "fsdp", "tp")`` mesh (:func:`smoa_jax.make_mesh`): the model is laid out
      on it first (:func:`smoa_jax.shard_model`: arrays already placed stay put, the family's
      rules annotate the rest), batches are split over ``data`` x ``fsdp``, activations are
      constrained to that split, and the step keeps every array's sharding. Under multi-process
      JAX every process calls ``train`` with the same data; only process 0 writes the metrics
      file, orbax coordinates the checkpoint.

  Raises:
    NonFiniteLossError: the loss became NaN/Inf; the message names the step and the last good
      checkpoint, which is left intact.
  """
  num_examples = len(next(iter(train_data.values())))
  total = config.total_steps(num_examples)
  per_epoch = data_lib.batches_per_epoch(num_examples, config.batch_size)
  tx, schedule = make_optimizer(config, total)
  output = Path(output_dir) if output_dir is not None else None
  checkpointer = (TrainCheckpointer(output / CHECKPOINT_DIR, max_to_keep=config.keep_checkpoints)
                  if output is not None else None)
  if resume and (checkpointer is None or checkpointer.latest_step() is None):
    raise ConfigError(f"resume=True but there is no checkpoint in {output}.")

  if mesh is not None:
    spmd.shard_model(model, mesh)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  model.train()
  graphdef, params, rng, spectral, rest = _split(model)
  _check_trainable(params)
  # The step donates params/rng buffers; copies keep the model's own arrays valid meanwhile.
  params, rng = jax.tree.map(jnp.copy, (params, rng))
  opt_state = tx.init(params)
  if mesh is not None:  # moments follow their params; scalars (step counts) are replicated
    opt_state = jax.tree.map(lambda x: x if sharding.mesh_of(x) == mesh else
                             sharding.replicate(x, mesh), opt_state)
  step, epoch, index = 0, 0, 0
  if resume:
    trees, meta = checkpointer.restore(params=params, opt_state=opt_state, rng=rng, spectral=spectral)
    params, opt_state, rng, spectral = (trees[k] for k in ("params", "opt_state", "rng", "spectral"))
    step, epoch, index = meta["step"], meta["epoch"], meta["index"]
    if meta.get("seed") != config.seed:
      raise ConfigError(f"the checkpoint was written with seed {meta.get('seed')}, this run has seed "
                        f"{config.seed}; resuming would change the data order.")
  log = _MetricsLog(output / METRICS_NAME if output is not None else None,
                    step if resume else None)
  if output is not None:
    output.mkdir(parents=True, exist_ok=True)

  accum = config.grad_accum_steps

  def train_step(params, opt_state, rng, spectral, rest, batch):
    # batch leaves: (accum, batch_size // accum, ...)
    def micro(carry, micro_batch):
      grads, loss_sum, weight_sum, metric_sums, rng = carry

      def loss_fn(params):
        m = nnx.merge(graphdef, params, rng, spectral, rest, copy=True)
        loss, weight, metrics = task.loss(m, micro_batch)
        return loss, (weight, metrics, nnx.state(m, nnx.RngState))

      (loss, (weight, metrics, rng)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      grads = jax.tree.map(jnp.add, grads, g)
      metric_sums = {k: metric_sums[k] + metrics[k] for k in metric_sums}
      return (grads, loss_sum + loss, weight_sum + weight, metric_sums, rng), None

    zero_metrics = {k: jnp.zeros((), jnp.float32) for k in task.metric_names}
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32), zero_metrics, rng)
    (grads, loss_sum, weight, metric_sums, rng), _ = jax.lax.scan(micro, init, batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1e-9), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, rng, {"loss": loss_sum, **metric_sums}, weight

  out_shardings = {}
  if mesh is not None:  # keep every array where it is: no resharding between steps
    replicated = sharding.named(mesh, ())
    out_shardings = {"out_shardings": (*jax.tree.map(lambda x: x.sharding, (params, opt_state, rng)),
                                       replicated, replicated)}
  step_fn = _under_mesh(jax.jit(train_step, donate_argnums=(0, 1, 2), **out_shardings), mesh)
  eval_step = _under_mesh(_make_eval_step(task, eval_graphdef), mesh)
  bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not config.progress,
             file=sys.stderr, dynamic_ncols=True)
  pending: list[tuple[int, Any, Any, int]] = []  # (step, metric sums, weight, tokens), unchecked
  window = {"sums": {}, "weight": 0.0, "tokens": 0, "start": time.perf_counter()}
  last_saved = checkpointer.latest_step() if checkpointer is not None else None
  train_metrics: dict[str, float] = {}
  eval_metrics: dict[str, float] | None = None

  def flush() -> None:
    """Pull pending losses to the host; stop on the first non-finite one."""
    for s, sums, weight, tokens in pending:
      sums, weight = jax.device_get((sums, weight))
      if not np.isfinite(float(sums["loss"])):
        raise NonFiniteLossError(
            f"loss became {float(sums['loss']) / max(float(weight), 1e-9)} at step {s}; training "
            f"stopped. Last good checkpoint: "
            f"{f'step {last_saved} in {checkpointer.directory}' if last_saved is not None else 'none'}."
            " Lower the learning rate or check the data.")
      for k, v in sums.items():
        window["sums"][k] = window["sums"].get(k, 0.0) + float(v)
      window["weight"] += float(weight)
      window["tokens"] += tokens
    pending.clear()

  def state() -> tuple:
    return params, rng, spectral, rest

  stream = data_lib.iterate(train_data, config.batch_size, config.seed, start_epoch=epoch,
                            start_index=index)
  try:
    while step < total:
      epoch, index, host_batch = next(stream)
      batch = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in host_batch.items()}
      batch = (sharding.shard_batch(batch, mesh, batch_axis=1) if mesh is not None
               else {k: jnp.asarray(v) for k, v in batch.items()})
      params, opt_state, rng, sums, weight = step_fn(params, opt_state, rng, spectral, rest, batch)
      step += 1
      tokens = int(host_batch["attention_mask"].sum()) if "attention_mask" in host_batch else 0
      pending.append((step, sums, weight, tokens))
      bar.update(1)
      last = step == total
      if step % config.log_every == 0 or last:
        flush()
        elapsed = time.perf_counter() - window["start"]
        train_metrics = task.summarize(window["sums"], window["weight"])
        record = {"step": step, "split": "train", **train_metrics,
                  "learning_rate": float(schedule(step - 1)), "epoch": epoch,
                  "tokens_per_sec": window["tokens"] / max(elapsed, 1e-9)}
        log.write(record)
        bar.set_postfix(loss=f"{train_metrics['loss']:.4f}",
                        tok_s=f"{record['tokens_per_sec']:.0f}")
        window = {"sums": {}, "weight": 0.0, "tokens": 0, "start": time.perf_counter()}
      if eval_data is not None and ((config.eval_every and step % config.eval_every == 0) or last):
        eval_metrics = _evaluate(eval_step, task, state(), eval_data, config.batch_size, mesh)
        log.write({"step": step, "split": "eval", **eval_metrics})
      if checkpointer is not None and ((config.save_every and step % config.save_every == 0) or last):
        flush()  # never checkpoint params produced by a non-finite step
        next_epoch, next_index = (epoch, index + 1) if index + 1 < per_epoch else (epoch + 1, 0)
        checkpointer.save(step, params=params, opt_state=opt_state, rng=rng, spectral=spectral,
                          meta={"step": step, "epoch": next_epoch, "index": next_index,
                                "seed": config.seed})
        last_saved = step
        if on_save is not None:
          nnx.update(model, *jax.tree.map(jnp.copy, (params, rng)), spectral)
          on_save(step)
    flush()
  finally:
    bar.close()
    if checkpointer is not None:
      checkpointer.close()
  nnx.update(model, params, rng, spectral)
  return TrainResult(step, train_metrics, eval_metrics, log.path, log.history)
