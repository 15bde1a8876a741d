"""``smoa-jax finetune``: train an adapter on a JSONL file into a run directory
(:mod:`smoa_jax.io.rundir` describes what RUN_DIR receives)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from etils import epath

from smoa_jax.app.commands import common
from smoa_jax.app.commands.common import TASKS, UsageError, positive_int, run_flag
from smoa_jax.errors import CheckpointError, ConfigError, DataError
from smoa_jax.io import rundir
from smoa_jax.io.files import as_path
from smoa_jax.models.blocks import REMAT_POLICIES

# Flags that may differ when a run is resumed (everything else must match the run).
RESUMABLE = ("steps", "epochs", "eval_data", "eval_every", "save_every", "log_every", "mesh",
             "remat")


def register(add: common.AddCommand) -> None:
  parser = add("finetune", run, "train an adapter on a JSONL file into RUN_DIR")
  common.add_model_flags(parser, "required unless --resume")
  parser.add_argument("--output", type=common.absolute_path, required=True, metavar="RUN_DIR",
                      help="run directory (must be empty or absent unless --resume/--overwrite)")
  state = parser.add_mutually_exclusive_group()
  state.add_argument("--resume", action="store_true",
                     help="continue the run in RUN_DIR from its latest checkpoint (flags default "
                     "to the run's)")
  state.add_argument("--overwrite", action="store_true", help="replace the run in RUN_DIR")
  _add_data_flags(parser)
  common.add_adapter_flags(parser)
  _add_optimizer_flags(parser)
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  _add_host_flags(parser)


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
  run_flag(parser, "--data", f"training data, {common.DATA_KINDS}", type=common.absolute_path)
  run_flag(parser, "--eval-data", "evaluation data (JSONL, same kinds; prompt/completion and "
           "messages data are scored on the answer tokens only)", type=common.absolute_path)
  run_flag(parser, "--task", "what to train", choices=TASKS)
  run_flag(parser, "--num-labels", "classification: number of classes (default: the largest "
           "label + 1)", type=positive_int)
  run_flag(parser, "--seq-len", "tokens per sequence; longer texts lose their end, prompts their "
           "start, and an example whose answer does not fit is skipped (counted)",
           type=positive_int)
  run_flag(parser, "--train-on-prompt", "prompt/completion and messages data: take the loss on "
           "every token, not only on the answer", action="store_true")
  run_flag(parser, "--packing", "causal-lm: pack several examples into each sequence of "
           "--seq-len tokens (attention and positions stay per example; --batch-size then "
           "counts sequences)", action="store_true")


def _add_optimizer_flags(parser: argparse.ArgumentParser) -> None:
  length = parser.add_mutually_exclusive_group()
  run_flag(length, "--steps", "optimizer steps", type=positive_int)
  run_flag(length, "--epochs", "passes over the data (default 1 when --steps is not given)",
           type=float)
  run_flag(parser, "--batch-size", "examples per step", type=positive_int)
  run_flag(parser, "--grad-accum", "micro-batches per step (must divide the batch size)",
           type=positive_int)
  run_flag(parser, "--remat", "rematerialise each decoder layer in the backward pass: 'full' "
           "keeps only the layer inputs (least memory, about one more forward pass), 'dots' also "
           "keeps the weight-matmul outputs (less recompute); same losses either way",
           choices=tuple(REMAT_POLICIES))
  run_flag(parser, "--scan-layers", "stack the decoder layers and run them under nnx.scan, so the "
           "layer body compiles once instead of once per layer (deep models); the adapter is "
           "saved layer by layer either way, the checkpoints are not (a resumed run keeps it)",
           action="store_true")
  run_flag(parser, "--lr", "peak learning rate (AdamW); default: the method's (SMoA 0.03, HiRA "
           "0.02, LoRA 0.005, full 0.0003; chosen on validation data, see benchmarks/RESULTS.md)",
           type=float)
  run_flag(parser, "--warmup-steps", "linear warmup steps", type=int)
  run_flag(parser, "--schedule", "learning-rate decay", choices=("cosine", "linear", "constant"))
  run_flag(parser, "--weight-decay", "AdamW weight decay", type=float)
  run_flag(parser, "--seed", "seed of adapter initialization, dropout and data order", type=int)
  run_flag(parser, "--save-every", "checkpoint (and adapter) every N steps", type=positive_int)
  run_flag(parser, "--eval-every", "evaluate every N steps (default: --save-every)",
           type=positive_int)
  run_flag(parser, "--log-every", "log training metrics every N steps", type=positive_int)


def _add_host_flags(parser: argparse.ArgumentParser) -> None:
  run_flag(parser, "--mesh", "device mesh, e.g. data=2,fsdp=1,tp=1 (default: no mesh)")
  hosts = parser.add_argument_group("multi-host training (every process runs the same command)")
  hosts.add_argument("--coordinator-address", metavar="HOST:PORT",
                     help="address of process 0 for jax.distributed")
  hosts.add_argument("--num-processes", type=positive_int, help="number of processes")
  hosts.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
  hosts.add_argument("--distributed", choices=("auto",),
                     help="'auto': start the multi-process runtime and let JAX find the "
                     "coordinator, the process count and this process's index (Cloud TPU VM "
                     "pod slices read them from the TPU metadata server; also Slurm, Open MPI)")


# -- the run ---------------------------------------------------------------------------------------
def resolve_flags(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
  """Command line over the resumed run's flags over the defaults.

  Resuming may change only the :data:`RESUMABLE` flags (how long, how often, where).
  """
  given = {k: v for k in common.RUN_DEFAULTS if (v := getattr(args, k)) is not None}
  old = dict(saved["flags"]) if saved else {}
  changed = [f"--{k.replace('_', '-')} {given[k]} (the run has {old.get(k)})"
             for k in given if k in old and old[k] != given[k] and k not in RESUMABLE]
  if changed:
    raise ConfigError(f"--resume cannot change {', '.join(changed)}; omit these flags to continue "
                      "the run as it was, or start a new run.")
  if "steps" in given:
    old.pop("epochs", None)
  if "epochs" in given:
    old.pop("steps", None)
  flags = {**common.RUN_DEFAULTS, **old, **given}
  if flags.get("steps") is None and flags.get("epochs") is None:
    flags["epochs"] = 1.0
  for required in ("model", "data"):
    if not flags.get(required):
      raise UsageError(f"finetune needs --{required} (see '{common.PROG} finetune --help')")
  return flags


def _train_config(flags: dict[str, Any], progress: bool):
  import smoa_jax

  return smoa_jax.TrainConfig(
      steps=flags["steps"], epochs=flags["epochs"], batch_size=flags["batch_size"],
      grad_accum_steps=flags["grad_accum"], learning_rate=flags["lr"],
      warmup_steps=flags["warmup_steps"], schedule=flags["schedule"],
      weight_decay=flags["weight_decay"], seed=flags["seed"], log_every=flags["log_every"],
      eval_every=flags["eval_every"] or flags["save_every"], save_every=flags["save_every"],
      progress=progress, remat=flags["remat"])


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(2**20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in ("smoa-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
               "transformers", "tokenizers"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def _data(flags: dict[str, Any], saved: dict[str, Any] | None):
  """``(train tokens, eval tokens or None, num_labels, sha256 of the training file, what
  tokenization did to each file)``."""
  from smoa_jax.training import data as data_lib

  tokenizer = common.load_tokenizer(flags["model"])
  task, seq_len = flags["task"], flags["seq_len"]
  records, train = common.tokenized(flags["data"], task, tokenizer, seq_len,
                                    flags["num_labels"] or (saved or {}).get("num_labels"),
                                    "training", train_on_prompt=flags["train_on_prompt"],
                                    packing=flags["packing"])
  data_lib.batches_per_epoch(len(train), flags["batch_size"])  # enough data for one batch?
  digest = _sha256(flags["data"])
  if saved and saved.get("data_sha256") not in (None, digest):
    raise DataError(f"--resume: {flags['data']} changed since the run started; resuming would "
                    "train on other data. Restore the file or start a new run.")
  summary = {"train": common.data_summary(records, train)}
  held_out = None
  if flags["eval_data"] is not None:
    eval_records, held_out = common.tokenized(flags["eval_data"], task, tokenizer, seq_len,
                                              records.num_labels, "evaluation")
    summary["eval"] = common.data_summary(eval_records, held_out)
  return train, held_out, records.num_labels, digest, summary


def _model(flags: dict[str, Any], config: Any, num_labels: int | None, adapter_dir: epath.Path,
           resume: bool, mesh: Any = None):
  """The model with fresh adapters (and a trainable head), or with the run's adapter on resume."""
  from flax import nnx

  import smoa_jax

  model = common.load_model(flags["model"], flags["task"], num_labels, flags["dtype"],
                            flags["seq_len"], mesh=mesh, scan_layers=flags["scan_layers"])
  rngs = nnx.Rngs(params=flags["seed"], dropout=flags["seed"] + 1)
  if resume:  # the layers, permutations and head come back without spectral recomputation
    smoa_jax.load_adapter(model, adapter_dir, rngs=rngs)
  else:
    smoa_jax.apply_adapter(model, config, rngs=rngs)
    if flags["task"] == "classification":
      smoa_jax.mark_trainable(model, r"classifier/.*")
  return model


def _write_run_config(args: argparse.Namespace, output: epath.Path, saved: dict[str, Any] | None,
                      flags: dict[str, Any], config: Any, num_labels: int | None, digest: str,
                      summary: dict[str, Any]) -> None:
  rundir.write_json(output / rundir.RUN_CONFIG, {
      "command": "finetune", "argv": saved["argv"] if saved else args.argv, "flags": flags,
      "num_labels": num_labels, "adapter_config": config.to_dict(), "data_sha256": digest,
      "num_examples": {split: s["examples"] - s["skipped"] for split, s in summary.items()},
      "data": summary, "versions": _versions(),
      "resumed": saved["resumed"] + [args.argv] if saved else []})


def run(args: argparse.Namespace) -> int:
  """``smoa-jax finetune``: see :mod:`smoa_jax.io.rundir` for what RUN_DIR receives."""
  from smoa_jax.parallel import sharding

  output = as_path(args.output)
  saved = rundir.check_run_dir(output, resume=args.resume, overwrite=args.overwrite)
  flags = resolve_flags(args, saved)
  config = common.adapter_config(flags)  # every check that needs no data or model comes first
  train_config = _train_config(flags, progress=not args.no_progress)
  mesh_shape = sharding.parse_mesh(flags["mesh"]) if flags["mesh"] else None
  # Before any JAX work: joins a multi-host job from the flags, the environment or the launcher
  # (Slurm, Open MPI, Cloud TPU); a no-op on a single process.
  sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                  auto=args.distributed == "auto")

  import jax

  if jax.process_index() != 0:
    return _train(args, output, saved, flags, config, train_config, mesh_shape)
  # Process 0 writes RUN_DIR: it holds the lock from here to the end, and checks again under it.
  with common.locked(output, "finetune"):
    if rundir.check_run_dir(output, resume=args.resume, overwrite=args.overwrite) != saved:
      raise CheckpointError(f"{output} changed while this command started (another command "
                            "wrote to it); run the command again.")
    return _train(args, output, saved, flags, config, train_config, mesh_shape)


def _train(args: argparse.Namespace, output: epath.Path, saved: dict[str, Any] | None,
           flags: dict[str, Any], config: Any, train_config: Any,
           mesh_shape: dict[str, int] | None) -> int:
  """Load the data and the model, train, and write RUN_DIR."""
  import jax

  import smoa_jax
  from smoa_jax.app.analysis import plot_training_curves
  from smoa_jax.parallel import sharding
  from smoa_jax.training.config import resolve_learning_rate

  train_tokens, eval_tokens, num_labels, digest, summary = _data(flags, saved)
  adapter_dir = output / rundir.ADAPTER_DIR
  # On a mesh every tensor is loaded straight into its shard; no host holds the whole model.
  mesh = sharding.make_mesh(**mesh_shape) if mesh_shape is not None else None
  model = _model(flags, config, num_labels, adapter_dir, saved is not None, mesh)
  writer = jax.process_index() == 0
  learning_rate, source = resolve_learning_rate(train_config, model)
  train_config = dataclasses.replace(train_config, learning_rate=learning_rate)
  if writer:
    common.log(f"learning rate {learning_rate:g} ({source}; --lr sets another)")
    if args.overwrite:
      rundir.clear_run_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    _write_run_config(args, output, saved, flags, config, num_labels, digest, summary)
  if not saved:  # every process gathers its shards; process 0 writes
    smoa_jax.save_adapter(model, adapter_dir, config=config)

  def on_save(step: int) -> None:
    smoa_jax.save_adapter(model, adapter_dir, config=config)

  result = smoa_jax.train(model, common.task_of(flags["task"]), train_tokens.arrays, train_config,
                          eval_data=eval_tokens.arrays if eval_tokens is not None else None,
                          output_dir=output, resume=saved is not None, on_save=on_save, mesh=mesh)
  if writer:  # one plot and one summary line per job, not one per process
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if line]
    plot_training_curves({output.name: records}, output / rundir.LOSS_PLOT,
                         title=f"{flags['method']} on {Path(flags['data']).name}")
    print(json.dumps({"step": result.step, "train": result.train_metrics,
                      "eval": result.eval_metrics, "run": str(output)}))
  return 0
