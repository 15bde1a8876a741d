"""Memory of an SMoA fine-tuning run, derived from the model code (nothing is allocated).

The model is built abstractly (``nnx.eval_shape``) from a Hugging Face config, adapters are
injected abstractly, and the optimizer state is ``jax.eval_shape`` of the real optimizer of
:func:`smoa_jax.train`; every shape and dtype comes from that code. Per-device numbers use the
sharding plan (:func:`smoa_jax.sharding_plan`) of the given mesh, fallbacks included.

Counted: frozen base weights, adapter factors (stored zero-padded), spectral permutations,
gradients of the trainable arrays (live during the step), AdamW moments and count. Not counted
by the default report: activations, XLA temporaries, and the one-off spectral preprocessing
buffers (one chunk of kernels at a time).

Activations (``--table``, ``--validate``): a formula for the bytes a training step keeps for
the backward pass of a Llama-class decoder (hidden ``h``, intermediate ``I``, ``N`` query and
``Kv`` key/value heads of size ``d``, ``L`` layers, vocabulary ``V``) on ``b`` sequences of ``T``
tokens per device, activations in the base dtype (``e`` bytes), attention scores and logits in
float32::

    per layer and token, remat "none":
      A = 1.56 e (4h + (2N + 2Kv) d + 3I) + 2.38 * 4 N T
    F = e * sum over the adapted kernels of d_in d_out   (each layer's folded W + dW, SMoA)
    remat "none":  L (b T A + F)
    remat "full":  L b T e h  +  b T A + F           (each layer's input, one layer recomputed)
    remat "dots":  L (b T e (3h + (N + 2Kv) d + 2I) + F)  +  b T A
    head, always:  2 b T V 4                          (float32 logits and their gradient)

The counted tensors of ``A`` are the layer input, the two norm outputs, q/k/v and the attention
output, gate/up and their product, and the ``(T x T)`` attention scores of every head. Their two
factors, 1.56 and 2.38 (float32 copies of the scores: logits, masked logits, probabilities, as
XLA keeps them), are fitted to XLA's buffer assignment of the real SmolLM2-135M step without
remat at T = 512 and 1024 (``benchmarks/remat.py``); every other measured row is a prediction
(``--validate``; docs/scale_out.md section 8). The attention term assumes this library's XLA
attention, which materialises the scores; a fused (flash) attention kernel drops it. Batches are
split over ``data x fsdp``, so ``b`` is the per-device batch; weights and optimizer state are
divided by the mesh (the sharding plan).

Usage::

    python scripts/memory_estimate.py                          # Llama-2-7B, bf16 base, 1 device
    python scripts/memory_estimate.py --mesh fsdp=8            # the same, per device on 8 devices
    python scripts/memory_estimate.py --config path/to/config.json --r 16 --num-blocks 4
    python scripts/memory_estimate.py --table                  # Llama 3 1B / 8B / 70B projections
    python scripts/memory_estimate.py --validate               # the formula against SmolLM2
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
from smoa_jax.models.blocks import check_remat
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

# Llama 3 shapes (meta-llama config.json, the fields the model reads).
_LLAMA_3 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "num_key_value_heads": 8,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
LLAMA_3_2_1B = {**_LLAMA_3, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 16, "num_attention_heads": 32, "head_dim": 64,
                "tie_word_embeddings": True,
                "rope_scaling": {**_LLAMA_3["rope_scaling"], "factor": 32.0}}
LLAMA_3_1_8B = {**_LLAMA_3, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "head_dim": 128,
                "tie_word_embeddings": False}
LLAMA_3_1_70B = {**_LLAMA_3, "hidden_size": 8192, "intermediate_size": 28672,
                 "num_hidden_layers": 80, "num_attention_heads": 64, "head_dim": 128,
                 "tie_word_embeddings": False}
PROJECTED = {"Llama 3.2 1B": LLAMA_3_2_1B, "Llama 3.1 8B": LLAMA_3_1_8B,
             "Llama 3.1 70B": LLAMA_3_1_70B}
TABLE_DTYPES = ("float32", "bfloat16")
TABLE_REMAT = ("none", "full")
TABLE_FSDP = (1, 8, 64)
# The measured step of benchmarks/remat.py: SMoA K=2 r=8 on these targets, batch 4, float32.
BENCH_TARGETS = _models.LLAMA_TARGETS
BENCH_SEQS = (512, 1024, 2048)


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
             param_dtype: Any = jnp.bfloat16, mesh_sizes: dict[str, int] | None = None,
             model: nnx.Module | None = None
             ) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
  """Rows ``(what, total bytes, bytes per device)`` (the last row is the sum) and parameter counts
  (``base``, ``trainable`` without padding). ``model``: the abstract model of ``hf_config``,
  ``adapter`` and ``param_dtype`` when already built (several meshes of one model)."""
  if model is None:
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


# Fitted to XLA's buffer assignment of SmolLM2-135M's step without remat (module docstring).
TENSOR_FACTOR = 1.56  # bytes kept per counted per-token tensor element
SCORE_COPIES = 2.38  # float32 copies of the (T x T) attention scores kept per head


def activation_bytes(hf_config: dict[str, Any], *, batch: int, seq: int, dtype: Any,
                     remat: str, targets: tuple[str, ...] = BENCH_TARGETS) -> int:
  """Bytes a training step keeps for its backward pass, per device (the module docstring's
  formula): ``batch`` sequences of ``seq`` tokens on the device, activations in ``dtype``,
  ``remat`` one of ``none``, ``full``, ``dots``, SMoA on ``targets``."""
  h, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
  heads, kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
  d = hf_config.get("head_dim") or h // heads
  layers, vocab = hf_config["num_hidden_layers"], hf_config["vocab_size"]
  e = jnp.dtype(dtype).itemsize
  tokens = batch * seq
  shapes = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d),
            "o_proj": (heads * d, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}
  folded = e * sum(shapes[t][0] * shapes[t][1] for t in targets)  # F
  per_token = (TENSOR_FACTOR * e * (4 * h + (2 * heads + 2 * kv) * d + 3 * inter)
               + SCORE_COPIES * 4 * heads * seq)  # A
  head = 2 * tokens * vocab * 4
  if check_remat(remat) == "none":
    body = layers * (tokens * per_token + folded)
  elif remat == "full":
    body = layers * tokens * e * h + tokens * per_token + folded
  else:
    body = (layers * (tokens * e * (3 * h + (heads + 2 * kv) * d + 2 * inter) + folded)
            + tokens * per_token)
  return int(body + head)


def projected_table(models: dict[str, dict[str, Any]], *, batch: int, seq: int,
                    fsdp: tuple[int, ...] = TABLE_FSDP) -> list[list[Any]]:
  """Rows ``[model, dtype, remat, fsdp, frozen, adapter + optimizer, activations, total]``
  (bytes per device) for every model, :data:`TABLE_DTYPES`, :data:`TABLE_REMAT` and ``fsdp``;
  SMoA K=2 r=8 on :data:`BENCH_TARGETS` (the measured benchmark's adapter), ``batch x seq``
  tokens per device."""
  adapter = _budgets.smoa_config(8, 2, BENCH_TARGETS)
  rows = []
  for name, config in models.items():
    for dtype in TABLE_DTYPES:
      model = _abstract_model(config, adapter, jnp.dtype(dtype))
      for ways in fsdp:
        sizes = {axis: 1 for axis in sharding.AXES} | {"fsdp": ways}
        est, _ = estimate(config, adapter, param_dtype=jnp.dtype(dtype), mesh_sizes=sizes,
                          model=model)
        frozen = est[0][2]
        trained = sum(r[2] for r in est[1:-1])  # factors, permutations, gradients, AdamW
        for remat in TABLE_REMAT:
          act = activation_bytes(config, batch=batch, seq=seq, dtype=dtype, remat=remat)
          rows.append([name, dtype, remat, ways, frozen, trained, act, frozen + trained + act])
  return rows


def validation_rows(*, batch: int = 4, seqs: tuple[int, ...] = BENCH_SEQS) -> list[list[Any]]:
  """Predicted step peak of benchmarks/remat.py (SmolLM2-135M, float32, SMoA K=2 r=8, one
  device) by sequence length and remat policy: ``[seq, remat, resident, activations, peak]``
  bytes, resident = weights + factors + permutations + gradients + AdamW state."""
  adapter = _budgets.smoa_config(8, 2, BENCH_TARGETS)
  est, _ = estimate(_models.SMOLLM2_CONFIG, adapter, param_dtype=jnp.float32)
  resident = est[-1][2]
  rows = []
  for seq in seqs:
    for remat in ("none", "full", "dots"):
      act = activation_bytes(_models.SMOLLM2_CONFIG, batch=batch, seq=seq, dtype=jnp.float32,
                             remat=remat)
      rows.append([seq, remat, resident, act, resident + act])
  return rows


def _gib(nbytes: int) -> str:
  return f"{nbytes / _common.GIB:,.3f}"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", type=Path, help="a Hugging Face config.json (default: Llama-2-7B)")
  parser.add_argument("--r", type=int, default=16, help="total adapter rank")
  parser.add_argument("--num-blocks", type=int, default=4, help="SMoA blocks K")
  parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated module names")
  parser.add_argument("--mesh", default="", help="e.g. fsdp=8 or data=2,fsdp=2,tp=2")
  parser.add_argument("--dtype", default="bfloat16", help="storage dtype of the base weights")
  parser.add_argument("--table", action="store_true",
                      help="the projected table: Llama 3.2 1B, 3.1 8B, 3.1 70B; float32 and "
                           "bfloat16; remat none and full; fsdp 1, 8, 64 (per device, GiB)")
  parser.add_argument("--models", default=",".join(PROJECTED),
                      help="with --table: which of them, comma-separated")
  parser.add_argument("--batch", type=int, default=1,
                      help="with --table: sequences per device (default 1)")
  parser.add_argument("--seq", type=int, default=4096,
                      help="with --table: tokens per sequence (default 4096)")
  parser.add_argument("--validate", action="store_true",
                      help="the formula's step peak for benchmarks/remat.py (SmolLM2, batch 4)")
  args = parser.parse_args(argv)
  if args.table:
    names = args.models.split(",")
    unknown = [n for n in names if n not in PROJECTED]
    if unknown:
      parser.error(f"--models {unknown} unknown; choose from {', '.join(PROJECTED)}")
    rows = projected_table({n: PROJECTED[n] for n in names}, batch=args.batch, seq=args.seq)
    print(f"SMoA K=2 r=8 on {','.join(BENCH_TARGETS)}; {args.batch} x {args.seq} tokens per "
          "device; GiB per device")
    print(_common.markdown_table(
        ["model", "base dtype", "remat", "fsdp", "frozen weights", "adapter + optimizer",
         "activations", "total"],
        [[*r[:4], *map(_gib, r[4:])] for r in rows]))
    return
  if args.validate:
    print("SmolLM2-135M, float32, SMoA K=2 r=8, batch 4, one device; MiB (benchmarks/remat.py "
          "measures the same step)")
    print(_common.markdown_table(
        ["T", "remat", "resident", "activations", "predicted peak"],
        [[*r[:2], *map(_common.format_mib, r[2:])] for r in validation_rows()]))
    return
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
