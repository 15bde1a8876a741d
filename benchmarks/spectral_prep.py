"""Benchmark: spectral preprocessing, SVD vs Gram-eigh, and whether both give the same blocks.

What is measured, per kernel shape ``in x out`` (float32, i.i.d. normal entries):

* time of ``smoa_jax.spectral_orders(kernel, method)`` for ``method`` in ``svd`` / ``gram``:
  the centroid scores (:func:`smoa_jax.centroid_scores`) and their stable argsorts, i.e. exactly
  the jitted work of :func:`smoa_jax.spectral_blocks` (which adds only a host-side NaN/Inf check
  and the block sizes). Compiled ahead of time with ``jax.jit(...).lower(...).compile()``; the
  compile time is reported separately, the run time excludes it. Both methods are timed in one
  interleaved run (median over rounds; the number of rounds shrinks for large shapes so that a
  shape takes about ``--max-seconds``).
* ``temp MiB``: XLA's temporary buffers of the compiled function (``memory_analysis()``).
* agreement of the two methods: the fraction of positions where ``in_perm`` (and ``out_perm``)
  are equal, and the fraction of coordinates that land in the same block for K = 2 and K = 4.
  I.i.d. normal kernels are a hard case: all centroids are close together, so near-ties, which
  float32 rounding may order either way, are common; real checkpoints spread their centroids more.

Target: 4096 x 11008 (a 7B model's MLP kernel) preprocessed in under 15 s on 2 cores.

A whole model: the wall time of the spectral preprocessing of every SMoA target of SmolLM2-135M
(q, k, v, up, down of 30 layers: 150 kernels of 4 shapes, batched by shape as ``apply_adapter``
does; real weights when cached, the same config with random weights otherwise), measured as
``apply_adapter`` on a freshly loaded model once compiled (a second call) and cold (first call,
compilation included). And the extrapolation to Llama-2-7B with the same targets, from the
per-matrix Gram times: ``T_7B = 32 layers x (3 t(4096x4096) + 2 t(4096x11008))`` (q, k, v are
4096 x 4096; up is 4096 x 11008 and down 11008 x 4096, whose Gram matrix is the same 4096 x 4096).

Run from the repository root: ``python -m benchmarks.spectral_prep`` (``--quick`` for tiny sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Sequence

import jax
import numpy as np

import smoa_jax
from benchmarks import _budgets, _common, _models

SECTION = "spectral_prep"
MODULE = "benchmarks.spectral_prep"
METHODS = ("svd", "gram")
TARGET_SHAPE = (4096, 11008)
TARGET_SECONDS = 15.0


@dataclasses.dataclass
class ShapeResult:
  """Compile/run times, memory and permutation agreement of both methods on one shape."""

  n_in: int
  n_out: int
  compile_s: dict[str, float]
  timings: _common.Timings
  temp_bytes: dict[str, int]
  same_position: tuple[float, float]  # (in_perm, out_perm)
  same_block: dict[int, float]  # K -> fraction of in + out coordinates in the same block

  @property
  def label(self) -> str:
    return f"{self.n_in}x{self.n_out}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE, "Time SVD vs Gram-eigh spectral preprocessing and compare their permutations.")
  parser.add_argument("--shapes", type=_common.parse_shape, nargs="+",
                      default=[(576, 576), (576, 1536), (2048, 5504), (4096, 4096), TARGET_SHAPE],
                      help="kernels, in x out")
  parser.add_argument("--rounds", type=int, default=7, help="max interleaved rounds per shape")
  parser.add_argument("--max-seconds", type=float, default=60.0,
                      help="time budget per shape; at least 1 round always runs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-model", action="store_true",
                      help="skip the whole-model (SmolLM2 targets) measurement")
  _common.add_run_flags(
      parser, quick="tiny sizes and 2 rounds, to check that the script runs (never writes)")
  args = parser.parse_args(argv)
  if args.quick:
    args.shapes, args.rounds = [(40, 40), (48, 96)], 2
    args.no_write = args.no_model = True
  return args


def _block_ids(perm: np.ndarray, num_blocks: int) -> np.ndarray:
  """``ids[c]`` = the block of coordinate ``c`` when ``perm`` is cut by the array_split rule."""
  ids = np.empty(len(perm), np.int64)
  for k, piece in enumerate(np.array_split(perm, num_blocks)):
    ids[piece] = k
  return ids


def _same_block(perms_a: Sequence[np.ndarray], perms_b: Sequence[np.ndarray], num_blocks: int) -> float:
  same = sum(int(np.sum(_block_ids(a, num_blocks) == _block_ids(b, num_blocks)))
             for a, b in zip(perms_a, perms_b))
  return same / sum(len(a) for a in perms_a)


def bench_shape(n_in: int, n_out: int, args: argparse.Namespace) -> ShapeResult:
  kernel = jax.random.normal(jax.random.key(args.seed), (n_in, n_out), jax.numpy.float32)
  compiled, compile_s, temp_bytes = {}, {}, {}
  for method in METHODS:
    t0 = time.perf_counter()
    compiled[method] = _common.aot_compile(
        functools.partial(smoa_jax.spectral_orders, method=method), kernel)
    compile_s[method] = time.perf_counter() - t0
    temp_bytes[method] = compiled[method].memory_analysis().temp_size_in_bytes
  outputs = {}

  def runner(method: str):
    def run():
      outputs[method] = jax.block_until_ready(compiled[method](kernel))
    return run

  # No warm-up round: everything is compiled already, and at 4096 x 11008 one SVD call is slow.
  timings = _common.time_interleaved({m: runner(m) for m in METHODS}, rounds=args.rounds,
                                     warmup=0, max_seconds=args.max_seconds, min_rounds=1)
  svd, gram = ([np.asarray(p) for p in outputs[m]] for m in METHODS)
  same_position = tuple(float(np.mean(a == b)) for a, b in zip(svd, gram))
  same_block = {k: _same_block(svd, gram, k) for k in (2, 4)}
  return ShapeResult(n_in, n_out, compile_s, timings, temp_bytes, same_position, same_block)


def _s(seconds: float) -> str:
  return f"{seconds:.3g}"


def render(results: Sequence[ShapeResult]) -> str:
  """The markdown body: times, compile times, memory, agreement, and the target's verdict."""
  rows = []
  for res in results:
    t = res.timings
    rows.append([res.label, _s(t.median("svd")), _s(t.median("gram")),
                 f"{t.ratio('svd', 'gram'):.2f}", _s(res.compile_s["svd"]),
                 _s(res.compile_s["gram"]), _common.format_mib(res.temp_bytes["svd"]),
                 _common.format_mib(res.temp_bytes["gram"]), t.rounds,
                 f"{res.same_position[0]:.3f}", f"{res.same_position[1]:.3f}",
                 f"{res.same_block[2]:.4f}", f"{res.same_block[4]:.4f}"])
  target = [r for r in results if (r.n_in, r.n_out) == TARGET_SHAPE]
  if target:
    best = min(target[0].timings.median(m) for m in METHODS)
    status = "MET" if best < TARGET_SECONDS else "MISSED"
    verdict = (f"Target: {TARGET_SHAPE[0]}x{TARGET_SHAPE[1]} preprocessed in < {TARGET_SECONDS:g} s: "
               f"**{status}** (gram {target[0].timings.median('gram'):.1f} s, "
               f"svd {target[0].timings.median('svd'):.1f} s).")
  else:
    verdict = f"Target shape {TARGET_SHAPE[0]}x{TARGET_SHAPE[1]} was not run."
  parts = [
      "`spectral_orders(kernel, method)` (centroid scores + stable argsorts, what "
      "`spectral_blocks` runs under jit), float32 i.i.d. normal kernels, compiled ahead of time. "
      "Run time: median over interleaved rounds (seconds); compile: one `lower().compile()`. "
      "Agreement of svd vs gram: fraction of equal positions in `in_perm` / `out_perm`, and "
      "fraction of coordinates (in and out together) put in the same block for K = 2, 4.",
      verdict,
      _common.markdown_table(
          ["in x out", "svd s", "gram s", "svd/gram", "compile svd s", "compile gram s",
           "temp MiB svd", "temp MiB gram", "rounds", "same pos in", "same pos out",
           "same block K=2", "same block K=4"], rows),
  ]
  return "\n\n".join(parts)


def bench_model() -> tuple[str, float, float, int]:
  """``(model name, cold s, compiled s, number of kernels)`` of SmolLM2's target preprocessing."""
  from flax import nnx

  config = _budgets.smoa_config(8, 2, _models.LLAMA_TARGETS)
  times = []
  for _ in range(2):
    model, real = _models.smollm2_model()
    start = time.perf_counter()
    report = smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(0), verbose=False,
                                    show_progress=False)
    times.append(time.perf_counter() - start)
  name = "SmolLM2-135M (real weights)" if real else "SmolLM2-135M config (random weights)"
  return name, times[0], times[1], len(report.modules)


def render_model(model: tuple[str, float, float, int], results: Sequence[ShapeResult]) -> str:
  """Whole-model time and the Llama-2-7B extrapolation (when both 7B shapes were measured)."""
  name, cold, warm, count = model
  text = (f"**Whole model**: spectral blocks of all {count} SMoA targets of {name} (q, k, v, up, "
          f"down x 30 layers, K=2, gram with SVD fallback, batched by shape): **{warm:.1f} s** "
          f"once compiled, {cold:.1f} s cold (compilation included).")
  times = {(r.n_in, r.n_out): r.timings.median("gram") for r in results}
  if (4096, 4096) in times and TARGET_SHAPE in times:
    t_square, t_mlp = times[(4096, 4096)], times[TARGET_SHAPE]
    total = 32 * (3 * t_square + 2 * t_mlp)
    text += (f"\n\n**Llama-2-7B extrapolation** (same targets, 2 CPU cores): T = 32 x (3 x "
             f"{t_square:.2f} s + 2 x {t_mlp:.2f} s) = **{total:.0f} s ({total / 60:.1f} min)**, once "
             "per base model (the permutations are saved with the adapter and reused). On an "
             "accelerator the same jitted eigh runs on the devices holding the kernels.")
  return text


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()
  results = []
  for n_in, n_out in args.shapes:
    print(f"shape {n_in}x{n_out}: compiling and timing ...", flush=True)
    results.append(bench_shape(n_in, n_out, args))
  body = render(results)
  if not args.no_model:
    print("whole model: preprocessing every SmolLM2 target ...", flush=True)
    body += "\n\n" + render_model(bench_model(), results)
  _common.publish(SECTION, "spectral_prep: SVD vs Gram-eigh preprocessing", body,
                  module=MODULE, argv=argv, write=not args.no_write, load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  main()
