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
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import smoa_jax
from smoa_jax.app import assets
from smoa_jax.models import build_model
from smoa_jax.training.loop import make_optimizer

# SmolLM2-135M(-Instruct) config.json, the fields the model reads.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "hidden_act": "silu",
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(scan_layers: bool) -> tuple[nnx.Module, str]:
  if assets.is_cached("smollm2"):
    return smoa_jax.from_hf(assets.cache_dir() / "smollm2", scan_layers=scan_layers), "cached weights"
  return build_model(SMOLLM2_135M, rngs=nnx.Rngs(0), scan_layers=scan_layers), "random weights"


def measure(scan_layers: bool, batch: int, seq_len: int, steps: int) -> dict[str, float]:
  model, source = load(scan_layers)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(r=16, num_blocks=4, alpha=32.0,
                                                    target_modules=TARGETS),
                         rngs=nnx.Rngs(1), verbose=False, show_progress=False)
  graphdef, params, rest = nnx.split(model, smoa_jax.TrainableParam, ...)
  tx, _ = make_optimizer(smoa_jax.TrainConfig(steps=steps, batch_size=batch), steps)
  opt_state = tx.init(params)
  task = smoa_jax.CausalLMTask()

  def step(params, opt_state, rest, batch):
    def loss_fn(params):
      loss, weight, _ = task.loss(nnx.merge(graphdef, params, rest, copy=True), batch)
      return loss / weight
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  ids = np.random.default_rng(0).integers(0, SMOLLM2_135M["vocab_size"], (batch, seq_len))
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
  return {"source": source, "trace_lower_s": traced - start, "compile_s": done - traced,
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
