"""The training loop: a jit-compiled, donated step over the trainable arrays only.

``train(model, task, train_data, config)`` splits the NNX model into

* ``params``   -- ``TrainableParam`` arrays (adapter factors; fully fine-tuned kernels; heads
  marked trainable), the only thing differentiated and updated;
* ``rng``      -- rng streams (adapter dropout);
* the rest     -- frozen weights and spectral permutations, passed to the step, never differentiated.

One step runs ``grad_accum_steps`` micro-batches under ``lax.scan`` and averages gradients by
weight (tokens for causal LM, examples for classification), so it equals the big-batch step.
The optimizer is AdamW (+ global-norm clipping) under a warmup + cosine/linear/constant schedule;
its state exists only for ``params``. Metrics go to ``metrics.jsonl`` (one JSON object per line,
``step``/``split``/``loss``/...), a progress bar shows loss and tokens/s, and orbax checkpoints
make the run resumable exactly. Once, after the warmup, the size of the adapters' update is
measured and a learning rate too small to move them is warned about (:mod:`.stall`). A non-finite
loss stops training with
:class:`~smoa_jax.errors.NonFiniteLossError`; the last checkpoint (taken before it) stays valid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from smoa_jax.errors import ConfigError, NonFiniteLossError
from smoa_jax.io import rundir
from smoa_jax.io.checkpoint import TrainCheckpointer
from smoa_jax.io.files import as_path, is_local
from smoa_jax.layers.variables import SpectralIndex, TrainableParam
from smoa_jax.models.blocks import set_remat
from smoa_jax.parallel import sharding, spmd
from smoa_jax.training import data as data_lib
from smoa_jax.training import stall
from smoa_jax.training.config import TrainConfig, make_optimizer, resolve_learning_rate
from smoa_jax.training.tasks import CausalLMTask, ClassificationTask, Task

__all__ = ["TrainConfig", "Task", "CausalLMTask", "ClassificationTask", "TrainResult", "train",
           "evaluate", "make_optimizer", "lower_train_step"]


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns: final step, last train/eval metrics, and the metrics file.

  ``adapter_update_ratio`` is the median ``||dW|| / ||W||`` over adapter layers measured once
  after the warmup (:mod:`smoa_jax.training.stall`; ``None`` when the run was too short, resumed
  past that step, or has no adapter layer).
  """

  step: int
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float] | None
  metrics_path: epath.Path | None
  history: list[dict[str, Any]]
  adapter_update_ratio: float | None = None


def _split(model: nnx.Module):
  return nnx.split(model, TrainableParam, nnx.RngState, SpectralIndex, ...)


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
  constraints (:func:`smoa_jax.parallel.sharding.constrain_batch`) apply."""
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
  Object storage (``gs://``) cannot append: there the file is written whole at every record.
  """

  def __init__(self, path: epath.Path | None, resume_step: int | None):
    self.path = path
    self.history: list[dict[str, Any]] = []
    self._writes = path is not None and jax.process_index() == 0
    # The file's lines, kept where it is rewritten whole (object storage); None: appended.
    self._lines: list[str] | None = None if path is None or is_local(path) else []
    if not self._writes:
      return
    if resume_step is not None and path.exists():
      kept = [line + "\n" for line in path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      if self._lines is not None:
        self._lines = kept
        path.write_text("".join(kept))
      else:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    elif path.exists():
      path.unlink()

  def write(self, record: dict[str, Any]) -> None:
    self.history.append(record)
    if not self._writes:
      return
    line = json.dumps(record) + "\n"
    if self._lines is None:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))


# -- the state and the step ------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
  """Everything a step reads or writes, and where the data stream stands."""

  params: Any
  opt_state: Any
  rng: Any
  spectral: Any
  rest: Any
  step: int = 0
  epoch: int = 0
  index: int = 0

  def arrays(self) -> tuple:
    """What the eval step takes: ``(params, rng, spectral, rest)``."""
    return self.params, self.rng, self.spectral, self.rest


def _initial_state(model: nnx.Module, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh | None) -> tuple[Any, _State]:
  """``(graphdef, state)`` of a model in train mode; raises if nothing is trainable."""
  graphdef, params, rng, spectral, rest = _split(model)
  if not jax.tree.leaves(params):
    raise ConfigError("the model has no trainable arrays (TrainableParam): call "
                      "smoa_jax.apply_adapter (or mark_trainable) before train().")
  # The step donates params/rng buffers; copies keep the model's own arrays valid meanwhile.
  params, rng = jax.tree.map(jnp.copy, (params, rng))
  opt_state = tx.init(params)
  if mesh is not None:  # moments follow their params; scalars (step counts) are replicated
    opt_state = jax.tree.map(lambda x: x if sharding.mesh_of(x) == mesh else
                             sharding.replicate(x, mesh), opt_state)
  return graphdef, _State(params, opt_state, rng, spectral, rest)


def _restore(state: _State, checkpointer: TrainCheckpointer, seed: int) -> None:
  """Overwrite ``state`` with the latest checkpoint (same seed, or the data order would change)."""
  trees, meta = checkpointer.restore(params=state.params, opt_state=state.opt_state,
                                     rng=state.rng, spectral=state.spectral)
  state.params, state.opt_state, state.rng, state.spectral = (
      trees[k] for k in ("params", "opt_state", "rng", "spectral"))
  state.step, state.epoch, state.index = meta["step"], meta["epoch"], meta["index"]
  if meta.get("seed") != seed:
    raise ConfigError(f"the checkpoint was written with seed {meta.get('seed')}, this run has seed "
                      f"{seed}; resuming would change the data order.")


def _jit_train_step(task: Task, graphdef, tx: optax.GradientTransformation, state: _State,
                    mesh: jax.sharding.Mesh | None):
  """The jitted, donated step ``(params, opt_state, rng, spectral, rest, batch) -> (params,
  opt_state, rng, metric sums, weight)``; batch leaves are ``(accum, micro_batch, ...)``. Trace
  it under ``jax.set_mesh(mesh)`` (:func:`_under_mesh`)."""

  def train_step(params, opt_state, rng, spectral, rest, batch):
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
    kept = jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state, state.rng))
    out_shardings = {"out_shardings": (*kept, replicated, replicated)}
  return jax.jit(train_step, donate_argnums=(0, 1, 2), **out_shardings)


def lower_train_step(model: nnx.Module, task: Task, config: TrainConfig,
                     batch: dict[str, np.ndarray], *,
                     mesh: jax.sharding.Mesh | None = None) -> jax.stages.Lowered:
  """The step :func:`train` runs, lowered for one host ``batch`` (``config.batch_size`` rows),
  not run. ``.compile()`` of the result is XLA's program: ``.as_text()`` its HLO (the
  collectives of one step, ``benchmarks/collectives.py``), ``.memory_analysis()`` its buffers.
  With ``mesh`` the model is laid out on it first, as :func:`train` does.
  """
  learning_rate, _ = resolve_learning_rate(config, model)
  config = dataclasses.replace(config, learning_rate=learning_rate)
  tx, _ = make_optimizer(config, config.total_steps(len(next(iter(batch.values())))))
  if mesh is not None:
    spmd.shard_model(model, mesh)
  model.train()
  graphdef, state = _initial_state(model, tx, mesh)
  step = _jit_train_step(task, graphdef, tx, state, mesh)
  return _under_mesh(step.lower, mesh)(state.params, state.opt_state, state.rng, state.spectral,
                                       state.rest,
                                       _device_batch(batch, config.grad_accum_steps, mesh))


class _Monitor:
  """Loss bookkeeping between logs: pending per-step sums are pulled to the host lazily (so the
  host never waits on the device between steps), checked for NaN/Inf, and averaged per window."""

  def __init__(self, task: Task, last_saved: Callable[[], str]):
    self.task = task
    self.last_saved = last_saved
    self.pending: list[tuple[int, Any, Any, int]] = []  # (step, sums, weight, tokens), unchecked
    self.train_metrics: dict[str, float] = {}
    self._reset()

  def _reset(self) -> None:
    self.sums: dict[str, float] = {}
    self.weight = 0.0
    self.tokens = 0
    self.start = time.perf_counter()

  def add(self, step: int, sums: Any, weight: Any, tokens: int) -> None:
    self.pending.append((step, sums, weight, tokens))

  def flush(self) -> None:
    """Pull pending losses to the host; stop on the first non-finite one."""
    for s, sums, weight, tokens in self.pending:
      sums, weight = jax.device_get((sums, weight))
      if not np.isfinite(float(sums["loss"])):
        raise NonFiniteLossError(
            f"loss became {float(sums['loss']) / max(float(weight), 1e-9)} at step {s}; training "
            f"stopped. Last good checkpoint: {self.last_saved()}. Lower the learning rate or "
            "check the data.")
      for k, v in sums.items():
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
      self.weight += float(weight)
      self.tokens += tokens
    self.pending.clear()

  def window_record(self, step: int, learning_rate: float, epoch: int) -> dict[str, Any]:
    """The train record of the window since the last one (then a new window starts)."""
    self.flush()
    elapsed = time.perf_counter() - self.start
    self.train_metrics = self.task.summarize(self.sums, self.weight)
    record = {"step": step, "split": "train", **self.train_metrics,
              "learning_rate": learning_rate, "epoch": epoch,
              "tokens_per_sec": self.tokens / max(elapsed, 1e-9)}
    self._reset()
    return record


def _due(every: int | None, step: int, last: bool) -> bool:
  return bool(every and step % every == 0) or last


def _device_batch(host_batch: dict[str, np.ndarray], accum: int,
                  mesh: jax.sharding.Mesh | None) -> dict[str, jax.Array]:
  """A host batch as ``(accum, micro_batch, ...)`` device arrays (split over the mesh)."""
  batch = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in host_batch.items()}
  if mesh is not None:
    return sharding.shard_batch(batch, mesh, batch_axis=1)
  return {k: jnp.asarray(v) for k, v in batch.items()}


class _Run:
  """One call of :func:`train`: the set-up, then :meth:`loop` with its log / eval / save steps."""

  def __init__(self, model, task, train_data, config, eval_data, output, resume, on_save, mesh):
    learning_rate, self.learning_rate_source = resolve_learning_rate(config, model)
    config = dataclasses.replace(config, learning_rate=learning_rate)
    self.model, self.task, self.config, self.mesh = model, task, config, mesh
    self.eval_data, self.on_save = eval_data, on_save
    num_examples = len(next(iter(train_data.values())))
    # Every process steps through the same batches: a different copy of the data would mix
    # silently, a different row count would hang at the first uneven step. (One process has
    # nothing to compare, so the data is not hashed.)
    if jax.process_count() > 1:
      sharding.check_same_on_all_processes(
          "training data", data_lib.digest(train_data, eval_data),
          [num_examples, len(next(iter(eval_data.values()))) if eval_data else 0])
    self.total = config.total_steps(num_examples)
    self.per_epoch = data_lib.batches_per_epoch(num_examples, config.batch_size)
    tx, self.schedule = make_optimizer(config, self.total)
    self.checkpointer = (TrainCheckpointer(output / rundir.CHECKPOINT_DIR,
                                           max_to_keep=config.keep_checkpoints)
                         if output is not None else None)
    if resume and (self.checkpointer is None or self.checkpointer.latest_step() is None):
      raise ConfigError(f"resume=True but there is no checkpoint in {output}.")
    if mesh is not None:
      spmd.shard_model(model, mesh)
    model.eval()
    self.eval_step = _under_mesh(_make_eval_step(task, nnx.graphdef(model)), mesh)
    model.train()
    self.graphdef, self.state = _initial_state(model, tx, mesh)
    if resume:
      _restore(self.state, self.checkpointer, config.seed)
    self.stall_check = stall.check_step(config.warmup_steps, self.total)
    self.adapter_update_ratio: float | None = None
    self.log = _MetricsLog(output / rundir.METRICS_NAME if output is not None else None,
                           self.state.step if resume else None)
    if output is not None:
      output.mkdir(parents=True, exist_ok=True)
    self.step_fn = _under_mesh(_jit_train_step(task, self.graphdef, tx, self.state, mesh), mesh)
    self.last_saved = self.checkpointer.latest_step() if self.checkpointer is not None else None
    self.monitor = _Monitor(task, self._last_saved_text)
    self.eval_metrics: dict[str, float] | None = None
    self.stream = data_lib.iterate(train_data, config.batch_size, config.seed,
                                   start_epoch=self.state.epoch, start_index=self.state.index)

  def _last_saved_text(self) -> str:
    if self.last_saved is None:
      return "none"
    return f"step {self.last_saved} in {self.checkpointer.directory}"

  def loop(self) -> TrainResult:
    state, config = self.state, self.config
    bar = tqdm(total=self.total, initial=state.step, desc="train", unit="step",
               disable=not config.progress or not sharding.is_main_process(), file=sys.stderr,
               dynamic_ncols=True)
    try:
      while state.step < self.total:
        epoch, index, host_batch = next(self.stream)
        state.params, state.opt_state, state.rng, sums, weight = self.step_fn(
            state.params, state.opt_state, state.rng, state.spectral, state.rest,
            _device_batch(host_batch, config.grad_accum_steps, self.mesh))
        state.step += 1
        step, last = state.step, state.step == self.total
        self.monitor.add(step, sums, weight, int(host_batch["attention_mask"].sum())
                         if "attention_mask" in host_batch else 0)
        bar.update(1)
        if step == self.stall_check:
          self._check_stall(step)
        if _due(config.log_every, step, last):
          record = self.monitor.window_record(step, float(self.schedule(step - 1)), epoch)
          self.log.write(record)
          bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        if self.eval_data is not None and _due(config.eval_every, step, last):
          self._evaluate(step)
        if self.checkpointer is not None and _due(config.save_every, step, last):
          self._save(step, epoch, index)
      self.monitor.flush()
    finally:
      bar.close()
      if self.checkpointer is not None:
        self.checkpointer.close()
    nnx.update(self.model, state.params, state.rng, state.spectral)
    return TrainResult(state.step, self.monitor.train_metrics, self.eval_metrics, self.log.path,
                       self.log.history, self.adapter_update_ratio)

  def _check_stall(self, step: int) -> None:
    """Warn once, after the warmup, when the adapters have barely moved (:mod:`.stall`)."""
    state = self.state
    view = nnx.merge(self.graphdef, state.params, state.rng, state.spectral, state.rest)
    measured = stall.update_ratio(view)
    if measured is None:
      return
    self.adapter_update_ratio = measured[0]
    message = stall.stall_message(step, *measured, self.config.learning_rate,
                                  self.learning_rate_source, view)
    if message is not None:
      warnings.warn(message, stacklevel=4)

  def _evaluate(self, step: int) -> None:
    self.eval_metrics = _evaluate(self.eval_step, self.task, self.state.arrays(), self.eval_data,
                                  self.config.batch_size, self.mesh)
    self.log.write({"step": step, "split": "eval", **self.eval_metrics})

  def _save(self, step: int, epoch: int, index: int) -> None:
    """Checkpoint the state after ``step`` (batch ``index`` of ``epoch`` was its last)."""
    state = self.state
    self.monitor.flush()  # never checkpoint params produced by a non-finite step
    state.epoch, state.index = (epoch, index + 1) if index + 1 < self.per_epoch else (epoch + 1, 0)
    self.checkpointer.save(step, params=state.params, opt_state=state.opt_state, rng=state.rng,
                           spectral=state.spectral,
                           meta={"step": step, "epoch": state.epoch, "index": state.index,
                                 "seed": self.config.seed})
    self.last_saved = step
    if self.on_save is not None:
      nnx.update(self.model, *jax.tree.map(jnp.copy, (state.params, state.rng)), state.spectral)
      self.on_save(step)


def train(model: nnx.Module, task: Task, train_data: dict[str, np.ndarray], config: TrainConfig,
          *, eval_data: dict[str, np.ndarray] | None = None,
          output_dir: str | os.PathLike | None = None, resume: bool = False,
          on_save: Callable[[int], None] | None = None,
          mesh: jax.sharding.Mesh | None = None) -> TrainResult:
  """Train the ``TrainableParam`` arrays of ``model`` in place; see the module docstring.

  Args:
    model: an NNX model with adapters applied (``apply_adapter``).
    task: :class:`CausalLMTask` or :class:`ClassificationTask` (or your own :class:`Task`).
    train_data / eval_data: dicts of numpy arrays with a common leading dimension, e.g. from
      :func:`smoa_jax.data.tokenize` (``.arrays``); every array goes to the task (instruction
      data's ``loss_mask``, packed data's ``segment_ids`` and ``position_ids``), and tokens/s
      counts the real tokens (``attention_mask``).
    config: :class:`TrainConfig`; its ``remat`` policy is set on the model's layers for the run
      (:func:`smoa_jax.set_remat`) and the model's own setting is restored afterwards.
    output_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (``None``: nothing written;
      the layout is :mod:`smoa_jax.io.rundir`'s); local or on object storage (``gs://...``).
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
  output = as_path(output_dir) if output_dir is not None else None
  before = set_remat(model, config.remat)
  try:
    return _Run(model, task, train_data, config, eval_data, output, resume, on_save, mesh).loop()
  finally:
    set_remat(model, before)
