"""The JAX worker process of benchmarks/model_step.py (``python -m benchmarks._step_jax``).

Never imports PyTorch. Commands (:mod:`benchmarks._procs`): ``build`` loads the model, compiles
every JAX candidate (:func:`benchmarks.model_step.jax_step`), the merged and base forwards, and
writes the SMoA layers' blocks and factors (:func:`benchmarks._models.authors_spec`) to
``<workdir>/K{k}.npz`` for the PyTorch worker's authors models; it answers what each step holds
(trainable scalars, memory, XLA's cost analysis) and whether the merged forward compiled to the
base forward's program. ``round`` times one interleaved round.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

import smoa_jax
from benchmarks import _models, _procs
from benchmarks.model_step import FROZEN_PATTERN, JaxStep, candidates, jax_forward, jax_step


def export_specs(model: nnx.Module, path: Path) -> None:
  """Every adapter layer's :func:`benchmarks._models.authors_spec`, keyed
  ``"<module path>/<field>"``, to the ``.npz`` file ``path``."""
  np.savez(path, **{f"{p}/{field}": value for p, layer in smoa_jax.adapter_layers(model)
                    for field, value in _models.authors_spec(layer).items()})


def build(handlers: dict[str, Callable[..., Any]], *, model_dir: str, workdir: str,
          ids: list[list[int]], r: int, p: int, ks: Sequence[int], seed: int,
          quick: bool, goals_only: bool) -> dict[str, Any]:
  def log(text: str) -> None:
    print(f"[jax] {text}", file=sys.stderr, flush=True)

  with _models.fast_compile(quick):
    tokens = jnp.asarray(np.array(ids, dtype=np.int32))
    data = {"input_ids": tokens, "attention_mask": jnp.ones_like(tokens)}
    base = smoa_jax.from_hf(model_dir)
    steps: dict[str, JaxStep] = {}
    blocks: dict[int, dict[str, Any]] = {}  # K -> spectral blocks by module path (computed once)
    merged = None
    for cand in candidates(p, r, ks, goals_only):
      model = nnx.clone(base)
      if cand.config is None:
        smoa_jax.mark_trainable(model, FROZEN_PATTERN)
      else:
        k = getattr(cand.config, "num_blocks", None)
        smoa_jax.apply_adapter(model, cand.config, rngs=nnx.Rngs(seed), verbose=False,
                               show_progress=False, blocks=blocks.get(k))
        if isinstance(cand.config, smoa_jax.SMoAConfig) and k not in blocks:
          blocks[k] = {path: layer.blocks for path, layer in smoa_jax.adapter_layers(model)}
        _models.randomize_lora_b(model, seed + 1)
        if cand.name in {f"SMoA K={k} r={r}" for k in ks}:
          export_specs(model, Path(workdir) / f"K{k}.npz")
        if cand.name == f"SMoA K=2 r={r}":
          merged = smoa_jax.merge_and_unload(nnx.clone(model))
      steps[cand.name] = jax_step(model, data)
      log(f"compiled {cand.name}")
    group: dict[str, Callable[[], Any]] = {name: s.run for name, s in steps.items()}
    group["merged fwd"], merged_program = jax_forward(merged, data)
    group["base fwd"], base_program = jax_forward(base, data)
  handlers["round"] = _procs.round_handler(group)
  return {"merged_is_base": merged_program == base_program,
          **{name: {"trainable": s.trainable, "optimizer": s.optimizer_bytes,
                    "resident": s.resident_bytes, "step": s.step_bytes, "xla_flops": s.xla_flops,
                    "xla_bytes": s.xla_bytes} for name, s in steps.items()}}


if __name__ == "__main__":
  _procs.run_worker(build)
