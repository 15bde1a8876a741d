"""What the sub-commands share: the parser type, flag groups, run defaults, and the helpers that
load a model, its tokenizer, its data and a run's adapter with one clear error each."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from smoa_jax.errors import CheckpointError, ConfigError, SMoAError
from smoa_jax.io import formats, rundir
from smoa_jax.io.files import as_path

PROG = "smoa-jax"
METHODS = ("smoa", "lora", "hira", "full")
TASKS = ("causal-lm", "classification")
# The attention query/value projections of every supported family (Llama-like, BERT; fused in
# GPT-2's c_attn and Phi-3's qkv_proj); names a model does not have simply match nothing.
DEFAULT_TARGETS = "q_proj,v_proj,qkv_proj,query,value,c_attn"

# Defaults of the flags that define a run (stored in run_config.json). argparse itself gets None,
# so a value given on the command line can be told apart from a default: ``--resume`` takes
# whatever is not given from the run, and refuses changes to what defines it.
RUN_DEFAULTS: dict[str, Any] = {
    "data": None, "eval_data": None, "task": "causal-lm", "num_labels": None, "method": "smoa",
    "r": 8, "num_blocks": 2, "alpha": 16.0, "dropout": 0.0, "targets": DEFAULT_TARGETS,
    "exclude": None, "steps": None, "epochs": None, "batch_size": 8, "grad_accum": 1,
    "seq_len": 128, "lr": None, "warmup_steps": 0, "schedule": "cosine", "weight_decay": 0.0,
    "seed": 0, "save_every": 100, "eval_every": None, "log_every": 10, "mesh": None,
    "model": None, "dtype": "float32", "train_on_prompt": False, "packing": False,
    "remat": "none", "adapter_dtype": "float32", "scan_layers": False,
}
# What --data takes, for the help texts.
DATA_KINDS = ("JSONL, one kind of record per file: {\"text\": ...} (causal-lm on every token; "
              "classification adds \"label\": 0..n-1), {\"prompt\": ..., \"completion\": ...} "
              "(loss on the completion + EOS), or {\"messages\": [{\"role\": "
              "\"system\"|\"user\"|\"assistant\", \"content\": ...}, ...]} (rendered with the "
              "tokenizer's chat template; loss on the assistant turns)")


class UsageError(SMoAError):
  """A command line that does not parse (unknown flag, missing argument, invalid value)."""


class Parser(argparse.ArgumentParser):
  """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

  def error(self, message: str):
    raise UsageError(f"{message} (see '{self.prog} --help')")


Command = Callable[[argparse.Namespace], int]
# ``add(name, run, help)`` -> the sub-command's parser (see smoa_jax.app.cli.build_parser).
AddCommand = Callable[[str, Command, str], Parser]


# -- flags -----------------------------------------------------------------------------------------
def run_flag(parser: Any, flag: str, help: str, **kwargs: Any) -> None:
  """``parser.add_argument(flag)`` with its default from :data:`RUN_DEFAULTS` shown in the help."""
  default = RUN_DEFAULTS[flag.lstrip("-").replace("-", "_")]
  shown = "" if default is None else f" (default: {default})"
  parser.add_argument(flag, default=None, help=help + shown, **kwargs)


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
  return value


def absolute_path(text: str) -> str:
  """A local path made absolute, or a URI (``gs://bucket/run``) as it is."""
  return str(as_path(text))


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
  run_flag(parser, "--method", "adapter method", choices=METHODS)
  run_flag(parser, "--r", "total adapter rank (SMoA splits it over the blocks)", type=positive_int)
  run_flag(parser, "--num-blocks", "SMoA: number K of spectral blocks", type=positive_int)
  run_flag(parser, "--alpha", "scale: the update is multiplied by alpha / r", type=float)
  run_flag(parser, "--dropout", "dropout on the adapter path's input", type=float)
  run_flag(parser, "--targets",
           "comma-separated module names to adapt (last path components, e.g. "
           "q_proj,k_proj,v_proj,up_proj,down_proj), or 're:REGEX' full-matched against paths")
  run_flag(parser, "--exclude", "module names (or 're:REGEX') to leave alone")
  run_flag(parser, "--adapter-dtype", "dtype of the adapter factors, their update and their "
           "optimizer state (with --dtype bfloat16 the base is bfloat16 and these stay float32 "
           "unless set here)", choices=("float32", "bfloat16"))


def model_source(text: str) -> str:
  """``--model``: a Hub id ``org/name`` stays as it is (no local path of that name exists), a
  directory becomes absolute."""
  from smoa_jax.models import hub

  return text if hub.is_hub_id(text) else absolute_path(text)


def add_model_flags(parser: argparse.ArgumentParser, default: str) -> None:
  parser.add_argument("--model", type=model_source,
                      help=f"Hugging Face model directory (config.json, weights, tokenizer), or "
                      f"a Hub id org/name (fetched into the Hugging Face cache; HF_HUB_OFFLINE=1 "
                      f"uses the cache only); {default}")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="weight and compute dtype (default: the run's, else float32)")


# -- output ----------------------------------------------------------------------------------------
def console():
  from rich.console import Console

  return Console()


def log(message: str) -> None:
  print(f"{PROG}: {message}", file=sys.stderr)


def one_line(text: Any) -> str:
  return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@contextlib.contextmanager
def locked(directory: str | os.PathLike, command: str) -> Iterator[None]:
  """Hold the lock of an output directory (:func:`smoa_jax.io.rundir.lock`) for the block; say so
  when a killed command's stale lock is taken over."""
  with rundir.lock(directory, command) as stale:
    if stale:
      log(f"took over the lock of {directory} left by {stale}, which no longer runs")
    yield


# -- configs, models, data -------------------------------------------------------------------------
def patterns(text: str | None) -> tuple[str, ...] | str | None:
  """``"q_proj,v_proj"`` -> names; ``"re:.*attn.*"`` -> a regex; None stays None."""
  if text is None:
    return None
  if text.startswith("re:"):
    return text[3:]
  return tuple(name.strip() for name in text.split(",") if name.strip())


def adapter_config(flags: dict[str, Any]):
  """The adapter config of resolved ``flags`` (method, r, num_blocks, alpha, dropout, targets,
  adapter dtype)."""
  import smoa_jax

  common = {"target_modules": patterns(flags["targets"]),
            "exclude_modules": patterns(flags["exclude"])}
  method = flags["method"]
  if method == "full":
    return smoa_jax.FullFineTuneConfig(**common)
  common |= {"r": flags["r"], "alpha": flags["alpha"], "dropout": flags["dropout"],
             "adapter_dtype": flags["adapter_dtype"]}
  if method == "smoa":
    return smoa_jax.SMoAConfig(num_blocks=flags["num_blocks"], **common)
  return {"lora": smoa_jax.LoRAConfig, "hira": smoa_jax.HiRAConfig}[method](**common)


def load_tokenizer(model_dir: str):
  """The tokenizer stored with the model (``AutoTokenizer``; a Hub id is fetched first), with
  one clear error."""
  import transformers

  from smoa_jax.models import hub

  model_dir = str(hub.resolve(model_dir))
  if not Path(model_dir).is_dir():
    raise CheckpointError(f"model directory {model_dir} does not exist.")
  try:
    return transformers.AutoTokenizer.from_pretrained(model_dir)
  except (OSError, ValueError, TypeError, KeyError) as err:
    raise CheckpointError(f"cannot load a tokenizer from {model_dir} ({one_line(err)[:300]}); "
                          "the model directory must hold its tokenizer files (tokenizer.json or "
                          "vocab files, tokenizer_config.json).") from err


def tokenized(path: str, task: str, tokenizer: Any, seq_len: int, num_labels: int | None,
              what: str, *, train_on_prompt: bool = False, packing: bool = False):
  """Read, validate and tokenize a JSONL file; report on stderr what was truncated, skipped
  (instruction examples whose answer does not fit) and packed."""
  from smoa_jax.training import data as data_lib

  records = data_lib.read_jsonl(path, task, num_labels=num_labels)
  tokens = data_lib.tokenize(records, tokenizer, seq_len, add_eos=task == "causal-lm",
                             train_on_prompt=train_on_prompt, packing=packing)
  if tokens.num_truncated:
    log(f"{tokens.num_truncated} of {len(records)} {what} texts were truncated to --seq-len "
        f"{seq_len} tokens" if records.kind == "text" else
        f"{tokens.num_truncated} of {len(records)} {what} examples had their prompt cut from "
        f"the left to fit --seq-len {seq_len} tokens")
  if tokens.num_skipped:
    log(f"{tokens.num_skipped} of {len(records)} {what} examples were skipped: their answer "
        f"does not fit in --seq-len {seq_len} tokens")
  if packing:
    fill = tokens.arrays["attention_mask"].mean()
    log(f"{tokens.num_examples} {what} examples packed into {len(tokens)} sequences of "
        f"{seq_len} tokens ({fill:.0%} real tokens)")
  return records, tokens


def data_summary(records: Any, tokens: Any) -> dict[str, Any]:
  """What ``run_config.json`` records of a data file: its kind and what tokenization did."""
  return {"kind": records.kind, "examples": len(records), "skipped": tokens.num_skipped,
          "truncated": tokens.num_truncated, "sequences": len(tokens)}


def load_model(model_dir: str, task: str, num_labels: int | None, dtype: str | None,
               seq_len: int | None = None, mesh: Any = None, warn_fresh: bool = True,
               scan_layers: bool = False):
  """``from_hf`` with the task's head; refuses a sequence length beyond the model's positions."""
  import jax.numpy as jnp

  import smoa_jax

  model = smoa_jax.from_hf(model_dir, dtype=jnp.dtype(dtype or "float32"),
                           num_labels=num_labels if task == "classification" else None, mesh=mesh,
                           warn_fresh=warn_fresh, scan_layers=scan_layers)
  config = model.hf_config
  limit = config.get("max_position_embeddings") or config.get("n_positions")
  if seq_len is not None and limit and seq_len > limit:
    raise ConfigError(f"--seq-len {seq_len} exceeds the {limit} positions of {model_dir}; "
                      f"use --seq-len {limit} or less.")
  return model


def task_of(name: str):
  import smoa_jax

  return smoa_jax.ClassificationTask() if name == "classification" else smoa_jax.CausalLMTask()


def run_of(args: argparse.Namespace) -> dict[str, Any]:
  """The ``--run`` directory's run config, or an empty one without ``--run``."""
  return rundir.read_run(args.run) if args.run else {"flags": {}}


def model_dir(args: argparse.Namespace, run: dict[str, Any]) -> str:
  """``--model``, else the run's model directory."""
  found = args.model or run["flags"].get("model")
  if not found:
    raise UsageError(f"{args.command} needs --model or --run (see '{PROG} {args.command} --help')")
  return found


def named_adapter(text: str) -> tuple[str, str]:
  """``NAME=DIR`` -> ``(NAME, absolute DIR)`` (an ``--adapter`` flag)."""
  from smoa_jax.layers.dense import check_adapter_name

  name, sep, path = text.partition("=")
  if not sep or not path:
    raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=DIR")
  try:
    return check_adapter_name(name), absolute_path(path)
  except ConfigError as err:
    raise argparse.ArgumentTypeError(str(err)) from err


def add_adapter_flag(parser: argparse.ArgumentParser, what: str) -> None:
  """``--adapter NAME=DIR`` (repeatable): more adapters on the same base model."""
  parser.add_argument("--adapter", type=named_adapter, action="append", default=[],
                      metavar="NAME=DIR",
                      help=f"{what} with this adapter too, under NAME, on the same base model "
                      "(repeatable): a run directory, or an adapter directory of smoa-jax's, the "
                      "authors' or PEFT's format (the --run's adapter is 'default')")


def adapter_names(args: argparse.Namespace) -> list[str | None]:
  """The adapters to run with, in order: the ``--run``'s (``default``) and each ``--adapter``'s
  name; ``[None]`` without ``--adapter`` (the model as it is). Checked before anything loads."""
  from smoa_jax.layers.dense import DEFAULT_ADAPTER

  names = ([DEFAULT_ADAPTER] if args.run else []) + [name for name, _ in args.adapter]
  if len(set(names)) != len(names):
    raise UsageError(f"--adapter names must differ (and differ from 'default', the --run's "
                     f"adapter): got {names}")
  return names if args.adapter else [None]


def activate(model: Any, args: argparse.Namespace, name: str | None) -> dict[str, str]:
  """Make adapter ``name`` active (loading every ``--adapter`` on first use: the base weights are
  loaded once, adapters switch by name); returns ``{"adapter": name}`` for the output record, or
  ``{}`` for None."""
  import smoa_jax

  if name is None:
    return {}
  loaded = set(smoa_jax.list_adapters(model))
  for other, path in args.adapter:
    if other not in loaded:
      load_named_adapter(model, path, other)
  smoa_jax.set_adapter(model, name)
  return {"adapter": name}


def load_named_adapter(model: Any, path: str, name: str) -> None:
  """Load the adapter at ``path`` (a run directory, or an adapter directory in smoa-jax's, the
  authors' or PEFT's format, told apart by its ``adapter_config.json``) as adapter ``name``."""
  import smoa_jax

  directory = as_path(path)
  if (directory / rundir.RUN_CONFIG).is_file():
    directory = directory / rundir.ADAPTER_DIR
  loaders = {"portable": smoa_jax.load_adapter, "authors": smoa_jax.load_authors_adapter,
             "peft": smoa_jax.load_peft_adapter}
  loaders[formats.detect_format(formats.read_config(directory))](model, directory, name=name)


def model_with_adapter(args: argparse.Namespace, run: dict[str, Any], task: str,
                       num_labels: int | None, seq_len: int | None = None):
  """``--model`` (default: the run's model), with the run's adapter when ``--run`` is given."""
  import smoa_jax

  dtype = args.dtype or run["flags"].get("dtype")
  model = load_model(model_dir(args, run), task, num_labels, dtype, seq_len,
                     warn_fresh=not args.run)
  if args.run:
    adapter_dir = as_path(args.run) / rundir.ADAPTER_DIR
    smoa_jax.load_adapter(model, adapter_dir)
    # Only what neither the checkpoint nor the run's adapter holds stays untrained.
    loaded = formats.read_config(adapter_dir).get("trainable_arrays") or {}
    untrained = [p for p in model.fresh_params if p not in loaded]
    if untrained:
      warnings.warn(f"{len(untrained)} parameters are in neither {model.source_dir} nor the "
                    f"run's adapter and were freshly initialized (train them before use): "
                    f"{untrained}", stacklevel=2)
  return model
