"""The ``smoa-jax`` command: fine-tune, evaluate, export and inspect adapters of HF models.

Sub-commands (``smoa-jax COMMAND --help`` lists every flag)::

  finetune      train an adapter (SMoA, LoRA, HiRA, or full fine-tuning) on a JSONL file
  eval          loss and perplexity (causal LM) or accuracy (classification) on a JSONL file
  export        a run as a merged Hugging Face directory, or its adapter alone
  inspect       what an adapter would adapt, its size vs LoRA, its spectral blocks; with --run,
                the rank and the directions of every learned dW
  demo          SMoA vs LoRA on a real encoder and real sentiment data (the main job)
  fetch-assets  download the real models and data into the cache

``finetune --output RUN_DIR`` fills a run directory::

  adapter/          the portable adapter (save_adapter), rewritten at every checkpoint
  checkpoints/      the orbax training state; ``--resume`` continues from the latest one
  metrics.jsonl     one JSON object a line: step, split ("train" or "eval"), loss, ...
  run_config.json   every resolved flag, the model directory, the data files, library versions
  loss.png          the loss (and accuracy) curves

``eval``, ``export`` and ``inspect --run`` read the run's ``run_config.json`` for whatever they
are not told (model directory, task, sequence length, number of labels).

Bad input (an :class:`~smoa_jax.SMoAError`, a missing or unreadable file, a bad flag) prints ONE
line, ``smoa-jax: error: ...``, to stderr and exits with status 1 (2 for a bad flag); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from smoa_jax import __version__
from smoa_jax.errors import CheckpointError, ConfigError, DataError, SMoAError

__all__ = ["main", "build_parser", "UsageError"]

PROG = "smoa-jax"
METHODS = ("smoa", "lora", "hira", "full")
TASKS = ("causal-lm", "classification")
# The attention query/value projections of every supported family (Llama-like, BERT, GPT-2);
# names a model does not have simply match nothing.
DEFAULT_TARGETS = "q_proj,v_proj,query,value,c_attn"
ASSETS = ("minilm", "smollm2", "sentiment", "shakespeare")  # smoa_jax.assets.fetch_<name>
RUN_CONFIG = "run_config.json"
ADAPTER_DIR = "adapter"
LOSS_PLOT = "loss.png"
DELTA_PLOT = "dw_analysis.png"
# What finetune may leave in a run directory; --overwrite removes these and nothing else.
RUN_ENTRIES = (ADAPTER_DIR, "checkpoints", "metrics.jsonl", RUN_CONFIG, LOSS_PLOT, DELTA_PLOT)
# Flags that may differ when a run is resumed (everything else must match the run).
RESUMABLE = ("steps", "epochs", "eval_data", "eval_every", "save_every", "log_every", "mesh")


class UsageError(SMoAError):
  """A command line that does not parse (unknown flag, missing argument, invalid value)."""


class _Parser(argparse.ArgumentParser):
  """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

  def error(self, message: str):
    raise UsageError(f"{message} (see '{self.prog} --help')")


# -- flags -----------------------------------------------------------------------------------------
# Defaults of the flags that define a run (stored in run_config.json). argparse itself gets None,
# so a value given on the command line can be told apart from a default: ``--resume`` takes
# whatever is not given from the run, and refuses changes to what defines it.
RUN_DEFAULTS: dict[str, Any] = {
    "data": None, "eval_data": None, "task": "causal-lm", "num_labels": None, "method": "smoa",
    "r": 8, "num_blocks": 2, "alpha": 16.0, "dropout": 0.0, "targets": DEFAULT_TARGETS,
    "exclude": None, "steps": None, "epochs": None, "batch_size": 8, "grad_accum": 1,
    "seq_len": 128, "lr": 1e-3, "warmup_steps": 0, "schedule": "cosine", "weight_decay": 0.0,
    "seed": 0, "save_every": 100, "eval_every": None, "log_every": 10, "mesh": None,
    "model": None, "dtype": "float32",
}


def _run_flag(parser: Any, flag: str, help: str, **kwargs: Any) -> None:
  """``parser.add_argument(flag)`` with its default from :data:`RUN_DEFAULTS` shown in the help."""
  default = RUN_DEFAULTS[flag.lstrip("-").replace("-", "_")]
  shown = "" if default is None else f" (default: {default})"
  parser.add_argument(flag, default=None, help=help + shown, **kwargs)


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
  return value


def _path(text: str) -> str:
  return str(Path(text).expanduser().absolute())


def _add_adapter_flags(parser: argparse.ArgumentParser) -> None:
  _run_flag(parser, "--method", "adapter method", choices=METHODS)
  _run_flag(parser, "--r", "total adapter rank (SMoA splits it over the blocks)",
            type=_positive_int)
  _run_flag(parser, "--num-blocks", "SMoA: number K of spectral blocks", type=_positive_int)
  _run_flag(parser, "--alpha", "scale: the update is multiplied by alpha / r", type=float)
  _run_flag(parser, "--dropout", "dropout on the adapter path's input", type=float)
  _run_flag(parser, "--targets",
            "comma-separated module names to adapt (last path components, e.g. "
            "q_proj,k_proj,v_proj,up_proj,down_proj), or 're:REGEX' full-matched against paths")
  _run_flag(parser, "--exclude", "module names (or 're:REGEX') to leave alone")


def _add_model_flags(parser: argparse.ArgumentParser, default: str) -> None:
  parser.add_argument("--model", type=_path,
                      help=f"Hugging Face model directory (config.json, weights, tokenizer); "
                      f"{default}")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="weight and compute dtype (default: the run's, else float32)")


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``smoa-jax`` (every sub-command and flag)."""
  parser = _Parser(prog=PROG, description="SMoA (Spectrum Modulation Adapter) fine-tuning for "
                   "JAX/Flax. Start with 'smoa-jax demo'.")
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
  common = _Parser(add_help=False)
  common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show tracebacks of errors")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

  def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> _Parser:
    sub = commands.add_parser(name, help=help, description=help, parents=[common])
    sub.set_defaults(func=func)
    return sub

  finetune = command("finetune", cmd_finetune, "train an adapter on a JSONL file into RUN_DIR")
  _add_model_flags(finetune, "required unless --resume")
  finetune.add_argument("--output", type=_path, required=True, metavar="RUN_DIR",
                        help="run directory (must be empty or absent unless --resume/--overwrite)")
  state = finetune.add_mutually_exclusive_group()
  state.add_argument("--resume", action="store_true",
                     help="continue the run in RUN_DIR from its latest checkpoint (flags default "
                     "to the run's)")
  state.add_argument("--overwrite", action="store_true",
                     help="replace the run in RUN_DIR")
  _run_flag(finetune, "--data", "training data, JSONL: {\"text\": ...} for causal-lm, "
            "{\"text\": ..., \"label\": 0..n-1} for classification", type=_path)
  _run_flag(finetune, "--eval-data", "evaluation data (JSONL)", type=_path)
  _run_flag(finetune, "--task", "what to train", choices=TASKS)
  _run_flag(finetune, "--num-labels", "classification: number of classes (default: the "
            "largest label + 1)", type=_positive_int)
  _add_adapter_flags(finetune)
  length = finetune.add_mutually_exclusive_group()
  _run_flag(length, "--steps", "optimizer steps", type=_positive_int)
  _run_flag(length, "--epochs", "passes over the data (default 1 when --steps is not "
            "given)", type=float)
  _run_flag(finetune, "--batch-size", "examples per step", type=_positive_int)
  _run_flag(finetune, "--grad-accum", "micro-batches per step (must divide the batch size)",
            type=_positive_int)
  _run_flag(finetune, "--seq-len", "tokens per example; longer texts are truncated",
            type=_positive_int)
  _run_flag(finetune, "--lr", "peak learning rate (AdamW)", type=float)
  _run_flag(finetune, "--warmup-steps", "linear warmup steps", type=int)
  _run_flag(finetune, "--schedule", "learning-rate decay",
            choices=("cosine", "linear", "constant"))
  _run_flag(finetune, "--weight-decay", "AdamW weight decay", type=float)
  _run_flag(finetune, "--seed", "seed of adapter initialization, dropout and data order",
            type=int)
  _run_flag(finetune, "--save-every", "checkpoint (and adapter) every N steps",
            type=_positive_int)
  _run_flag(finetune, "--eval-every", "evaluate every N steps (default: --save-every)",
            type=_positive_int)
  _run_flag(finetune, "--log-every", "log training metrics every N steps", type=_positive_int)
  _run_flag(finetune, "--mesh", "device mesh, e.g. data=2,fsdp=1,tp=1 (default: no mesh)")
  finetune.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  hosts = finetune.add_argument_group("multi-host training (every process runs the same command)")
  hosts.add_argument("--coordinator-address", metavar="HOST:PORT",
                     help="address of process 0 for jax.distributed")
  hosts.add_argument("--num-processes", type=_positive_int, help="number of processes")
  hosts.add_argument("--process-id", type=int, help="this process's index, 0..N-1")

  evaluate = command("eval", cmd_eval, "print the loss and perplexity or accuracy of a model, "
                     "with a run's adapter, on a JSONL file, as one JSON object")
  _add_model_flags(evaluate, "default: the --run's model")
  evaluate.add_argument("--run", type=_path, metavar="RUN_DIR", help="apply this run's adapter")
  evaluate.add_argument("--data", type=_path, required=True, help="JSONL data")
  evaluate.add_argument("--task", choices=TASKS, help="default: the run's, else causal-lm")
  evaluate.add_argument("--seq-len", type=_positive_int, help="default: the run's, else 128")
  evaluate.add_argument("--num-labels", type=_positive_int,
                        help="classification: default: the run's, else the largest label + 1")
  evaluate.add_argument("--batch-size", type=_positive_int, default=16, help="(default: 16)")

  export = command("export", cmd_export, "write a run as a merged Hugging Face directory, or "
                   "its adapter alone")
  export.add_argument("--run", type=_path, required=True, metavar="RUN_DIR")
  export.add_argument("--output", type=_path, required=True, metavar="DIR")
  export.add_argument("--adapter-only", action="store_true",
                      help="write only the adapter instead of a merged model")
  export.add_argument("--format", choices=("portable", "authors"), default="portable",
                      help="adapter format: smoa-jax's portable one, or the authors' PyTorch "
                      "SMoA layout (implies --adapter-only) (default: portable)")
  export.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
  _add_model_flags(export, "default: the --run's model")

  inspect = command("inspect", cmd_inspect, "show which modules an adapter adapts, its trainable "
                    "parameters vs LoRA and its spectral blocks; with --run, the effective rank "
                    "of every learned dW and its energy over W's singular directions")
  _add_model_flags(inspect, "default: the --run's model")
  inspect.add_argument("--run", type=_path, metavar="RUN_DIR",
                       help="analyse this run's learned adapter (its config replaces the flags)")
  _add_adapter_flags(inspect)
  inspect.add_argument("--num-labels", type=_positive_int,
                       help="inspect a sequence-classification model with this many classes")
  inspect.add_argument("--plot", type=_path, help=f"with --run: the figure (default: "
                       f"RUN_DIR/{DELTA_PLOT})")
  inspect.add_argument("--json", action="store_true", help="print one JSON object instead of "
                       "tables")

  demo = command("demo", cmd_demo, "fine-tune SMoA and LoRA at the same trainable-parameter "
                 "budget on real data (MiniLM, movie-review sentiment) and compare them")
  demo.add_argument("--output", type=_path, default="smoa-demo",
                    help="where the plot and results go (default: ./smoa-demo)")
  demo.add_argument("--quick", action="store_true",
                    help="a tiny subset and a few steps (a smoke test, not a result)")

  fetch = command("fetch-assets", cmd_fetch_assets, "download the real models and data sets "
                  "into the cache (once)")
  fetch.add_argument("names", nargs="*", metavar="NAME",
                     help=f"{', '.join(ASSETS)} (default: all)")
  fetch.add_argument("--jsonl", type=_path, metavar="DIR",
                     help="also write the fixed train/validation/test splits of the sentiment and "
                          "Shakespeare data as JSONL files into DIR (for finetune/eval)")
  return parser


# -- shared helpers --------------------------------------------------------------------------------
def _console():
  from rich.console import Console

  return Console()


def _log(message: str) -> None:
  print(f"{PROG}: {message}", file=sys.stderr)


def _one_line(text: str) -> str:
  return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _patterns(text: str | None) -> tuple[str, ...] | str | None:
  """``"q_proj,v_proj"`` -> names; ``"re:.*attn.*"`` -> a regex; None stays None."""
  if text is None:
    return None
  if text.startswith("re:"):
    return text[3:]
  return tuple(name.strip() for name in text.split(",") if name.strip())


def adapter_config(flags: dict[str, Any]):
  """The adapter config of resolved ``flags`` (method, r, num_blocks, alpha, dropout, targets)."""
  import smoa_jax

  common = {"target_modules": _patterns(flags["targets"]),
            "exclude_modules": _patterns(flags["exclude"])}
  method = flags["method"]
  if method == "full":
    return smoa_jax.FullFineTuneConfig(**common)
  common |= {"r": flags["r"], "alpha": flags["alpha"], "dropout": flags["dropout"]}
  if method == "smoa":
    return smoa_jax.SMoAConfig(num_blocks=flags["num_blocks"], **common)
  return {"lora": smoa_jax.LoRAConfig, "hira": smoa_jax.HiRAConfig}[method](**common)


def _read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
  """A run directory's ``run_config.json``, with a clear error when it is not a run."""
  file = Path(run_dir) / RUN_CONFIG
  if not file.is_file():
    raise CheckpointError(f"{run_dir} is not a smoa-jax run directory ({RUN_CONFIG} is missing); "
                          "create one with 'smoa-jax finetune --output RUN_DIR'.")
  try:
    document = json.loads(file.read_text())
  except ValueError as err:
    raise CheckpointError(f"{file} is not valid JSON ({err}).") from err
  if not isinstance(document, dict) or not isinstance(document.get("flags"), dict):
    raise CheckpointError(f"{file} is damaged: it has no \"flags\" object.")
  return document


def _load_tokenizer(model_dir: str):
  """The tokenizer stored with the model (``AutoTokenizer``), with one clear error."""
  import transformers

  if not Path(model_dir).is_dir():
    raise CheckpointError(f"model directory {model_dir} does not exist.")
  try:
    return transformers.AutoTokenizer.from_pretrained(model_dir)
  except (OSError, ValueError, TypeError, KeyError) as err:
    raise CheckpointError(f"cannot load a tokenizer from {model_dir} ({_one_line(err)[:300]}); "
                          "the model directory must hold its tokenizer files (tokenizer.json or "
                          "vocab files, tokenizer_config.json).") from err


def _tokenized(path: str, task: str, tokenizer: Any, seq_len: int, num_labels: int | None,
               what: str):
  """Read, validate and tokenize a JSONL file; report truncated texts on stderr."""
  from smoa_jax import data as data_lib

  records = data_lib.read_jsonl(path, task, num_labels=num_labels)
  tokens = data_lib.tokenize(records, tokenizer, seq_len, add_eos=task == "causal-lm")
  if tokens.num_truncated:
    _log(f"{tokens.num_truncated} of {len(tokens)} {what} texts were truncated to --seq-len "
         f"{seq_len} tokens")
  return records, tokens


def _load_model(model_dir: str, task: str, num_labels: int | None, dtype: str | None,
                seq_len: int | None = None, mesh: Any = None):
  """``from_hf`` with the task's head; refuses a sequence length beyond the model's positions."""
  import jax.numpy as jnp

  import smoa_jax

  model = smoa_jax.from_hf(model_dir, dtype=jnp.dtype(dtype or "float32"),
                           num_labels=num_labels if task == "classification" else None, mesh=mesh)
  config = model.hf_config
  limit = config.get("max_position_embeddings") or config.get("n_positions")
  if seq_len is not None and limit and seq_len > limit:
    raise ConfigError(f"--seq-len {seq_len} exceeds the {limit} positions of {model_dir}; "
                      f"use --seq-len {limit} or less.")
  return model


def _task(name: str):
  import smoa_jax

  return smoa_jax.ClassificationTask() if name == "classification" else smoa_jax.CausalLMTask()


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


def _write_json(path: Path, document: dict[str, Any]) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(document, indent=2) + "\n")
  os.replace(tmp, path)


# -- finetune --------------------------------------------------------------------------------------
def _run_entries(output: Path) -> list[str]:
  if output.exists() and not output.is_dir():
    raise CheckpointError(f"--output {output} is a file; give a directory.")
  return sorted(p.name for p in output.iterdir()) if output.is_dir() else []


def _check_run_dir(output: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
  """Check RUN_DIR against --resume/--overwrite (deleting nothing); the run's config if resuming."""
  entries = _run_entries(output)
  if resume:
    if not entries:
      raise CheckpointError(f"--resume: {output} holds no run to resume; start one without "
                            "--resume.")
    return _read_run(output)
  if entries and not overwrite:
    raise CheckpointError(f"--output {output} is not empty; pass --resume to continue the run in "
                          "it, --overwrite to replace it, or choose another directory.")
  foreign = [name for name in entries if name not in RUN_ENTRIES]
  if foreign:
    raise CheckpointError(f"--overwrite: {output} holds files that are not from a smoa-jax run "
                          f"({', '.join(foreign[:5])}); refusing to delete them. Choose another "
                          "directory.")
  return None


def _clear_run_dir(output: Path) -> None:
  """Remove a previous run's entries (``--overwrite``, after :func:`_check_run_dir` passed)."""
  for name in _run_entries(output):
    path = output / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _resolve_flags(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
  """Command line over the resumed run's flags over the defaults.

  Resuming may change only the :data:`RESUMABLE` flags (how long, how often, where).
  """
  given = {k: v for k in RUN_DEFAULTS if (v := getattr(args, k)) is not None}
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
  flags = {**RUN_DEFAULTS, **old, **given}
  if flags.get("steps") is None and flags.get("epochs") is None:
    flags["epochs"] = 1.0
  for required in ("model", "data"):
    if not flags.get(required):
      raise UsageError(f"finetune needs --{required} (see '{PROG} finetune --help')")
  return flags


def _train_config(flags: dict[str, Any], progress: bool):
  import smoa_jax

  return smoa_jax.TrainConfig(
      steps=flags["steps"], epochs=flags["epochs"], batch_size=flags["batch_size"],
      grad_accum_steps=flags["grad_accum"], learning_rate=flags["lr"],
      warmup_steps=flags["warmup_steps"], schedule=flags["schedule"],
      weight_decay=flags["weight_decay"], seed=flags["seed"], log_every=flags["log_every"],
      eval_every=flags["eval_every"] or flags["save_every"], save_every=flags["save_every"],
      progress=progress)


def _finetune_data(flags: dict[str, Any], saved: dict[str, Any] | None):
  """``(train tokens, eval tokens or None, num_labels, sha256 of the training file)``."""
  from smoa_jax import data as data_lib

  tokenizer = _load_tokenizer(flags["model"])
  task, seq_len = flags["task"], flags["seq_len"]
  records, train = _tokenized(flags["data"], task, tokenizer, seq_len,
                              flags["num_labels"] or (saved or {}).get("num_labels"), "training")
  data_lib.batches_per_epoch(len(train), flags["batch_size"])  # enough data for one batch?
  digest = _sha256(flags["data"])
  if saved and saved.get("data_sha256") not in (None, digest):
    raise DataError(f"--resume: {flags['data']} changed since the run started; resuming would "
                    "train on other data. Restore the file or start a new run.")
  held_out = None
  if flags["eval_data"] is not None:
    _, held_out = _tokenized(flags["eval_data"], task, tokenizer, seq_len, records.num_labels,
                             "evaluation")
  return train, held_out, records.num_labels, digest


def _finetune_model(flags: dict[str, Any], config: Any, num_labels: int | None,
                    adapter_dir: Path, resume: bool, mesh: Any = None):
  """The model with fresh adapters (and a trainable head), or with the run's adapter on resume."""
  from flax import nnx

  import smoa_jax

  model = _load_model(flags["model"], flags["task"], num_labels, flags["dtype"], flags["seq_len"],
                      mesh=mesh)
  rngs = nnx.Rngs(params=flags["seed"], dropout=flags["seed"] + 1)
  if resume:  # the layers, permutations and head come back without spectral recomputation
    smoa_jax.load_adapter(model, adapter_dir, rngs=rngs)
  else:
    smoa_jax.apply_adapter(model, config, rngs=rngs)
    if flags["task"] == "classification":
      smoa_jax.mark_trainable(model, r"classifier/.*")
  return model


def cmd_finetune(args: argparse.Namespace) -> int:
  """``smoa-jax finetune``: see the module docstring for what RUN_DIR receives."""
  from smoa_jax import sharding

  output = Path(args.output)
  saved = _check_run_dir(output, args.resume, args.overwrite)
  flags = _resolve_flags(args, saved)
  config = adapter_config(flags)  # every check that needs no data or model comes first
  train_config = _train_config(flags, progress=not args.no_progress)
  mesh_shape = sharding.parse_mesh(flags["mesh"]) if flags["mesh"] else None
  # Before any JAX work: joins a multi-host job from the flags, the environment or the launcher
  # (Slurm, Open MPI, Cloud TPU); a no-op on a single process.
  sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)

  import jax

  import smoa_jax
  from smoa_jax.analysis import plot_training_curves

  train_tokens, eval_tokens, num_labels, digest = _finetune_data(flags, saved)
  adapter_dir = output / ADAPTER_DIR
  # On a mesh every tensor is loaded straight into its shard; no host holds the whole model.
  mesh = sharding.make_mesh(**mesh_shape) if mesh_shape is not None else None
  model = _finetune_model(flags, config, num_labels, adapter_dir, saved is not None, mesh)
  writer = jax.process_index() == 0
  if writer:
    if args.overwrite:
      _clear_run_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    _write_json(output / RUN_CONFIG, {
        "command": "finetune", "argv": saved["argv"] if saved else args.argv, "flags": flags,
        "num_labels": num_labels, "adapter_config": config.to_dict(), "data_sha256": digest,
        "num_examples": {"train": len(train_tokens),
                         "eval": len(eval_tokens) if eval_tokens is not None else 0},
        "versions": _versions(), "resumed": saved["resumed"] + [args.argv] if saved else []})
  if not saved:  # every process gathers its shards; process 0 writes
    smoa_jax.save_adapter(model, adapter_dir, config=config)

  def on_save(step: int) -> None:
    smoa_jax.save_adapter(model, adapter_dir, config=config)

  result = smoa_jax.train(model, _task(flags["task"]), train_tokens.arrays, train_config,
                          eval_data=eval_tokens.arrays if eval_tokens is not None else None,
                          output_dir=output, resume=saved is not None, on_save=on_save, mesh=mesh)
  if writer:
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if line]
    plot_training_curves({output.name: records}, output / LOSS_PLOT,
                         title=f"{flags['method']} on {Path(flags['data']).name}")
  print(json.dumps({"step": result.step, "train": result.train_metrics,
                    "eval": result.eval_metrics, "run": str(output)}))
  return 0


# -- eval ------------------------------------------------------------------------------------------
def _run_of(args: argparse.Namespace) -> dict[str, Any]:
  """The ``--run`` directory's run config, or an empty one without ``--run``."""
  return _read_run(args.run) if args.run else {"flags": {}}


def _model_dir(args: argparse.Namespace, run: dict[str, Any]) -> str:
  """``--model``, else the run's model directory."""
  model_dir = args.model or run["flags"].get("model")
  if not model_dir:
    raise UsageError(f"{args.command} needs --model or --run (see '{PROG} {args.command} --help')")
  return model_dir


def _model_with_adapter(args: argparse.Namespace, run: dict[str, Any], task: str,
                        num_labels: int | None, seq_len: int | None = None):
  """``--model`` (default: the run's model), with the run's adapter when ``--run`` is given."""
  import smoa_jax

  dtype = args.dtype or run["flags"].get("dtype")
  model = _load_model(_model_dir(args, run), task, num_labels, dtype, seq_len)
  if args.run:
    smoa_jax.load_adapter(model, Path(args.run) / ADAPTER_DIR)
  return model


def cmd_eval(args: argparse.Namespace) -> int:
  """``smoa-jax eval``: one JSON object with loss and perplexity or accuracy on stdout."""
  import smoa_jax

  run = _run_of(args)
  task = args.task or run["flags"].get("task") or RUN_DEFAULTS["task"]
  seq_len = args.seq_len or run["flags"].get("seq_len") or RUN_DEFAULTS["seq_len"]
  records, tokens = _tokenized(args.data, task, _load_tokenizer(_model_dir(args, run)), seq_len,
                               args.num_labels or run.get("num_labels"), "evaluation")
  model = _model_with_adapter(args, run, task, records.num_labels, seq_len)
  metrics = smoa_jax.evaluate(model, _task(task), tokens.arrays, batch_size=args.batch_size)
  print(json.dumps({**metrics, "num_examples": len(tokens)}))
  return 0


# -- export ----------------------------------------------------------------------------------------
def _check_export_target(output: Path, overwrite: bool) -> None:
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    if not overwrite:
      raise CheckpointError(f"--output {output} exists and is not empty; pass --overwrite to "
                            "replace it, or choose another directory.")
    if output.is_dir() and not ((output / "config.json").is_file()
                                or (output / "adapter_config.json").is_file()):
      raise CheckpointError(f"--overwrite: {output} is not a model or adapter directory; refusing "
                            "to delete it. Choose another directory.")


def cmd_export(args: argparse.Namespace) -> int:
  """``smoa-jax export``: merged Hugging Face directory, or the adapter (portable / authors')."""
  import smoa_jax
  from smoa_jax.adapter_io import read_adapter
  from smoa_jax.fileio import atomic_directory

  output = Path(args.output)
  run = _read_run(args.run)
  adapter_dir = Path(args.run) / ADAPTER_DIR
  _check_export_target(output, args.overwrite)
  task, num_labels = run["flags"].get("task", RUN_DEFAULTS["task"]), run.get("num_labels")
  if args.format == "authors":
    smoa_jax.save_authors_adapter(_model_with_adapter(args, run, task, num_labels), output)
    kind = "authors"
  elif args.adapter_only:
    read_adapter(adapter_dir)  # refuse a missing or damaged adapter before copying it
    with atomic_directory(output) as staged:
      shutil.copytree(adapter_dir, staged, dirs_exist_ok=True)
    kind = "portable"
  else:
    smoa_jax.to_hf(_model_with_adapter(args, run, task, num_labels), output)
    kind = "merged"
  print(json.dumps({"output": str(output), "format": kind}))
  return 0


# -- inspect ---------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
  """``smoa-jax inspect``: match table, size vs LoRA, spectral blocks, learned dW (with --run)."""
  from flax import nnx

  import smoa_jax
  from smoa_jax import analysis

  if args.run:
    run = _read_run(args.run)
    model = _model_with_adapter(args, run, run["flags"].get("task", RUN_DEFAULTS["task"]),
                                run.get("num_labels"))
    config = smoa_jax.config_from_dict(run["adapter_config"])
  else:
    flags = {k: v if (v := getattr(args, k)) is not None else RUN_DEFAULTS[k]
             for k in ("method", "r", "num_blocks", "alpha", "dropout", "targets", "exclude")}
    config = adapter_config(flags)
    task = "classification" if args.num_labels else "causal-lm"
    model = _model_with_adapter(args, {"flags": {}}, task, args.num_labels)
    smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(0), verbose=False)
  plot = (args.plot or Path(args.run) / DELTA_PLOT) if args.run else None
  report = analysis.inspect_model(model, config, plot=plot)
  if args.json:
    print(json.dumps(report.to_dict()))
  else:
    report.print(_console())
  return 0


# -- demo and assets -------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
  """``smoa-jax demo``: see :mod:`smoa_jax.demo`."""
  from smoa_jax import demo

  demo.run_demo(Path(args.output), quick=args.quick)
  return 0


def cmd_fetch_assets(args: argparse.Namespace) -> int:
  """``smoa-jax fetch-assets [NAME ...]``: fetch into the cache and print where each one is."""
  from smoa_jax import assets

  unknown = [name for name in args.names if name not in ASSETS]
  if unknown:
    raise UsageError(f"fetch-assets: unknown asset {', '.join(unknown)}; choose from "
                     f"{', '.join(ASSETS)}")
  for name in args.names or ASSETS:
    print(f"{name}: {getattr(assets, f'fetch_{name}')()}")
  if args.jsonl is not None:
    from smoa_jax.datasets import write_jsonl_splits
    for name, path in write_jsonl_splits(args.jsonl).items():
      print(f"{name}: {path}")
  return 0


# -- entry point -----------------------------------------------------------------------------------
def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  del filename, lineno, file, line
  _log(f"warning: {_one_line(message)}" if category is UserWarning
       else f"warning: {category.__name__}: {_one_line(message)}")


def main(argv: Sequence[str] | None = None) -> int:
  """Run ``smoa-jax`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  try:
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command is None:
      raise UsageError(f"choose a command: finetune, eval, export, inspect, demo, fetch-assets "
                       f"(see '{PROG} --help'; start with '{PROG} demo')")
    with warnings.catch_warnings():
      warnings.showwarning = _show_warning
      return args.func(args)
  except SystemExit as exit_:  # --help and --version
    return exit_.code if isinstance(exit_.code, int) else 0
  except KeyboardInterrupt:
    _log("interrupted")
    return 130
  except (SMoAError, OSError) as err:
    if debug:
      traceback.print_exc()
    _log(f"error: {_one_line(err) or type(err).__name__}")
    return 2 if isinstance(err, UsageError) else 1


if __name__ == "__main__":
  sys.exit(main())
