"""Generation on simulated multi-device CPU meshes; run in a subprocess by
tests/inference/test_sharded_generate.py (``python -m tests.inference._sharded_generate``).

The caller sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. On the tiny Llama of
tests/_sharded_run.py with SMoA adapters (random ``b``), greedy and sampled ids on every mesh,
unrolled and scanned, must equal the single-device ones; exits non-zero otherwise.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import smoa_jax
from tests import _sharded_run

PROMPTS = [[5, 7, 9], [11, 3, 60, 2, 8, 31, 4], [1, 2, 3, 4], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9]]


def load(checkpoint: str, mesh=None, scan: bool = False) -> nnx.Module:
  model = smoa_jax.from_hf(checkpoint, mesh=mesh, scan_layers=scan)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(**_sharded_run.ADAPTER), rngs=nnx.Rngs(1),
                         verbose=False, show_progress=False)
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    b = layer.lora_b[...]
    noise = 0.5 * np.random.default_rng(i).standard_normal(b.shape).astype(b.dtype)
    layer.lora_b[...] = jax.device_put(noise, b.sharding)
  return model


def generations(model: nnx.Module) -> tuple[list[list[int]], list[list[int]]]:
  greedy = smoa_jax.generate_ids(model, PROMPTS, max_new_tokens=12)
  sampled = smoa_jax.generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=20,
                                  seed=5)
  return greedy, sampled


def main() -> None:
  assert len(jax.devices()) == 8, jax.devices()
  directory = Path(tempfile.mkdtemp(prefix="smoa-generate-"))
  try:
    checkpoint = _sharded_run.make_checkpoint(directory)
    reference = generations(load(checkpoint))
    for shape in ((2, 2, 2), (1, 2, 4)):
      mesh = smoa_jax.make_mesh(*shape)
      for scan in (False, True) if shape == (1, 2, 4) else (False,):
        model = load(checkpoint, mesh, scan)
        assert model.model.embed_tokens.embedding[...].sharding.mesh.shape == mesh.shape
        assert generations(model) == reference, (shape, scan)
        print(f"mesh {shape} scan={scan}: same ids", flush=True)
  finally:
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  main()
