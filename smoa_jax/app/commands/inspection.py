"""``smoa-jax inspect``: which modules an adapter adapts, its size against LoRA, its spectral
blocks; with ``--run``, the effective rank of every learned dW and how its energy spreads over
W's singular directions."""

from __future__ import annotations

import argparse
import json

from smoa_jax.app.commands import common
from smoa_jax.app.commands.common import RUN_DEFAULTS, positive_int
from smoa_jax.io import rundir
from smoa_jax.io.files import as_path


def register(add: common.AddCommand) -> None:
  parser = add("inspect", run, "show which modules an adapter adapts, its trainable parameters "
               "vs LoRA and its spectral blocks; with --run, the effective rank of every learned "
               "dW and its energy over W's singular directions")
  common.add_model_flags(parser, "default: the --run's model")
  parser.add_argument("--run", type=common.absolute_path, metavar="RUN_DIR",
                      help="analyse this run's learned adapter (its config replaces the flags)")
  common.add_adapter_flags(parser)
  parser.add_argument("--num-labels", type=positive_int,
                      help="inspect a sequence-classification model with this many classes")
  parser.add_argument("--plot", type=common.absolute_path,
                      help=f"with --run: the figure (default: RUN_DIR/{rundir.DELTA_PLOT})")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of "
                      "tables")


def run(args: argparse.Namespace) -> int:
  """Match table, size vs LoRA, spectral blocks, learned dW (with --run)."""
  from flax import nnx

  import smoa_jax
  from smoa_jax.app import analysis

  if args.run:
    run_config = rundir.read_run(args.run)
    model = common.model_with_adapter(args, run_config,
                                      run_config["flags"].get("task", RUN_DEFAULTS["task"]),
                                      run_config.get("num_labels"))
    config = smoa_jax.config_from_dict(run_config["adapter_config"])
  else:
    flags = {k: v if (v := getattr(args, k)) is not None else RUN_DEFAULTS[k]
             for k in ("method", "r", "num_blocks", "alpha", "dropout", "targets", "exclude",
                       "adapter_dtype")}
    config = common.adapter_config(flags)
    task = "classification" if args.num_labels else "causal-lm"
    model = common.model_with_adapter(args, {"flags": {}}, task, args.num_labels)
    smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(0), verbose=False)
  plot = (args.plot or as_path(args.run) / rundir.DELTA_PLOT) if args.run else None
  report = analysis.inspect_model(model, config, plot=plot)
  if args.json:
    print(json.dumps(report.to_dict()))
  else:
    report.print(common.console())
  return 0
