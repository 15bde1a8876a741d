"""Benchmark: one training step (forward + backward) of ONE adapted layer, and merged inference.

What is measured, per kernel shape ``in x out`` with ``T`` tokens (``x (T, in)``, float32):

* ``SMoA`` (``smoa_jax.SMoADense``, K blocks, total rank r), ``LoRA`` (``LoRADense``, rank r),
  ``HiRA`` (``HiRADense``, rank r): ``y = layer(x)`` and the VJP of a fixed random cotangent
  ``dy`` with respect to the adapter parameters AND the input, the kernel and bias frozen (they
  are jit arguments, not differentiated); ``y`` is returned too, so the forward cannot be
  dropped. Adapter dropout is 0 (SMoA/HiRA take their folded path).
* ``base``: a frozen ``nnx.Linear``, same step with the gradient w.r.t. the input only.
* ``authors``: :class:`benchmarks.authors_torch.AuthorsSMoALinear`, the authors' algorithm in
  PyTorch on the same weights, blocks and factors: ``y = module(x); y.backward(dy)`` with
  gradients for ``lora_A``/``lora_B`` and ``x``. Torch runs with ``torch.set_num_threads`` equal
  to the cores XLA's CPU client uses (all usable cores), so both sides get the same threads.
* ``torch base``: the frozen layer in PyTorch, ``F.linear`` forward + input gradient, so that
  ``authors / torch base`` shows the algorithm's own overhead apart from the speed of torch's
  matmuls (compare with ``SMoA / base`` in JAX).
* ``merged`` vs ``base fwd``: forward only, SMoA layer after ``merge()`` vs the plain layer.

Every JAX step is ``jax.jit``-compiled ahead of time (``lower().compile()``, not timed) and
called with ``jax.block_until_ready``. All candidates of one shape are timed in ONE interleaved
run (:func:`benchmarks._common.time_interleaved`): ratios are medians of per-round ratios. JAX
and torch candidates form two groups with a 0.2 s pause after each, because libgomp's spinning
threads made a JAX call right after a torch call ~1.5x slower on 2 cores.

Memory ("step MiB"): bytes a step allocates beyond its inputs and weights. JAX: XLA's buffer
assignment of the compiled step, ``temp_size_in_bytes + output_size_in_bytes`` from
``compiled.memory_analysis()`` (outputs are y, dx and the adapter gradients). Torch: the peak of
live bytes created during one step (``CREATE`` minus ``DESTROY`` events of the profiler's
memory timeline; y, x.grad and the factor gradients stay live, so they count too). "state MiB"
is what the adapter keeps between steps besides the frozen weights: factors, index vectors and,
for the authors' code, the anchor copies.

Run from the repository root: ``python -m benchmarks.layer_step`` (``--quick`` for tiny sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
import torch
from flax import nnx

import smoa_jax
from benchmarks import _common, _models
from benchmarks.authors_torch import AuthorsSMoALinear, peak_live_bytes

SECTION = "layer_step"
MODULE = "benchmarks.layer_step"
SMOA_LORA_TARGET = 1.3  # SMoA / LoRA step time at K = 2
AUTHORS_TARGET = 2.0  # authors / SMoA step time
SETTLE_SECONDS = 0.2  # pause after each runtime's group of candidates (see module docstring)


@dataclasses.dataclass(frozen=True)
class Case:
  """One adapted configuration of a shape: K blocks (SMoA / authors) and total rank r."""

  k: int
  r: int

  @property
  def smoa(self) -> str:
    return f"smoa_k{self.k}_r{self.r}"

  @property
  def authors(self) -> str:
    return f"authors_k{self.k}_r{self.r}"


@dataclasses.dataclass
class ShapeResult:
  """Timings and memory of every candidate of one ``(in, out)`` shape."""

  n_in: int
  n_out: int
  cases: list[Case]
  timings: _common.Timings
  step_bytes: dict[str, int]
  state_bytes: dict[str, int]

  @property
  def label(self) -> str:
    return f"{self.n_in}x{self.n_out}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE, "Time forward+backward of one adapted layer: SMoA vs LoRA, HiRA, the frozen "
              "base layer and the authors' PyTorch algorithm; merged inference vs base.")
  parser.add_argument("--shapes", type=_common.parse_shape, nargs="+",
                      default=[(1024, 1024), (576, 1536), (1536, 576)], help="kernels, in x out")
  parser.add_argument("--tokens", type=int, default=2048, help="T, rows of x (default 2048)")
  parser.add_argument("--ks", type=_common.parse_ints, default=(2, 4),
                      help="SMoA block counts K (default 2,4)")
  parser.add_argument("--ranks", type=_common.parse_ints, default=(8, 16),
                      help="total ranks r (default 8,16)")
  parser.add_argument("--alpha", type=float, default=16.0, help="adapter alpha (default 16)")
  parser.add_argument("--rounds", type=int, default=15,
                      help="interleaved timing rounds per shape (default 15)")
  parser.add_argument("--max-seconds", type=float, default=120.0,
                      help="stop timing a shape after this long, once 3 rounds are done")
  parser.add_argument("--seed", type=int, default=0)
  _common.add_run_flags(
      parser, quick="tiny sizes and 3 rounds, to check that the script runs (never writes)")
  args = parser.parse_args(argv)
  if args.quick:
    # Uneven blocks (47 = 24 + 23) and uneven ranks (3 = 2 + 1) exercise the padding paths.
    args.shapes, args.tokens, args.ks, args.ranks, args.rounds = [(80, 47)], 32, (2,), (3,), 3
    args.no_write = True
  return args


def _compile(fn: Callable, *args) -> tuple[Callable[[], Any], int]:
  """AOT-compile ``fn(*args)``; returns a blocking zero-arg runner and its temp + output bytes."""
  compiled = _common.aot_compile(fn, *args)
  return _common.blocking_call(compiled, *args), _common.allocated_bytes(compiled)


def _adapter_step(layer: smoa_jax.AdaptedDense, x: jax.Array, dy: jax.Array):
  """Forward + VJP w.r.t. the adapter parameters and the input; kernel/bias frozen."""
  graphdef, params, frozen = nnx.split(layer, smoa_jax.TrainableParam, ...)

  def step(params, frozen, x, dy):
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, frozen)(x), params, x)
    dparams, dx = vjp(dy)
    return y, dparams, dx

  return _compile(step, params, frozen, x, dy)


def _base_step(linear: nnx.Linear, x: jax.Array, dy: jax.Array):
  """Forward + VJP w.r.t. the input only (everything frozen)."""
  graphdef, state = nnx.split(linear)

  def step(state, x, dy):
    y, vjp = jax.vjp(lambda x: nnx.merge(graphdef, state)(x), x)
    return y, vjp(dy)[0]

  return _compile(step, state, x, dy)


def _forward(module: nnx.Module, x: jax.Array):
  graphdef, state = nnx.split(module)
  return _compile(lambda state, x: nnx.merge(graphdef, state)(x), state, x)


def _torch_step(module: AuthorsSMoALinear, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], Any]:
  """One ``y = module(x); y.backward(dy)``, gradients cleared first as a training loop would."""
  params = [p for p in module.parameters() if p.requires_grad]

  def step():
    for p in params:
      p.grad = None
    x.grad = None
    y = module(x)
    y.backward(dy)
    return y

  return step


def _torch_base_step(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                     dy: torch.Tensor) -> Callable[[], Any]:
  """Frozen ``F.linear`` forward + input gradient (the torch twin of :func:`_base_step`)."""

  def step():
    x.grad = None
    y = torch.nn.functional.linear(x, weight, bias)
    y.backward(dy)
    return y

  return step


def _torch_peak_bytes(step: Callable[[], Any], module: AuthorsSMoALinear, x: torch.Tensor) -> int:
  """Peak live bytes of one ``step()``, gradients cleared first (so they count as created)."""
  module.zero_grad(set_to_none=True)
  x.grad = None
  return peak_live_bytes(step)


def bench_shape(n_in: int, n_out: int, args: argparse.Namespace) -> ShapeResult:
  """Build every candidate of one shape, then time them all in one interleaved run."""
  key = jax.random.key(args.seed)
  k_lin, k_bias, k_x, k_dy = jax.random.split(key, 4)
  linear = nnx.Linear(n_in, n_out, rngs=nnx.Rngs(params=k_lin))
  linear.bias[...] = 0.1 * jax.random.normal(k_bias, (n_out,))
  x = jax.random.normal(k_x, (args.tokens, n_in))
  dy = jax.random.normal(k_dy, (args.tokens, n_out))
  x_torch = torch.from_numpy(np.array(x)).requires_grad_(True)
  dy_torch = torch.from_numpy(np.array(dy))

  cases = [Case(k, r) for k in args.ks for r in args.ranks]
  candidates: dict[str, Callable[[], Any]] = {}  # JAX
  torch_candidates: dict[str, Callable[[], Any]] = {}
  step_bytes: dict[str, int] = {}
  state_bytes: dict[str, int] = {}
  torch_modules: dict[str, AuthorsSMoALinear] = {}
  for r in args.ranks:
    for name, layer_cls, config in (
        (f"lora_r{r}", smoa_jax.LoRADense, smoa_jax.LoRAConfig(r=r, alpha=args.alpha)),
        (f"hira_r{r}", smoa_jax.HiRADense, smoa_jax.HiRAConfig(r=r, alpha=args.alpha))):
      layer = layer_cls.from_linear(linear, config, rngs=nnx.Rngs(args.seed))
      _models.randomize_lora_b(layer, args.seed + 1)
      candidates[name], step_bytes[name] = _adapter_step(layer, x, dy)
      state_bytes[name] = _common.tree_nbytes(nnx.state(layer, smoa_jax.TrainableParam))
  for case in cases:
    config = smoa_jax.SMoAConfig(r=case.r, num_blocks=case.k, alpha=args.alpha)
    layer = smoa_jax.SMoADense.from_linear(linear, config, rngs=nnx.Rngs(args.seed))
    _models.randomize_lora_b(layer, args.seed + 1)
    candidates[case.smoa], step_bytes[case.smoa] = _adapter_step(layer, x, dy)
    state_bytes[case.smoa] = _common.tree_nbytes(
        nnx.state(layer, (smoa_jax.TrainableParam, smoa_jax.SpectralIndex)))
    module = AuthorsSMoALinear.from_smoa_dense(layer)
    torch_modules[case.authors] = module
    torch_candidates[case.authors] = _torch_step(module, x_torch, dy_torch)
    state_bytes[case.authors] = _common.tree_nbytes(
        [t for name, t in module.state_dict().items() if name not in ("weight", "bias")])
    if case == cases[0]:
      merged = nnx.clone(layer)
      merged.merge()
      candidates["merged_fwd"], _ = _forward(merged, x)
  candidates["base"], step_bytes["base"] = _base_step(linear, x, dy)
  candidates["base_fwd"], _ = _forward(linear, x)
  torch_candidates["torch_base"] = _torch_base_step(module.weight, module.bias, x_torch, dy_torch)

  timings = _common.time_interleaved(candidates, torch_candidates, rounds=args.rounds,
                                     max_seconds=args.max_seconds, settle_seconds=SETTLE_SECONDS)
  for name, module in torch_modules.items():
    step_bytes[name] = _torch_peak_bytes(torch_candidates[name], module, x_torch)
  return ShapeResult(n_in, n_out, cases, timings, step_bytes, state_bytes)


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g}"


def _x(ratio: float) -> str:
  return f"{ratio:.2f}"


def render(results: Sequence[ShapeResult], tokens: int, torch_threads: int) -> str:
  """The markdown body: times, ratios, memory, merged inference, and the targets' verdicts."""
  time_rows, ratio_rows, memory_rows, merged_rows = [], [], [], []
  lora_ratios_k2, authors_ratios = [], []
  for res in results:
    t = res.timings
    for case in res.cases:
      lora, hira = f"lora_r{case.r}", f"hira_r{case.r}"
      head = [res.label, case.k, case.r]
      time_rows.append(head + [_ms(t.median(n)) for n in (case.smoa, lora, hira, "base",
                                                          case.authors, "torch_base")])
      smoa_lora = t.ratio(case.smoa, lora)
      authors = t.ratio(case.authors, case.smoa)
      ratio_rows.append(head + [_x(smoa_lora), _x(t.ratio(case.smoa, hira)),
                                _x(t.ratio(case.smoa, "base")), _x(authors),
                                _x(t.ratio(case.authors, "torch_base"))])
      memory_rows.append(
          head + [_common.format_mib(res.step_bytes[n], 2)
                  for n in (case.smoa, lora, hira, "base", case.authors)]
          + [_common.format_mib(res.state_bytes[n], 2) for n in (case.smoa, lora, case.authors)])
      if case.k == 2:
        lora_ratios_k2.append(smoa_lora)
      authors_ratios.append(authors)
    merged_rows.append([res.label, _ms(t.median("merged_fwd")), _ms(t.median("base_fwd")),
                        _x(t.ratio("merged_fwd", "base_fwd"))])

  def verdict(values: list[float], ok: Callable[[float], bool], text: str) -> str:
    if not values:
      return f"- {text}: not measured (no such case in this run)."
    met = sum(ok(v) for v in values)
    status = "MET" if met == len(values) else "MISSED"
    return (f"- {text}: **{status}** in {met}/{len(values)} cases "
            f"(range {min(values):.2f}-{max(values):.2f}).")

  rounds = sorted({res.timings.rounds for res in results})
  rounds_text = f"{rounds[0]}" if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"
  parts = [
      f"One adapted layer, T = {tokens} tokens, float32, forward + backward (gradients w.r.t. "
      "adapter parameters and input; frozen kernel), adapter dropout 0. Median of "
      f"{rounds_text} interleaved rounds per shape; ratios are medians of per-round ratios. "
      "`authors` is the authors' algorithm in PyTorch (`benchmarks/authors_torch.py`), run with "
      f"`torch.set_num_threads({torch_threads})`, the number of cores XLA's CPU client uses.",
      "Targets:",
      verdict(lora_ratios_k2, lambda v: v <= SMOA_LORA_TARGET,
              f"SMoA/LoRA <= {SMOA_LORA_TARGET} at K=2"),
      verdict(authors_ratios, lambda v: v >= AUTHORS_TARGET,
              f"authors/SMoA >= {AUTHORS_TARGET} (smoa-jax at least {AUTHORS_TARGET:g}x faster)"),
      "Step time (ms):",
      _common.markdown_table(["in x out", "K", "r", "SMoA", "LoRA", "HiRA", "base", "authors",
                              "torch base"], time_rows),
      "Ratios of step times:",
      _common.markdown_table(["in x out", "K", "r", "SMoA/LoRA", "SMoA/HiRA", "SMoA/base",
                              "authors/SMoA", "authors/torch base"], ratio_rows),
      "Memory (MiB). Step: JAX temp + output buffers of the compiled step; torch peak live bytes "
      "during one step. State: adapter arrays kept besides the frozen W and bias (authors: "
      "factors + index vectors + anchor copies of the blocks).",
      _common.markdown_table(["in x out", "K", "r", "step SMoA", "step LoRA", "step HiRA",
                              "step base", "step authors", "state SMoA", "state LoRA",
                              "state authors"], memory_rows),
      "Merged inference, forward only (ms): SMoA after `merge()` (K = first K, r = first r) vs "
      "the plain layer.",
      _common.markdown_table(["in x out", "merged", "base", "merged/base"], merged_rows),
  ]
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()
  threads = _common.set_torch_threads()
  results = []
  for n_in, n_out in args.shapes:
    print(f"shape {n_in}x{n_out}: compiling and timing ...", flush=True)
    results.append(bench_shape(n_in, n_out, args))
  body = render(results, args.tokens, threads)
  _common.publish(SECTION, "layer_step: one adapted layer, forward + backward", body,
                  module=MODULE, argv=argv, write=not args.no_write, load_at_start=load_at_start,
                  torch_threads=threads)
  return body


if __name__ == "__main__":
  main()
