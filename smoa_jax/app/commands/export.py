"""``smoa-jax export``: a run as a merged Hugging Face directory, or its adapter alone (the
portable format, the authors' PyTorch layout, PEFT's LoRA / HiRA, or an SMoA adapter converted to
a PEFT LoRA for serving)."""

from __future__ import annotations

import argparse
import json

from etils import epath

from smoa_jax.app.commands import common
from smoa_jax.app.commands.common import RUN_DEFAULTS, UsageError
from smoa_jax.errors import CheckpointError
from smoa_jax.io import rundir
from smoa_jax.io.files import as_path

FORMATS = ("portable", "authors", "peft", "lora")


def _fraction(text: str) -> float:
  value = float(text)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1]")
  return value


def register(add: common.AddCommand) -> None:
  parser = add("export", run, "write a run as a merged Hugging Face directory, or its adapter "
               "alone")
  parser.add_argument("--run", type=common.absolute_path, required=True, metavar="RUN_DIR")
  parser.add_argument("--output", type=common.absolute_path, required=True, metavar="DIR")
  parser.add_argument("--adapter-only", action="store_true",
                      help="write only the adapter instead of a merged model")
  parser.add_argument("--format", choices=FORMATS, default="portable",
                      help="adapter format (implies --adapter-only unless portable): smoa-jax's "
                      "portable one; the authors' PyTorch SMoA layout; peft (a LoRA or HiRA run "
                      "as a PEFT adapter); lora (an SMoA or HiRA run converted to a truncated-SVD "
                      "LoRA, written as a PEFT adapter; needs --rank or --energy) "
                      "(default: portable)")
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--rank", type=common.positive_int, metavar="N",
                    help="--format lora: the LoRA rank of every layer")
  size.add_argument("--energy", type=_fraction, metavar="F",
                    help="--format lora: per layer, the smallest rank keeping this fraction of "
                    "||dW||^2 (e.g. 0.99)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
  common.add_model_flags(parser, "default: the --run's model")


def _check_target(output: epath.Path, overwrite: bool) -> None:
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    if not overwrite:
      raise CheckpointError(f"--output {output} exists and is not empty; pass --overwrite to "
                            "replace it, or choose another directory.")
    if output.is_dir() and not ((output / "config.json").is_file()
                                or (output / "adapter_config.json").is_file()):
      raise CheckpointError(f"--overwrite: {output} is not a model or adapter directory; refusing "
                            "to delete it. Choose another directory.")


def _export(args: argparse.Namespace, output: epath.Path, run_config: dict) -> tuple[str, dict]:
  """Write the export; returns its kind ("merged", "portable", "authors", "peft" or "lora") and
  what the LoRA conversion measured (empty for the others)."""
  import smoa_jax
  from smoa_jax.io.files import atomic_directory
  from smoa_jax.io.portable import read_adapter

  adapter_dir = as_path(args.run) / rundir.ADAPTER_DIR
  _check_target(output, args.overwrite)
  task = run_config["flags"].get("task", RUN_DEFAULTS["task"])
  num_labels = run_config.get("num_labels")
  if args.format in ("authors", "peft", "lora"):
    model = common.model_with_adapter(args, run_config, task, num_labels)
    extra = {}
    if args.format == "lora":
      report = smoa_jax.to_lora(model, rank=args.rank, energy=args.energy)
      extra = {"layers": len(report.layers), "mean_rank": round(report.mean_rank, 2),
               "mean_relative_error": round(report.mean_error, 6),
               "max_relative_error": round(report.max_error, 6)}
    save = smoa_jax.save_authors_adapter if args.format == "authors" else smoa_jax.save_peft_adapter
    save(model, output)
    return args.format, extra
  if args.adapter_only:
    read_adapter(adapter_dir)  # refuse a missing or damaged adapter before copying it
    with atomic_directory(output) as staged:  # the run's adapter directory holds files only
      for file in adapter_dir.iterdir():
        (staged / file.name).write_bytes(file.read_bytes())
    return "portable", {}
  smoa_jax.to_hf(common.model_with_adapter(args, run_config, task, num_labels), output)
  return "merged", {}


def run(args: argparse.Namespace) -> int:
  """Merged Hugging Face directory, or the adapter (portable / authors' / PEFT / as LoRA)."""
  if (args.format == "lora") != (args.rank is not None or args.energy is not None):
    raise UsageError("--rank / --energy go with --format lora, which needs one of them")
  output = as_path(args.output)
  run_config = rundir.read_run(args.run)
  with common.locked(output, "export"):  # for the whole export: a second writer is refused
    kind, extra = _export(args, output, run_config)
  print(json.dumps({"output": str(output), "format": kind, **extra}))
  return 0
