"""Benchmark: mixed precision on Shakespeare, a bfloat16 base against a float32 base.

Both runs fine-tune SmolLM2-135M-Instruct (``scan_layers=True``) with SMoA K=2 r=8 on ``q_proj,
k_proj, v_proj, up_proj, down_proj`` through :func:`smoa_jax.train`, on the Shakespeare passages
of ``benchmarks/quality_real.py`` (same split, tokenizer and loss). The only difference is
``smoa_jax.from_hf(dtype=...)``: with ``bfloat16`` the frozen base is stored and run in bfloat16,
while the adapter factors, their update, the AdamW state, the logits, softmax and loss stay
float32 (docs/design.md, mixed precision). Each seed (adapter initialisation and data order) is
run in both dtypes, so the bfloat16 - float32 gap of a seed is measured against the same
draws; the float32 seed-to-seed spread next to it says how large a gap seed noise alone makes.
The spectral blocks are computed once (from the float32 kernels) and shared by every run.

Reported: the training loss of every step (the plot averages it over a window), the mean loss of
the last ``--tail`` steps, the validation loss after training, and the resident memory of each
run: the model's arrays (frozen base + adapter factors + spectral permutations) plus the AdamW
state (``jax.eval_shape`` of the optimizer of :func:`smoa_jax.train`), counted from their
shapes and dtypes.

Run from the repository root: ``python -m benchmarks.mixed_precision`` (``--quick``: a tiny
random Llama, 3 steps, one seed; a smoke test that never writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import smoa_jax
from benchmarks import _budgets, _common, _models, quality_real
from smoa_jax.training.config import make_optimizer

SECTION = "mixed_precision"
MODULE = "benchmarks.mixed_precision"
DTYPES = ("float32", "bfloat16")
PLOT = Path(__file__).resolve().parent / "plots" / "mixed_precision.png"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: per-step training losses, validation loss after, resident bytes."""

  dtype: str
  seed: int
  losses: list[float]
  validation: float
  resident: int
  seconds: float


def resident_bytes(model: nnx.Module, lr: float) -> int:
  """Bytes of the model's arrays plus the AdamW state :func:`smoa_jax.train` keeps for it."""
  tx, _ = make_optimizer(smoa_jax.TrainConfig(steps=1, learning_rate=lr), 1)
  opt_state = jax.eval_shape(tx.init, nnx.state(model, smoa_jax.TrainableParam))
  return _common.tree_nbytes(nnx.state(model)) + _common.tree_nbytes(opt_state)


def train_run(ctx: quality_real.Context, dtype: str, seed: int, args: argparse.Namespace) -> Run:
  """Fine-tune a fresh model with its base in ``dtype``; ``ctx.blocks`` is filled by the first."""
  model = smoa_jax.from_hf(ctx.model_dir, dtype=jnp.dtype(dtype), scan_layers=True)
  smoa_jax.apply_adapter(model, _budgets.smoa_config(8, 2, _models.LLAMA_TARGETS),
                         rngs=nnx.Rngs(seed), verbose=False, show_progress=False,
                         blocks=ctx.blocks.get(2))
  if 2 not in ctx.blocks:
    ctx.blocks[2] = {path: layer.blocks for path, layer in smoa_jax.adapter_layers(model)}
  config = smoa_jax.TrainConfig(steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                                warmup_steps=args.warmup, seed=seed, log_every=1, progress=False)
  start = time.perf_counter()
  result = smoa_jax.train(model, ctx.task, ctx.data["train"], config)
  seconds = time.perf_counter() - start
  validation = smoa_jax.evaluate(model, ctx.task, ctx.data["validation"],
                                 batch_size=ctx.plan.eval_batch)["loss"]
  losses = [r["loss"] for r in result.history if r.get("split") == "train"]
  return Run(dtype, seed, losses, validation, resident_bytes(model, args.lr), seconds)


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> list[Run]:
  plan = dataclasses.replace(quality_real.SHAKESPEARE, seq_len=args.seq, val_limit=args.val_limit)
  if args.quick:
    plan = dataclasses.replace(quality_real.quick_plan(plan), seq_len=args.seq)
  with tempfile.TemporaryDirectory(prefix="smoa-mixed-precision-") as workdir:
    ctx = quality_real.make_context(plan, args.quick, Path(workdir))
    runs = []
    for seed in args.seeds:
      for dtype in DTYPES:
        runs.append(train_run(ctx, dtype, seed, args))
        log(f"{dtype} seed {seed}: last loss {runs[-1].losses[-1]:.4f}, validation "
            f"{runs[-1].validation:.4f} ({runs[-1].seconds:.0f} s)")
  return runs


def smoothed(losses: Sequence[float], window: int) -> np.ndarray:
  """Trailing mean over ``window`` steps (shorter at the start)."""
  x = np.asarray(losses, np.float64)
  c = np.cumsum(np.insert(x, 0, 0.0))
  lo = np.maximum(np.arange(1, len(x) + 1) - window, 0)
  return (c[1:] - c[lo]) / (np.arange(1, len(x) + 1) - lo)


def plot(runs: list[Run], window: int, path: Path) -> Path:
  """Smoothed training loss by step, one line per run (float32 solid, bfloat16 dashed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.0))
  for i, seed in enumerate(sorted({r.seed for r in runs})):
    for run in (r for r in runs if r.seed == seed):
      ax.plot(np.arange(1, len(run.losses) + 1), smoothed(run.losses, window),
              color=f"C{i}", linestyle="-" if run.dtype == "float32" else "--",
              label=f"{run.dtype} base, seed {seed}")
  ax.set(xlabel="step", ylabel=f"training loss (mean of the last {window} steps)",
         title="SmolLM2-135M + SMoA K=2 r=8 on Shakespeare")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def render(runs: list[Run], args: argparse.Namespace, plot_path: str | None) -> str:
  """The markdown body: per-run table, the bfloat16 - float32 gaps against the seed spread."""
  tail = min(args.tail, args.steps)
  by = {(r.dtype, r.seed): r for r in runs}

  def tail_mean(run: Run) -> float:
    return statistics.fmean(run.losses[-tail:])

  rows = [[r.dtype, r.seed, f"{r.losses[0]:.4f}", f"{tail_mean(r):.4f}", f"{r.validation:.4f}",
           _common.format_mib(r.resident), f"{r.seconds:.0f}"] for r in runs]
  gaps_tail = [tail_mean(by["bfloat16", s]) - tail_mean(by["float32", s]) for s in args.seeds]
  gaps_val = [by["bfloat16", s].validation - by["float32", s].validation for s in args.seeds]
  # The whole curve: mean over steps of |bf16 - f32| (same seed) vs |f32 seed a - f32 seed b|.
  curve = {s: smoothed(by["float32", s].losses, args.window) for s in args.seeds}
  curve_gap = statistics.fmean(
      float(np.mean(np.abs(smoothed(by["bfloat16", s].losses, args.window) - curve[s])))
      for s in args.seeds)
  f32_tail = [tail_mean(by["float32", s]) for s in args.seeds]
  f32_val = [by["float32", s].validation for s in args.seeds]
  seeds = list(args.seeds)
  pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
  curve_spread = (statistics.fmean(float(np.mean(np.abs(curve[a] - curve[b]))) for a, b in pairs)
                  if pairs else float("nan"))
  resident = {d: by[d, seeds[0]].resident for d in DTYPES}
  model = "A tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct"
  parts = [
      (f"{model} with SMoA K=2 r=8 on {', '.join(_models.LLAMA_TARGETS)}, "
       f"Shakespeare passages of `benchmarks/quality_real.py` ({args.steps} steps of "
       f"{args.batch} x {args.seq} tokens, lr {args.lr:g}, warmup {args.warmup}, validation "
       f"{args.val_limit} passages); each seed in both base dtypes (what differs and what is "
       "counted: the docstring of `benchmarks/mixed_precision.py`). `tail loss` = mean training "
       f"loss of the last {tail} steps; `resident` = model arrays + AdamW state (MiB)."),
      _common.markdown_table(["base dtype", "seed", "first loss", "tail loss", "validation loss",
                              "resident", "s"], rows),
      "\n".join([
          (f"- bfloat16 - float32, same seed: tail loss "
           f"{', '.join(f'{g:+.4f}' for g in gaps_tail)}; validation loss "
           f"{', '.join(f'{g:+.4f}' for g in gaps_val)}; smoothed curves (window {args.window}) "
           f"differ by {curve_gap:.4f} on average over the steps."),
          (f"- float32 seed to seed: tail loss range {max(f32_tail) - min(f32_tail):.4f}, "
           f"validation loss range {max(f32_val) - min(f32_val):.4f}; smoothed curves differ by "
           f"{curve_spread:.4f} on average."),
          (f"- Resident memory: bfloat16 {_common.format_mib(resident['bfloat16'])} MiB vs "
           f"float32 {_common.format_mib(resident['float32'])} MiB = "
           f"{resident['bfloat16'] / resident['float32']:.2f}x."),
      ]),
  ]
  if plot_path:
    parts.append(f"![training loss by step]({plot_path})")
  return "\n\n".join(parts)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE, "Fine-tune SmolLM2-135M with SMoA on Shakespeare with a bfloat16 and a float32 "
              "base, same seeds: loss curves and resident memory.")
  parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
  parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
  parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
  parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
  parser.add_argument("--warmup", type=int, default=5, help="warmup steps (default 5)")
  parser.add_argument("--seeds", type=_common.parse_ints, default=(0, 1),
                      help="seeds, comma-separated (default 0,1)")
  parser.add_argument("--val-limit", type=int, default=48,
                      help="validation passages (default 48)")
  parser.add_argument("--tail", type=int, default=20,
                      help="steps averaged for the tail loss (default 20)")
  parser.add_argument("--window", type=int, default=10,
                      help="smoothing window of the curves, steps (default 10)")
  _common.add_run_flags(parser, quick="tiny random Llama, 3 steps of 2 x 16, one seed: a smoke "
                                      "test (never writes, no plot)")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.batch, args.seq, args.seeds, args.warmup = 3, 2, 16, (0,), 1
    args.val_limit, args.tail, args.window = 8, 2, 2
    args.no_write = True
  return args


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md and the plot unless told not to."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  runs, load_at_start = _models.measure_logged(measure, args)
  plot_path = None
  if not args.no_write:
    plot_path = plot(runs, args.window, PLOT).relative_to(_common.RESULTS_PATH.parent).as_posix()
  body = render(runs, args, plot_path)
  _common.publish(SECTION, "mixed_precision: bfloat16 vs float32 base on Shakespeare", body,
                  module=MODULE, argv=argv, write=not args.no_write, load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  main()
