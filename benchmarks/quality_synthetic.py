"""Benchmark: how well each adapter can represent a high-rank update, at equal trainable parameters.

For a kernel ``W (in, out)`` and a target update ``dW*``, each method fits its own ``dW(theta)``
by minimizing ``||dW(theta) - dW*||_F^2 / ||dW*||_F^2`` with Adam; we report the final relative
error (lower is better). All methods have the same number of trainable parameters,
``r (in + out) / K``:

=================  ================================================================
``smoa``           spectral order, K blocks, ``(alpha/r)(a_k b_k) * W_k``   (the method)
``smoa-noperm``    natural order (no spectral permutation), K modulated blocks
``blocks-spectral`` spectral order, K blocks, ``(alpha/r) a_k b_k``  (no modulation)
``melora``         natural order, K blocks, no modulation (MELoRA-like block LoRA)
``hira``           rank r/K, ``(alpha/r')(a b) * W`` over the whole matrix
``lora``           rank r/K, ``(alpha/r') a b``
=================  ================================================================

So ``smoa`` vs ``smoa-noperm`` isolates what the spectral permutation buys, ``smoa`` vs
``blocks-spectral`` what the Hadamard modulation buys, and ``melora`` is the plain block-diagonal
baseline. (The unmodulated variants reuse SMoA's op with an all-ones anchor.)

Targets ``dW*``: ``dense`` -- i.i.d. Gaussian scaled to W's entries (no structure at all);
``modulated`` -- ``(U V^T) * W`` with ``rank(U V^T) = 16`` (a high-rank update that follows W);
``spectral-top`` -- a rank-32 update inside the span of W's top singular vectors, ``P_top M Q_top^T``
(fine-tuning that re-weights what W already does).

Protocol: the learning rate of every method is chosen from a grid on VALIDATION targets (other
random seeds), then each method is run on 3 test seeds with that learning rate; we report the
mean and standard deviation. Kernels: a random Gaussian one and real pretrained kernels from
MiniLM and SmolLM2 when they are in the asset cache (``smoa-jax fetch-assets``).

Run from the repository root: ``python -m benchmarks.quality_synthetic`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _budgets, _common
from smoa_jax.app.analysis import effective_rank
from smoa_jax.core import ops
from smoa_jax.core.lora import LoRAOp
from smoa_jax.core.smoa import SMoAOp
from smoa_jax.core import spectral
from smoa_jax.core.config import split_sizes

MODULE = "benchmarks.quality_synthetic"
METHODS = ("smoa", "smoa-noperm", "blocks-spectral", "melora", "hira", "lora")
TARGETS = ("dense", "modulated", "spectral-top")


def real_kernels(limit_shapes: bool) -> dict[str, np.ndarray]:
  """Pretrained kernels ``(in, out)`` from the asset cache (empty if it is not populated)."""
  from safetensors.numpy import load_file

  from smoa_jax.app import assets
  out: dict[str, np.ndarray] = {}
  if assets.is_cached("minilm"):
    sd = load_file(str(assets.fetch_minilm() / "model.safetensors"))
    out["minilm query 384x384"] = sd["encoder.layer.2.attention.self.query.weight"].T
    if not limit_shapes:
      out["minilm ffn-in 384x1536"] = sd["encoder.layer.2.intermediate.dense.weight"].T
  if assets.is_cached("smollm2") and not limit_shapes:
    directory = assets.fetch_smollm2()
    from safetensors import safe_open
    files = sorted(directory.glob("*.safetensors"))
    with safe_open(str(files[0]), "numpy") as f:
      out["smollm2 q_proj 576x576"] = f.get_tensor("model.layers.10.self_attn.q_proj.weight").T
      out["smollm2 up_proj 576x1536"] = f.get_tensor("model.layers.10.mlp.up_proj.weight").T
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def make_target(kind: str, w: np.ndarray, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, 7919])  # a stream of its own, unrelated to the kernel's
  n_in, n_out = w.shape
  if kind == "dense":
    return (rng.standard_normal(w.shape) * w.std()).astype(np.float32)
  if kind == "modulated":
    return ((rng.standard_normal((n_in, 16)) @ rng.standard_normal((16, n_out)) / 4.0) * w).astype(np.float32)
  if kind == "spectral-top":
    p, _, qt = np.linalg.svd(w, full_matrices=False)
    top = max(1, min(n_in, n_out) // 4)
    rank = min(32, top)
    m = rng.standard_normal((top, rank)) @ rng.standard_normal((rank, top)) / np.sqrt(rank)
    update = p[:, :top] @ m @ qt[:top]
    return (update * (w.std() / update.std())).astype(np.float32)
  raise ValueError(kind)


def method_delta(method: str, w: np.ndarray, r: int,
                 k: int) -> tuple[Callable, Callable[[jax.Array], tuple[jax.Array, jax.Array]]]:
  """``(delta_fn(params) -> dW (in, out), init(key) -> params)`` for one method at the common
  budget (:meth:`benchmarks._budgets.EqualBudget.of_smoa`: SMoA rank ``r`` in ``k`` blocks, LoRA
  and HiRA rank ``r / k``). Every method shares SMoA's ``alpha``, so LoRA's and HiRA's scaling
  ``alpha / (r / k)`` is ``k`` times SMoA's. ``delta_fn`` is the same object for every seed, so
  its fitter compiles once."""
  n_in, n_out = w.shape
  kernel = jnp.asarray(w)
  budget = _budgets.EqualBudget.of_smoa(r, k)
  alpha = _budgets.SCALE * budget.smoa_rank
  if method in ("lora", "hira"):
    rank = budget.lora_rank  # r (in + out) / K parameters
    config = (LoRAOp(n_in, n_out, rank, alpha / rank) if method == "lora" else
              SMoAOp(ops.BlockLayout((n_in,), (n_out,), (rank,)), alpha / rank))
    return (lambda p: config.delta(kernel, p[0], p[1], None)), config.init_factors
  permuted = method in ("smoa", "blocks-spectral")
  modulated = method in ("smoa", "smoa-noperm")
  blocks = spectral.spectral_blocks(kernel, k) if permuted else spectral.identity_blocks(n_in, n_out, k)
  op = SMoAOp(ops.BlockLayout(blocks.in_sizes, blocks.out_sizes, split_sizes(r, k)), alpha / r)
  perms = (blocks.in_perm, blocks.out_perm) if permuted else None
  anchor = kernel if modulated else jnp.ones_like(kernel)

  def init(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = op.init_factors(key)
    if not modulated:  # unmodulated blocks: scale a so the update starts on W's scale, like SMoA's
      a = a * float(np.abs(w).mean())
    return a, b

  return (lambda p: op.delta(anchor, p[0], p[1], perms)), init


def make_fitter(delta_fn: Callable, steps: int) -> Callable:
  """``fit(params, target, lr) -> (relative error, dW)``: ``steps`` of Adam on the relative
  Frobenius error ``||dW - dW*||_F^2 / ||dW*||_F^2``, jitted once (target and lr are arguments)."""

  @jax.jit
  def fit(params, target: jax.Array, lr: jax.Array) -> tuple[jax.Array, jax.Array]:
    norm = jnp.sum(target ** 2)
    tx = optax.adam(lr)

    def loss(p):
      return jnp.sum((delta_fn(p) - target) ** 2) / norm

    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return jnp.sqrt(loss(p)), delta_fn(p)

  return fit


def run_fit(fit: Callable, params, target: np.ndarray, lr: float) -> tuple[float, jax.Array]:
  """One fit; a diverged one scores ``inf``."""
  err, dw = fit(params, jnp.asarray(target), jnp.float32(lr))
  err = float(err)
  return (err if np.isfinite(err) else float("inf")), dw


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the table, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  load_at_start = _common.load_average()
  parser = _common.benchmark_parser(MODULE, __doc__.split("\n\n")[0],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--r", type=int, default=8, help="total SMoA rank (LoRA/HiRA get r/K)")
  parser.add_argument("--num-blocks", type=int, default=2, help="K")
  parser.add_argument("--steps", type=int, default=400, help="Adam steps per fit")
  _common.add_run_flags(parser, quick="tiny sizes and steps (smoke test)",
                        no_write="print only; leave RESULTS.md alone")
  args = parser.parse_args(argv)
  try:
    budget = _budgets.EqualBudget.of_smoa(args.r, args.num_blocks)
  except ValueError as e:
    parser.error(str(e))
  steps = 30 if args.quick else args.steps
  lrs = (3e-3, 3e-2) if args.quick else (1e-3, 3e-3, 1e-2, 3e-2)
  test_seeds, val_seeds = ((0,), (100,)) if args.quick else ((0, 1, 2), (100, 101))
  rng = np.random.default_rng(0)
  kernels = {"random 96x160" if args.quick else "random 576x576":
             (rng.standard_normal((96, 160) if args.quick else (576, 576)) / 24).astype(np.float32)}
  kernels.update(real_kernels(limit_shapes=args.quick) if not args.quick else {})
  r, k = args.r, args.num_blocks
  rows = []
  for kernel_name, w in kernels.items():
    fitters = {}
    for method in METHODS:
      delta_fn, init = method_delta(method, w, r, k)
      fitters[method] = make_fitter(delta_fn, steps), init
    for target_kind in TARGETS:
      results = {}
      for method in METHODS:
        fit, init = fitters[method]
        val = {lr: statistics.mean(run_fit(fit, init(jax.random.key(s)),
                                           make_target(target_kind, w, s), lr)[0]
                                   for s in val_seeds) for lr in lrs}
        best = min(val, key=val.get)
        runs = [run_fit(fit, init(jax.random.key(s)), make_target(target_kind, w, s), best)
                for s in test_seeds]
        errs = [e for e, _ in runs]
        std = statistics.stdev(errs) if len(errs) > 1 else 0.0  # sample std over the test seeds
        results[method] = (statistics.mean(errs), std, best, effective_rank(runs[0][1]))
        print(f"{kernel_name:26s} {target_kind:12s} {method:16s} err {results[method][0]:.4f} "
              f"+- {results[method][1]:.4f} (lr {best:g}, eff. rank {results[method][3]:.1f})",
              flush=True)
      winner = min(results, key=lambda m: results[m][0])
      for method, (mean, std, lr, erank) in results.items():
        rows.append([kernel_name, target_kind, method, f"{mean:.4f}", f"{std:.4f}", f"{lr:g}",
                     f"{erank:.1f}", "**best**" if method == winner else ""])
  n_params = budget.lora_rank * sum(next(iter(kernels.values())).shape)
  body = (f"Relative error ``||dW - dW*||_F / ||dW*||_F`` after {steps} Adam steps (mean and sample "
          f"std over {len(test_seeds)} test seeds; lr chosen on {len(val_seeds)} validation seeds from "
          f"{list(lrs)}). Budget: SMoA r={r}, K={k}; LoRA/HiRA rank {budget.lora_rank}; all "
          f"methods train r (in+out)/K parameters (e.g. {n_params:,} for the first kernel). "
          "'eff. rank' is the "
          "effective rank of the fitted dW (first test seed).\n\n"
          + _common.markdown_table(["kernel", "target", "method", "rel. error", "std", "lr",
                                    "eff. rank", ""], rows))
  _common.publish("quality_synthetic", "Quality: fitting a high-rank update (synthetic)", body,
                  module=MODULE, argv=argv, write=not args.no_write, load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  main()
