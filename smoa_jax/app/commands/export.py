"""``smoa-jax export``: a run as a merged Hugging Face directory, or its adapter alone (the
portable format, or the authors' PyTorch layout)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from smoa_jax.app.commands import common
from smoa_jax.app.commands.common import RUN_DEFAULTS
from smoa_jax.errors import CheckpointError
from smoa_jax.io import rundir


def register(add: common.AddCommand) -> None:
  parser = add("export", run, "write a run as a merged Hugging Face directory, or its adapter "
               "alone")
  parser.add_argument("--run", type=common.absolute_path, required=True, metavar="RUN_DIR")
  parser.add_argument("--output", type=common.absolute_path, required=True, metavar="DIR")
  parser.add_argument("--adapter-only", action="store_true",
                      help="write only the adapter instead of a merged model")
  parser.add_argument("--format", choices=("portable", "authors"), default="portable",
                      help="adapter format: smoa-jax's portable one, or the authors' PyTorch "
                      "SMoA layout (implies --adapter-only) (default: portable)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
  common.add_model_flags(parser, "default: the --run's model")


def _check_target(output: Path, overwrite: bool) -> None:
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    if not overwrite:
      raise CheckpointError(f"--output {output} exists and is not empty; pass --overwrite to "
                            "replace it, or choose another directory.")
    if output.is_dir() and not ((output / "config.json").is_file()
                                or (output / "adapter_config.json").is_file()):
      raise CheckpointError(f"--overwrite: {output} is not a model or adapter directory; refusing "
                            "to delete it. Choose another directory.")


def _export(args: argparse.Namespace, output: Path, run_config: dict) -> str:
  """Write the export; returns its kind ("merged", "portable" or "authors")."""
  import smoa_jax
  from smoa_jax.io.files import atomic_directory
  from smoa_jax.io.portable import read_adapter

  adapter_dir = Path(args.run) / rundir.ADAPTER_DIR
  _check_target(output, args.overwrite)
  task = run_config["flags"].get("task", RUN_DEFAULTS["task"])
  num_labels = run_config.get("num_labels")
  if args.format == "authors":
    smoa_jax.save_authors_adapter(common.model_with_adapter(args, run_config, task, num_labels),
                                  output)
    return "authors"
  if args.adapter_only:
    read_adapter(adapter_dir)  # refuse a missing or damaged adapter before copying it
    with atomic_directory(output) as staged:
      shutil.copytree(adapter_dir, staged, dirs_exist_ok=True)
    return "portable"
  smoa_jax.to_hf(common.model_with_adapter(args, run_config, task, num_labels), output)
  return "merged"


def run(args: argparse.Namespace) -> int:
  """Merged Hugging Face directory, or the adapter (portable / authors')."""
  output = Path(args.output)
  run_config = rundir.read_run(args.run)
  with common.locked(output, "export"):  # for the whole export: a second writer is refused
    kind = _export(args, output, run_config)
  print(json.dumps({"output": str(output), "format": kind}))
  return 0
