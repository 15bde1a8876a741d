"""Generation on simulated multi-device CPU meshes; run in a subprocess by
tests/inference/test_sharded_generate.py (``python -m tests.support.sharded_generate``).

The caller sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The tiny Llama of
tests/sharded_run.py gets SMoA adapters (random ``b``) on one device; the same adapter loaded onto
the model laid out on meshes, unrolled (2x2x2) and scanned (1x2x4), must give the same greedy and
sampled ids; fails otherwise.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import smoa_jax
from tests.support import sharded_run

PROMPTS = [[5, 7, 9], [11, 3, 60, 2, 8, 31, 4], [1, 2, 3, 4], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9]]


def adapted(checkpoint: str) -> nnx.Module:
  """The single-device tiny Llama with SMoA adapters whose ``b`` factors are random (trained)."""
  model = smoa_jax.from_hf(checkpoint)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(**sharded_run.ADAPTER), rngs=nnx.Rngs(1),
                         verbose=False, show_progress=False)
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    b = layer.lora_b[...]
    layer.lora_b[...] = 0.5 * np.random.default_rng(i).standard_normal(b.shape).astype(b.dtype)
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
    checkpoint = sharded_run.make_checkpoint(directory)
    reference_model = adapted(checkpoint)
    smoa_jax.save_adapter(reference_model, directory / "adapter")
    reference = generations(reference_model)
    for shape, scan in (((2, 2, 2), False), ((1, 2, 4), True)):
      mesh = smoa_jax.make_mesh(*shape)
      model = smoa_jax.from_hf(checkpoint, mesh=mesh, scan_layers=scan)
      smoa_jax.load_adapter(model, directory / "adapter")  # the same adapter, laid out on the mesh
      assert model.model.embed_tokens.embedding[...].sharding.mesh.shape == mesh.shape
      assert generations(model) == reference, (shape, scan)
      print(f"mesh {shape} scan={scan}: same ids", flush=True)
  finally:
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  main()
