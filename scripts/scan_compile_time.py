"""Compile time of one SMoA training step of SmolLM2-135M (30 layers): unrolled vs ``scan_layers``.

The step is the one :func:`smoa_jax.train` runs (loss, gradients of the adapter factors, AdamW
update), with SMoA on all seven projections of every layer. Uses the cached SmolLM2 weights when
``smoa-jax fetch-assets`` has fetched them, else random weights of the same config (compile time
does not depend on the values). Prints, per variant: tracing + lowering time, XLA compile time,
and the mean time of a few executed steps.

Usage::

    python scripts/scan_compile_time.py [--batch 4 --seq-len 128 --steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import smoa_jax
from smoa_jax.training.config import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared benchmark helpers
from benchmarks import _budgets, _models  # noqa: E402

TARGETS = _models.LLAMA_PROJECTIONS


def measure(scan_layers: bool, batch: int, seq_len: int, steps: int) -> dict[str, float]:
  model, real = _models.smollm2_model(scan_layers=scan_layers)
  smoa_jax.apply_adapter(model, _budgets.smoa_config(16, 4, TARGETS), rngs=nnx.Rngs(1),
                         verbose=False, show_progress=False)
  lr = smoa_jax.SMoAConfig.default_learning_rate
  tx, _ = make_optimizer(smoa_jax.TrainConfig(steps=steps, batch_size=batch, learning_rate=lr),
                         steps)
  step, params, rest = _models.train_step(model, smoa_jax.CausalLMTask(), tx)
  opt_state = tx.init(params)

  vocab_size = _models.SMOLLM2_CONFIG["vocab_size"]
  ids = np.random.default_rng(0).integers(0, vocab_size, (batch, seq_len))
  data = {"input_ids": jnp.asarray(ids, jnp.int32),
          "attention_mask": jnp.ones((batch, seq_len), jnp.int32)}
  start = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, rest, data)
  traced = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  params, opt_state, loss = compiled(params, opt_state, rest, data)  # warm-up
  jax.block_until_ready(loss)
  run_start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = compiled(params, opt_state, rest, data)
  jax.block_until_ready(loss)
  return {"source": "cached weights" if real else "random weights",
          "trace_lower_s": traced - start, "compile_s": done - traced,
          "step_s": (time.perf_counter() - run_start) / steps, "loss": float(loss)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  print(f"SmolLM2-135M, 30 layers, SMoA r=16 K=4 on {len(TARGETS)} projections per layer, batch "
        f"{args.batch} x {args.seq_len} tokens, {jax.devices()[0].platform}")
  for scan_layers in (False, True):
    r = measure(scan_layers, args.batch, args.seq_len, args.steps)
    print(f"{'scan_layers' if scan_layers else 'unrolled':12s} ({r['source']}): trace+lower "
          f"{r['trace_lower_s']:6.1f} s, compile {r['compile_s']:6.1f} s, step {r['step_s']:6.2f} s, "
          f"loss {r['loss']:.4f}", flush=True)


if __name__ == "__main__":
  main()
