"""Benchmark: what serving an SMoA adapter as LoRA costs (issue 15, ``smoa_jax.to_lora``).

Stacks that serve adapters (PEFT, vLLM) know LoRA, not SMoA. :func:`smoa_jax.to_lora` replaces
each SMoA update ``dW`` by its truncated SVD, the closest LoRA of a given rank. SMoA's ``dW``
is high-rank (it follows W's entries: an effective rank of 240-340 on SmolLM2 in
``quality_real``), so the conversion loses something; this benchmark measures how much, in the
task metric, on the two real tasks of ``benchmarks/quality_real.py``:

``sentiment``
    all-MiniLM-L6-v2 with a fresh classification head, SMoA r=8 K=2 on ``query``/``value``, 100
    steps of 32 x 64 tokens at lr 0.04 (the rate ``quality_real`` chose on validation), seed 0;
    test accuracy on the 1,000 test sentences.
``shakespeare``
    SmolLM2-135M, SMoA r=16 K=2 on ``q, k, v, up, down`` of all 30 layers, 30 steps of 4 x 128
    tokens at lr 0.03, seed 0; perplexity on the 64 evenly spaced test passages.

The SMoA adapter is trained once (with ``quality_real``'s helpers, so its numbers are
``quality_real``'s seed-0 run), saved, and loaded into a fresh base for every rank (8, 32, 128 by
default): ``to_lora(model, rank=k)`` then the test metric. The table also gives each conversion's
mean and largest relative error ``||dW - dW_k|| / ||dW||`` over the layers and the LoRA's
trainable parameters. The persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, default
``~/.cache/smoa-jax/jax-cache``) is on, so a rerun does not recompile. About 15 minutes on 2 CPU
cores; ``--quick`` swaps in tiny random models with the real tokenizers and data (a smoke test,
never written).

Run from the repository root: ``python -m benchmarks.to_lora [--task sentiment|shakespeare|all]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks import _common, _models, quality_real

SECTION = "to_lora"
MODULE = "benchmarks.to_lora"
RANKS = (8, 32, 128)
# The SMoA learning rate quality_real chose on validation for each task (its RESULTS section).
SMOA_LR = {"sentiment": 4e-2, "shakespeare": 3e-2}


def compilation_cache() -> str:
  """Turn on JAX's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR`` or the default)."""
  import jax

  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
      Path("~/.cache/smoa-jax/jax-cache").expanduser())
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory


@dataclasses.dataclass
class Row:
  """The original adapter (``rank`` None) or one conversion, and what it scored."""

  rank: int | None
  metric: float
  trainable: int
  mean_error: float = 0.0
  max_error: float = 0.0
  seconds: float = 0.0


@dataclasses.dataclass
class TaskResult:
  plan: quality_real.Plan
  reference: tuple[str, float]
  rows: list[Row]
  seconds: float


def _convert(ctx: quality_real.Context, adapter: Path, rank: int) -> Row:
  """A fresh base with the saved SMoA adapter, converted to rank-``rank`` LoRA, scored."""
  import smoa_jax

  start = time.perf_counter()
  model = quality_real.load_model(ctx, seed=0)
  smoa_jax.load_adapter(model, adapter)
  report = smoa_jax.to_lora(model, rank=rank)
  trainable = sum(layer.num_trainable_params for _, layer in smoa_jax.adapter_layers(model))
  seconds = time.perf_counter() - start
  return Row(rank, quality_real._score(ctx, model, "test"), trainable, report.mean_error,
             report.max_error, seconds)


def run_task(plan: quality_real.Plan, ranks: Sequence[int], quick: bool, workdir: Path,
             log: Callable[[str], None]) -> TaskResult:
  import smoa_jax

  started = time.perf_counter()
  ctx = quality_real.make_context(plan, quick, workdir)
  method = next(m for m in plan.methods if m.kind == "smoa")
  lr = method.lrs[0] if quick else SMOA_LR[plan.task]
  run = quality_real.train_run(ctx, method, lr, seed=0, validate=False)
  original = Row(None, quality_real._score(ctx, run.model, "test"), run.trainable,
                 seconds=run.seconds)
  log(f"{plan.task}: SMoA trained in {run.seconds:.0f} s, test {plan.metric} "
      f"{quality_real._fmt(plan, original.metric)}")
  adapter = workdir / f"{plan.task}-smoa"
  smoa_jax.save_adapter(run.model, adapter)
  if plan.task == "sentiment":
    majority = int(np.bincount(ctx.data["train"]["labels"]).argmax())
    reference = ("majority class", float(np.mean(ctx.data["test"]["labels"] == majority)))
  else:
    reference = ("pretrained", quality_real._score(ctx, quality_real.load_model(ctx, 0), "test"))
  del run
  rows = [original]
  for rank in ranks:
    rows.append(_convert(ctx, adapter, rank))
    log(f"{plan.task}: LoRA rank {rank}: test {plan.metric} "
        f"{quality_real._fmt(plan, rows[-1].metric)}, relative error mean "
        f"{rows[-1].mean_error:.3f} max {rows[-1].max_error:.3f} ({rows[-1].seconds:.0f} s)")
  return TaskResult(plan, reference, rows, time.perf_counter() - started)


def render(results: list[TaskResult]) -> str:
  parts = [
      "What serving an SMoA adapter as LoRA costs: `smoa_jax.to_lora(model, rank=k)` replaces "
      "every SMoA update by its truncated SVD (the closest rank-k LoRA), which "
      "`smoa_jax.save_peft_adapter` then writes for PEFT / vLLM. One SMoA adapter per task, "
      "trained as `quality_real`'s seed-0 run at its chosen learning rate (protocol: the "
      "docstring of `benchmarks/to_lora.py`), then converted at each rank from the same saved "
      "adapter. Relative error: `||dW - dW_k|| / ||dW||` per layer, mean and max over layers."]
  for res in results:
    plan = res.plan
    unit = "test accuracy" if plan.higher_is_better else "test perplexity"
    first = res.rows[0]
    table = []
    for row in res.rows:
      name = "SMoA (original)" if row.rank is None else f"LoRA rank {row.rank}"
      change = row.metric - first.metric
      delta = ("-" if row.rank is None else
               f"{100 * change:+.1f} points" if plan.higher_is_better else f"{change:+.2f}")
      table.append([name, f"{row.trainable:,}", quality_real._fmt(plan, row.metric), delta,
                    "-" if row.rank is None else f"{row.mean_error:.3f}",
                    "-" if row.rank is None else f"{row.max_error:.3f}"])
    targets = ", ".join(plan.targets)
    parts += [
        f"**{plan.task}** (SMoA r={2 * plan.p} K=2 on {targets}, {plan.steps} steps of "
        f"{plan.batch_size} x {plan.seq_len} tokens; {res.reference[0]}: "
        f"{quality_real._fmt(plan, res.reference[1])}; wall time {res.seconds / 60:.0f} min).",
        _common.markdown_table(["adapter", "parameters", unit, "vs SMoA", "rel. error (mean)",
                                "rel. error (max)"], table)]
  return "\n\n".join(parts)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=f"python -m {MODULE}",
      description="Task metric of SMoA adapters converted to truncated-SVD LoRA (to_lora) at "
                  "several ranks, against the original SMoA adapter: MiniLM sentiment accuracy, "
                  "SmolLM2 Shakespeare perplexity.",
      epilog="The defaults are the full run (about 15 minutes on 2 CPU cores).")
  parser.add_argument("--task", choices=("sentiment", "shakespeare", "all"), default="all")
  parser.add_argument("--ranks", type=_common.parse_ints, default=RANKS,
                      help="comma-separated LoRA ranks (default 8,32,128)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny random models, 3 steps: a smoke test (never writes)")
  parser.add_argument("--no-write", action="store_true", help="leave benchmarks/RESULTS.md alone")
  args = parser.parse_args(argv)
  if args.quick:
    args.no_write = True
  return args


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()
  started = time.perf_counter()

  log = _common.minutes_log(started)

  if not args.quick:  # the smoke test runs inside other processes: leave their config alone
    log(f"persistent compilation cache: {compilation_cache()}")
  names = ["sentiment", "shakespeare"] if args.task == "all" else [args.task]
  plans = [quality_real.PLANS[n] for n in names]
  plans = [quality_real.quick_plan(p) if args.quick else p for p in plans]
  ranks = tuple(sorted({min(r, 16) for r in args.ranks})) if args.quick else args.ranks
  with (tempfile.TemporaryDirectory(prefix="smoa-to-lora-") as workdir,
        _models.fast_compile(args.quick)):
    results = [run_task(plan, ranks, args.quick, Path(workdir), log) for plan in plans]
  body = render(results)
  body += f"\n\nTotal wall time {(time.perf_counter() - started) / 60:.0f} min."
  _common.publish(SECTION, "to_lora: SMoA adapters served as LoRA", body, module=MODULE,
                  argv=argv, write=not args.no_write, load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  main()
