"""``smoa-jax demo`` (SMoA against LoRA on real data, :mod:`smoa_jax.app.demo`) and
``smoa-jax fetch-assets`` (the real models and data, :mod:`smoa_jax.app.assets`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoa_jax.app.commands import common
from smoa_jax.app.commands.common import UsageError

ASSETS = ("minilm", "smollm2", "sentiment", "shakespeare")  # smoa_jax.assets.fetch_<name>


def register(add: common.AddCommand) -> None:
  demo = add("demo", run_demo, "fine-tune SMoA and LoRA at the same trainable-parameter budget "
             "on real data (MiniLM, movie-review sentiment) and compare them; --llm: a chat "
             "model's answers before and after SMoA instruction tuning")
  demo.add_argument("--output", type=common.absolute_path, default="smoa-demo",
                    help="where the plot and results go (default: ./smoa-demo)")
  demo.add_argument("--quick", action="store_true",
                    help="a tiny subset and a few steps (a smoke test, not a result)")
  demo.add_argument("--llm", action="store_true",
                    help="instead: SmolLM2-135M-Instruct answers \"Is this review positive or "
                    "negative?\" before and after a short SMoA instruction tune (prints the "
                    "answers; a few minutes on 2 CPU cores)")

  fetch = add("fetch-assets", run_fetch_assets, "download the real models and data sets into "
              "the cache (once)")
  fetch.add_argument("names", nargs="*", metavar="NAME", help=f"{', '.join(ASSETS)} (default: all)")
  fetch.add_argument("--jsonl", type=common.absolute_path, metavar="DIR",
                     help="also write the fixed train/validation/test splits of the sentiment and "
                          "Shakespeare data as JSONL files into DIR (for finetune/eval)")


def run_demo(args: argparse.Namespace) -> int:
  if args.llm:
    from smoa_jax.app import llm_demo

    llm_demo.run_llm_demo(quick=args.quick)
    return 0
  from smoa_jax.app import demo

  demo.run_demo(Path(args.output), quick=args.quick)
  return 0


def run_fetch_assets(args: argparse.Namespace) -> int:
  """Fetch into the cache and print where each asset is."""
  from smoa_jax.app import assets

  unknown = [name for name in args.names if name not in ASSETS]
  if unknown:
    raise UsageError(f"fetch-assets: unknown asset {', '.join(unknown)}; choose from "
                     f"{', '.join(ASSETS)}")
  for name in args.names or ASSETS:
    print(f"{name}: {getattr(assets, f'fetch_{name}')()}")
  if args.jsonl is not None:
    from smoa_jax.app.datasets import write_jsonl_splits
    for name, path in write_jsonl_splits(args.jsonl).items():
      print(f"{name}: {path}")
  return 0
