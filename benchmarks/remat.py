"""Benchmark: rematerialisation of SmolLM2-135M's training step, memory and time by remat policy.

The step is the one of ``benchmarks/model_step.py`` (:func:`benchmarks.model_step.jax_step`:
forward + mean next-token cross-entropy + backward + clip + AdamW, donated, compiled ahead of
time) for SMoA K=2 r=8 on ``q_proj, k_proj, v_proj, up_proj, down_proj`` of all 30 layers, with
``smoa_jax.set_remat(model, policy)`` for each policy of ``smoa_jax.models.blocks.REMAT_POLICIES``
(``none``, ``full``, ``dots``). The layers run under ``scan_layers=True``: on CPU, XLA schedules
the recomputations of unrolled layers early, so their results live as long as the saved
activations would have and the peak does not move (docs/scale_out.md section 7); ``--unrolled``
measures that case.

Memory, from XLA's buffer assignment of the compiled step (``compiled.memory_analysis()``, exact
and deterministic, nothing is run): ``resident`` = argument bytes (frozen weights, adapter
factors, AdamW state, batch), ``step`` = ``temp + output - alias`` (what one step allocates on top
of its donated inputs: saved activations, logits and their gradient, gradients), ``peak`` = their
sum. Measured at ``--batch`` (default 4) for every sequence length. ``GFLOP`` is XLA's
``cost_analysis()`` of the same program: it counts a scanned loop body once, so it is the flops
of the program outside the layer loop plus ONE layer (forward, recomputation, backward); its ratio
between policies shows the recomputation a policy adds per layer.

Time: every (sequence, policy) step is timed in one interleaved run
(:func:`benchmarks._common.time_interleaved`: all candidates once per round, the start rotating;
ratios are medians of per-round ratios against ``none`` at the same sequence length). The step
``none`` at batch 4 x 2048 needs more memory than the shared test machine has free, so steps are
timed at ``--time-batch`` sequences (default 1); a step's work, and so the ratio of two policies,
is linear in the batch.

Run from the repository root: ``python -m benchmarks.remat`` (``--quick``: a tiny random Llama,
2 rounds; a smoke test that never writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import smoa_jax
from benchmarks import _budgets, _common, _models
from benchmarks.model_step import JaxStep, jax_step
from smoa_jax.models.blocks import REMAT_POLICIES

SECTION = "remat"
MODULE = "benchmarks.remat"
TARGETS = _models.LLAMA_TARGETS
POLICIES = tuple(REMAT_POLICIES)  # none first: the reference of every ratio
PEAK_GOAL = 0.5  # peak with remat / peak without, at the longest sequence
TIME_GOAL = 1.35  # step time with remat / without, at the longest sequence


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One compiled step's bytes (XLA buffer assignment) and flops (XLA cost analysis)."""

  resident: int
  step: int
  flops: float

  @property
  def peak(self) -> int:
    return self.resident + self.step


def adapted_model(model_dir: Path, *, scan_layers: bool, seed: int) -> nnx.Module:
  """The model with SMoA K=2 r=8 on the targets (``b`` randomised, as after some training)."""
  model = smoa_jax.from_hf(model_dir, scan_layers=scan_layers)
  smoa_jax.apply_adapter(model, _budgets.smoa_config(8, 2, TARGETS), rngs=nnx.Rngs(seed),
                         verbose=False, show_progress=False)
  _models.randomize_lora_b(model, seed + 1)
  return model


def token_batch(vocab_size: int, batch: int, seq: int, seed: int) -> dict[str, jax.Array]:
  """``batch x seq`` random token ids, no padding."""
  ids = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq), dtype=np.int32)
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((batch, seq), jnp.int32)}


def remat_step(model: nnx.Module, policy: str, batch: dict[str, jax.Array]) -> JaxStep:
  """:func:`benchmarks.model_step.jax_step` of ``model`` under remat ``policy``. The policy is
  part of the graphdef that ``jax_step`` splits off, so the model itself is reused for the next
  policy (its frozen arrays are shared, never copied)."""
  smoa_jax.set_remat(model, policy)
  return jax_step(model, batch)


def _name(seq: int, policy: str) -> str:
  return f"T={seq} {policy}"


@dataclasses.dataclass
class Measured:
  compiled: dict[tuple[int, str], Compiled]  # (seq, policy) at --batch
  timings: _common.Timings | None  # candidates named by _name, at --time-batch; None: --rounds 0
  model: str


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> Measured:
  with tempfile.TemporaryDirectory(prefix="smoa-remat-") as workdir:
    if args.quick:
      config = _models.tiny_llama_config()
      model_dir = _models.save_random_llama(config, Path(workdir) / "tiny")
      description = "a tiny random Llama (--quick)"
    else:
      model_dir, real = _models.smollm2_directory(Path(workdir))
      config = _models.SMOLLM2_CONFIG
      description = ("SmolLM2-135M-Instruct (real weights, dequantized Q4_1)" if real else
                     "SmolLM2-135M's config with random weights (the asset is not cached)")
    model = adapted_model(model_dir, scan_layers=not args.unrolled, seed=args.seed)
  log(f"model: {description}")
  compiled: dict[tuple[int, str], Compiled] = {}
  runs: dict[str, Callable[[], Any]] = {}
  for seq in args.seqs:
    for policy in POLICIES:
      step = remat_step(model, policy, token_batch(config["vocab_size"], args.batch, seq, 0))
      compiled[seq, policy] = Compiled(step.resident_bytes, step.step_bytes, step.xla_flops)
      if args.rounds and args.time_batch != args.batch:  # the step at --batch is never run
        step = remat_step(model, policy,
                          token_batch(config["vocab_size"], args.time_batch, seq, 0))
      if args.rounds:
        runs[_name(seq, policy)] = step.run
      log(f"compiled {_name(seq, policy)}: peak at batch {args.batch} "
          f"{_common.format_mib(compiled[seq, policy].peak)} MiB")
  smoa_jax.set_remat(model, "none")
  if not runs:
    return Measured(compiled, None, description)
  log(f"timing {len(runs)} steps at batch {args.time_batch}, {args.rounds} interleaved rounds")
  timings = _common.time_interleaved(runs, rounds=args.rounds, max_seconds=args.max_seconds)
  return Measured(compiled, timings, description)


def render(m: Measured, args: argparse.Namespace) -> str:
  """The markdown body: memory and time by sequence length and policy, the goals' verdicts."""
  t = m.timings
  rows = []
  for seq in args.seqs:
    none = m.compiled[seq, "none"]
    for policy in POLICIES:
      c = m.compiled[seq, policy]
      name = _name(seq, policy)
      times = ([f"{t.median(name):.3g}", f"{t.ratio(name, _name(seq, 'none')):.2f}"] if t else
               ["-", "-"])
      rows.append([seq, policy, *map(_common.format_mib, (c.resident, c.step, c.peak)),
                   f"{c.peak / none.peak:.2f}", f"{c.flops / 1e9:,.1f}",
                   f"{c.flops / none.flops:.2f}", *times])
  layers = "unrolled layers (--unrolled)" if args.unrolled else "`scan_layers=True`"
  parts = [
      f"One training step (forward + backward + clip + AdamW, float32) of {m.model} with SMoA "
      f"K=2 r=8 on {', '.join(TARGETS)} of every layer, {layers}, by remat policy "
      f"(`smoa_jax.set_remat`). Memory (MiB, XLA buffer assignment of the compiled step) at "
      f"batch {args.batch}: `resident` = arguments (weights, factors, AdamW state, batch), "
      "`step` = temp + output - donated alias, `peak` = their sum. `GFLOP` = XLA's "
      "`cost_analysis()` (the scanned layer body counted once: the program outside the layer "
      "loop plus one layer). " + (
          f"Step time at batch {args.time_batch} (why: the docstring of `benchmarks/remat.py`), "
          f"one interleaved run of {t.rounds} rounds; `time / none` is the median of per-round "
          "ratios." if t else "Not timed (`--rounds 0`)."),
      _common.markdown_table(["T", "remat", "resident", "step", "peak", "peak / none", "GFLOP",
                              "flops / none", "step s", "time / none"], rows),
  ]
  longest = max(args.seqs)
  verdicts = []
  for policy in POLICIES[1:]:
    peak = m.compiled[longest, policy].peak / m.compiled[longest, "none"].peak
    verdict = (f"- `{policy}` at T={longest}: peak {peak:.2f}x of `none` (goal <= {PEAK_GOAL}: "
               f"**{'MET' if peak <= PEAK_GOAL else 'MISSED'}**)")
    if t:
      slower = t.ratio(_name(longest, policy), _name(longest, "none"))
      verdict += (f", time {slower:.2f}x (goal <= {TIME_GOAL}: "
                  f"**{'MET' if slower <= TIME_GOAL else 'MISSED'}**)")
    verdicts.append(verdict + ".")
  parts.append("\n".join(verdicts))
  return "\n\n".join(parts)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE, "Peak memory (XLA buffer assignment) and step time of SmolLM2-135M's SMoA training "
              "step by remat policy (none, full, dots) and sequence length.")
  parser.add_argument("--batch", type=int, default=4,
                      help="sequences per step for the memory numbers (default 4)")
  parser.add_argument("--seqs", type=_common.parse_ints, default=(512, 1024, 2048),
                      help="sequence lengths, comma-separated (default 512,1024,2048)")
  parser.add_argument("--time-batch", type=int, default=1,
                      help="sequences per timed step (default 1: `none` at 4 x 2048 needs more "
                           "memory than a shared machine has free)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="interleaved timing rounds (default 3; 0: memory only, nothing run)")
  parser.add_argument("--max-seconds", type=float, default=1800.0,
                      help="stop timing after this long, once 3 rounds are done")
  parser.add_argument("--unrolled", action="store_true",
                      help="unrolled layers instead of scan_layers=True")
  parser.add_argument("--seed", type=int, default=0)
  _common.add_run_flags(parser, quick="tiny random Llama, batch 2, T=16,32, 2 rounds: a smoke "
                                      "test (never writes)")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.time_batch, args.seqs, args.rounds = 2, 2, (16, 32), 2
    args.no_write = True
  return args


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  measured, load_at_start = _models.measure_logged(measure, args)
  body = render(measured, args)
  section, title = ((f"{SECTION}_unrolled", "remat, unrolled layers (--unrolled)") if args.unrolled
                    else (SECTION, "remat: memory and time of SmolLM2-135M's step by remat policy"))
  _common.publish(section, title, body, module=MODULE, argv=argv, write=not args.no_write,
                  load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  main()
