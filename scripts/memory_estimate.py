"""Memory of an SMoA fine-tuning run, derived from the model code (nothing is allocated).

The model is built abstractly (``nnx.eval_shape``) from a Hugging Face config, adapters are
injected abstractly, and the optimizer state is ``jax.eval_shape`` of the real optimizer of
:func:`smoa_jax.train`; every shape and dtype comes from that code. Per-device numbers use the
sharding plan (:func:`smoa_jax.sharding_plan`) of the given mesh, fallbacks included.

Counted: frozen base weights, adapter factors (stored zero-padded), spectral permutations,
gradients of the trainable arrays (live during the step), AdamW moments and count. Not
counted: activations (they scale with batch x sequence length and the remat policy), XLA
temporaries, and the one-off spectral preprocessing buffers (one chunk of kernels at a time).

Usage::

    python scripts/memory_estimate.py                          # Llama-2-7B, bf16 base, 1 device
    python scripts/memory_estimate.py --mesh fsdp=8            # the same, per device on 8 devices
    python scripts/memory_estimate.py --config path/to/config.json --r 16 --num-blocks 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

import smoa_jax
from smoa_jax.parallel import sharding
from smoa_jax.models import build_model
from smoa_jax.training.config import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared benchmark helpers
from benchmarks import _budgets, _common, _models  # noqa: E402

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json, the fields the model reads).
LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu",
}
TARGETS = _models.LLAMA_PROJECTIONS


def _abstract_model(hf_config: dict[str, Any], adapter: smoa_jax.AdapterConfig,
                    param_dtype: Any) -> nnx.Module:
  """The model with adapters, all arrays abstract (identity blocks: SMoA shapes do not depend on W)."""
  def build() -> nnx.Module:
    model = build_model(hf_config, dtype=param_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    blocks = {}
    if isinstance(adapter, smoa_jax.SMoAConfig):
      for path, layer in nnx.iter_graph(model):
        if isinstance(layer, nnx.Linear) and str(path[-1]) in adapter.target_modules:
          blocks["/".join(map(str, path))] = smoa_jax.identity_blocks(
              *layer.kernel.shape, adapter.num_blocks)
    smoa_jax.apply_adapter(model, adapter, rngs=nnx.Rngs(1), verbose=False, blocks=blocks)
    return model
  return nnx.eval_shape(build)


def _keys(path: tuple[Any, ...]) -> list[str]:
  """A pytree key path as names: ``model``, ``layers``, ``0``, ... (a Variable's ``value`` dropped)."""
  names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return names[:-1] if names and names[-1] == "value" else names


def _bytes(tree: Any, specs: dict[str, tuple], mesh: AbstractMesh) -> tuple[int, int]:
  """``(total bytes, bytes on one device)`` of the arrays of ``tree``; ``specs`` by ``/``-path."""
  total = per_device = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    nbytes = _common.array_nbytes(leaf)
    total += nbytes
    spec = specs.get("/".join(_keys(path)))
    ways = 1 if spec is None else int(np.prod([sharding.axis_size(mesh, e) for e in spec]))
    per_device += nbytes // ways
  return total, per_device


def estimate(hf_config: dict[str, Any], adapter: smoa_jax.AdapterConfig, *,
             param_dtype: Any = jnp.bfloat16, mesh_sizes: dict[str, int] | None = None
             ) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
  """Rows ``(what, total bytes, bytes per device)`` (the last row is the sum) and parameter counts
  (``base``, ``trainable`` without padding)."""
  model = _abstract_model(hf_config, adapter, param_dtype)
  mesh_sizes = mesh_sizes or {axis: 1 for axis in sharding.AXES}
  mesh = AbstractMesh(tuple(mesh_sizes[a] for a in sharding.AXES), sharding.AXES)
  plan = smoa_jax.sharding_plan(model, mesh)
  trainable = nnx.state(model, smoa_jax.TrainableParam)
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(smoa_jax.TrainableParam)))
  perms = nnx.state(model, smoa_jax.SpectralIndex)
  tx, _ = make_optimizer(smoa_jax.TrainConfig(
      steps=1, batch_size=1, learning_rate=smoa_jax.SMoAConfig.default_learning_rate), 1)
  opt_state = jax.eval_shape(tx.init, trainable)
  # Moments are laid out like their params (train() keeps them there); scalars are replicated.
  moments = {f"{prefix}/{name}": spec for name, spec in plan.items()
             for prefix in ("mu", "nu")}
  rows = [
      (f"base weights ({jnp.dtype(param_dtype).name})", *_bytes(base, plan, mesh)),
      ("adapter factors (float32, padded)", *_bytes(trainable, plan, mesh)),
      ("spectral permutations (int32)", *_bytes(perms, plan, mesh)),
      ("gradients of the factors (float32)", *_bytes(trainable, plan, mesh)),
      ("AdamW state (float32 mu, nu; count)", *_bytes(_moments_by_path(opt_state), moments, mesh)),
  ]
  rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
  counts = {"base": _common.tree_size(base),
            "trainable": sum(layer.num_trainable_params for _, layer in smoa_jax.adapter_layers(model))}
  return rows, counts


def _moments_by_path(opt_state: Any) -> dict[str, Any]:
  """Optimizer leaves keyed ``mu/<param path>`` / ``nu/<param path>`` (others by position)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = _keys(path)
    moment = next((k for k in keys if k in ("mu", "nu")), None)
    rest = keys[keys.index(moment) + 1:] if moment else keys
    out[f"{moment}/{'/'.join(rest)}" if moment else "/".join(keys)] = leaf
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", type=Path, help="a Hugging Face config.json (default: Llama-2-7B)")
  parser.add_argument("--r", type=int, default=16, help="total adapter rank")
  parser.add_argument("--num-blocks", type=int, default=4, help="SMoA blocks K")
  parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated module names")
  parser.add_argument("--mesh", default="", help="e.g. fsdp=8 or data=2,fsdp=2,tp=2")
  parser.add_argument("--dtype", default="bfloat16", help="storage dtype of the base weights")
  args = parser.parse_args(argv)
  hf_config = json.loads(args.config.read_text()) if args.config else LLAMA_2_7B
  adapter = _budgets.smoa_config(args.r, args.num_blocks, args.targets.split(","))
  sizes = smoa_jax.parse_mesh(args.mesh)
  rows, counts = estimate(hf_config, adapter, param_dtype=jnp.dtype(args.dtype), mesh_sizes=sizes)
  devices = int(np.prod(list(sizes.values())))
  name = args.config or "Llama-2-7B"
  print(f"{name}: SMoA r={args.r} K={args.num_blocks} on {args.targets}; mesh "
        f"{','.join(f'{k}={v}' for k, v in sizes.items())} ({devices} device(s))")
  print(f"parameters: base {counts['base']:,}, trainable {counts['trainable']:,} "
        f"({100 * counts['trainable'] / counts['base']:.3f}%)")
  print(f"{'':40s} {'total GiB':>10s} {'per device GiB':>15s}")
  for what, total, per_device in rows:
    print(f"{what:40s} {total / _common.GIB:10.3f} {per_device / _common.GIB:15.3f}")


if __name__ == "__main__":
  main()
