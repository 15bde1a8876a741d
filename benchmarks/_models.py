"""Models and training steps the benchmarks (and ``scripts/``) share.

SmolLM2-135M
    The benchmarks' Llama model: :func:`smollm2_model` (an ``nnx`` model) and
    :func:`smollm2_directory` (a Hugging Face directory, for PyTorch too) use the real weights when
    the asset is cached (``smoa-jax fetch-assets``), otherwise random weights of the same config,
    :data:`SMOLLM2_CONFIG`: speed, memory and compile time do not depend on the values.

Tiny models
    ``--quick`` smoke runs use :func:`tiny_llama_config` (every target kernel 32 x 32, so the eager
    set-up ops compile for a single shape) saved by :func:`save_random_model`, and compile with
    :func:`fast_compile`.

Training
    :func:`train_step` is the step :func:`smoa_jax.train` runs, without its extras (micro-batches,
    dropout keys, sharding): loss, gradients of the trainable arrays, optimizer update.
    :func:`randomize_lora_b` gives every adapter a non-zero update first, as after some training.

The authors' algorithm
    :func:`authors_spec` writes an SMoA layer's blocks and factors as NumPy arrays in the
    authors' torch layout, from which :class:`benchmarks.authors_torch.AuthorsSMoALinear` is
    built in a process without JAX.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import smoa_jax
from benchmarks import _common

__all__ = [
    "LLAMA_TARGETS",
    "LLAMA_PROJECTIONS",
    "SMOLLM2_CONFIG",
    "tiny_llama_config",
    "save_random_model",
    "measure_logged",
    "save_random_llama",
    "smollm2_model",
    "smollm2_directory",
    "fast_compile",
    "randomize_lora_b",
    "train_step",
    "authors_spec",
]

# The SMoA targets of the benchmarks' Llama runs, and all seven projections of a Llama layer.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# SmolLM2-135M(-Instruct)'s config.json, the fields the models read.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "hidden_act": "silu",
}


def tiny_llama_config(vocab_size: int = 256, max_position_embeddings: int = 64
                      ) -> dict[str, Any]:
  """A one-layer Llama config.json whose target kernels are all 32 x 32 (``--quick`` runs);
  chat-templated rows need ``max_position_embeddings`` of 256."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
      "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
      "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
      "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5,
      "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "hidden_act": "silu",
  }


def save_random_model(model_cls: Any, config: Any, directory: Path, seed: int = 0) -> Path:
  """A randomly initialised transformers ``model_cls(config)`` saved in HF format to ``directory``."""
  import torch

  torch.manual_seed(seed)
  model_cls(config).save_pretrained(str(directory))
  return directory


def save_random_llama(config: dict[str, Any], directory: Path, seed: int = 0) -> Path:
  """A randomly initialised ``LlamaForCausalLM`` of a config.json dict, saved to ``directory``."""
  import transformers

  return save_random_model(transformers.LlamaForCausalLM,
                           transformers.LlamaConfig.from_dict(config), directory, seed)


def smollm2_model(*, scan_layers: bool = False) -> tuple[nnx.Module, bool]:
  """SmolLM2-135M as an ``nnx`` model, and whether its weights are the real ones (else random)."""
  from smoa_jax.app import assets
  from smoa_jax.models import build_model

  if assets.is_cached("smollm2"):
    return smoa_jax.from_hf(assets.fetch_smollm2(), scan_layers=scan_layers), True
  return build_model(SMOLLM2_CONFIG, rngs=nnx.Rngs(0), scan_layers=scan_layers), False


def smollm2_directory(workdir: Path) -> tuple[Path, bool]:
  """SmolLM2-135M as a Hugging Face directory (random weights saved under ``workdir`` when the
  asset is not cached), and whether its weights are the real ones."""
  from smoa_jax.app import assets

  if assets.is_cached("smollm2"):
    return assets.fetch_smollm2(), True
  return save_random_llama(SMOLLM2_CONFIG, workdir / "smollm2-random"), False


@contextlib.contextmanager
def fast_compile(enabled: bool) -> Iterator[None]:
  """With ``enabled`` (``--quick``), XLA skips most optimizations while inside: the smoke test's
  tiny programs compile about twice as fast (its numbers mean nothing anyway)."""
  name = "jax_disable_most_optimizations"
  previous = jax.config.values[name]
  jax.config.update(name, enabled or previous)
  try:
    yield
  finally:
    jax.config.update(name, previous)


def measure_logged(measure: Callable[[Any, Callable[[str], None]], Any], args: Any
                   ) -> tuple[Any, float]:
  """``(measure(args, log), load average at the start)``: ``log`` prints with the minutes
  elapsed, and ``--quick`` (``args.quick``) compiles under :func:`fast_compile`."""
  load_at_start = _common.load_average()
  with fast_compile(args.quick):
    return measure(args, _common.minutes_log(time.perf_counter())), load_at_start


def randomize_lora_b(model: nnx.Module, seed: int, scale: float = 0.01) -> None:
  """``b = scale * N(0, 1)`` in every adapter layer of ``model`` (or in ``model``, one layer).

  A fresh adapter's ``b`` is zero, so ``dW`` is zero and a benchmark could measure a shortcut; a
  small random ``b`` is what an adapter holds after some training. NumPy draws the values, so no
  JAX op is compiled per factor shape.
  """
  rng = np.random.default_rng(seed)
  for _, layer in smoa_jax.adapter_layers(model):
    b = layer.lora_b
    b[...] = jnp.asarray(scale * rng.standard_normal(b.shape), b.dtype)


def train_step(model: nnx.Module, task: Any, tx: optax.GradientTransformation
               ) -> tuple[Callable[..., Any], nnx.State, nnx.State]:
  """``(step, params, rest)``: one training step of ``task`` (``smoa_jax.CausalLMTask``, ...) over
  the model's trainable arrays.

  ``step(params, opt_state, rest, batch) -> (params, opt_state, loss)`` with ``loss`` the task's
  mean loss (``loss / weight``); ``params`` are the ``SMoAParam`` arrays (adapter factors,
  kernels made trainable), ``rest`` everything else (frozen). Jit it with
  ``donate_argnums=(0, 1)`` to update params and optimizer state in place.
  """
  graphdef, params, rest = nnx.split(model, smoa_jax.TrainableParam, ...)

  def step(params, opt_state, rest, batch):
    def loss_fn(params):
      loss, weight, _ = task.loss(nnx.merge(graphdef, params, rest, copy=True), batch)
      return loss / weight

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, params, rest


def authors_spec(layer: smoa_jax.SMoADense) -> dict[str, np.ndarray]:
  """An unmerged smoa_jax layer's blocks and current factors in the authors' (torch) layout, as
  NumPy arrays (``np.savez``-able): ``row_order``/``col_order`` (our ``out_perm``/``in_perm``),
  ``row_sizes``/``col_sizes``/``ranks`` per block, ``alpha``, ``dropout``, and
  ``lora_A_k (r_k, |C_k|)``/``lora_B_k (|R_k|, r_k)`` for each block k."""
  layout = layer.op.layout
  spec = {"row_order": np.array(layer.out_perm[...]), "col_order": np.array(layer.in_perm[...]),
          "row_sizes": np.array(layout.out_sizes), "col_sizes": np.array(layout.in_sizes),
          "ranks": np.array(layout.ranks), "alpha": np.array(layer.config.alpha),
          "dropout": np.array(layer.config.dropout)}
  for k, (a_k, b_k) in enumerate(layer.op.factor_blocks(layer.lora_a[...], layer.lora_b[...])):
    spec[f"lora_A_{k}"] = np.array(a_k).T
    spec[f"lora_B_{k}"] = np.array(b_k).T
  return spec
