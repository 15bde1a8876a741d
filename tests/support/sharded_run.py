"""SPMD checks that need several devices; run in a subprocess by tests/parallel/test_sharding.py and
tests/parallel/test_multiprocess.py (``python -m tests.support.sharded_run MODE CHECKPOINT OUT``).

The caller sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in the environment, so JAX
starts with N simulated CPU devices; the pytest process itself keeps one device.

Modes:
  meshes  (8 devices) for every mesh of MESHES (or those named, ``meshes:2x2x2,1x2x4``): load the
          checkpoint onto the mesh, check every base kernel's sharding, run TRAIN_STEPS SMoA steps
          and store losses and adapter params in OUT/<mesh>.npz; on the last mesh also check the
          scanned model's layouts and logits; then load the adapter saved on
          the first mesh onto the second, and resume the first mesh's step-2 orbax checkpoint on
          the second (OUT/resumed.npz).
  worker  (one of 2 processes with 4 devices each; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
          JAX_PROCESS_ID set): the same steps on the global (2, 2, 2) mesh; process 0 writes OUT.
  op      (8 devices; CHECKPOINT unused) the SMoA / HiRA op of one layer, and of a layer scanned
          over a stack of kernels, under meshes and kernel layouts that take every branch of its
          per-device forward and backward: outputs and gradients equal the unsharded ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import smoa_jax
from tests.support import xla
from tests.support.state import adapter_arrays, to_host

ROOT = Path(__file__).resolve().parents[2]
MESHES = ((8, 1, 1), (2, 2, 2), (1, 2, 4))
TRAIN_STEPS = 3
ADAPTER = dict(r=4, num_blocks=2, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
# Intended (Megatron) layout of every base kernel of the tiny Llama, by module name.
COLUMN, ROW = ("fsdp", "tp"), ("tp", "fsdp")
EXPECTED = {"embed_tokens": ROW, "q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN,
            "o_proj": ROW, "gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW,
            "lm_head": COLUMN}


def make_checkpoint(path: Path) -> str:
  """A tiny random Llama (``save_pretrained``) whose sharded dims all divide by 4."""
  import torch
  import transformers
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=False,
                                    max_position_embeddings=64)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return str(path)


def start(args: list[str], devices: int, env: dict[str, str] | None = None,
          cache_dir: Path | None = None, module: str = "tests.support.sharded_run") -> subprocess.Popen:
  """Start ``python -m MODULE ARGS`` with ``devices`` simulated CPU devices.

  ``cache_dir``: a JAX compilation cache, so programs compiled twice in the run compile once.
  """
  env = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla.with_devices(devices)}
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float, returncode: int = 0) -> list[str]:
  """Wait for every process and return their logs; when one does not exit with ``returncode``,
  or on a timeout, kill the others and raise with the logs."""
  try:
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
  except subprocess.TimeoutExpired:
    outputs = ["(timed out)"] * len(procs)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  failed = [(i, out) for i, (proc, out) in enumerate(zip(procs, outputs))
            if proc.returncode != returncode]
  if failed:
    raise AssertionError("\n".join(f"--- process {i} (exit {procs[i].returncode}, expected "
                                    f"{returncode}):\n{out[-6000:]}" for i, out in failed))
  return outputs


def token_data(n: int = 16, length: int = 8, vocab: int = 64) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  mask = np.ones((n, length), np.int32)
  mask[::3, length // 2:] = 0
  return {"input_ids": rng.integers(0, vocab, (n, length)).astype(np.int32), "attention_mask": mask}


def load(checkpoint: str, mesh=None) -> nnx.Module:
  """The tiny Llama (on ``mesh``) with SMoA adapters on every projection, seeded identically."""
  model = smoa_jax.from_hf(checkpoint, mesh=mesh)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(**ADAPTER), rngs=nnx.Rngs(1), verbose=False)
  return model


def train(model: nnx.Module, mesh=None, *, output_dir=None, resume: bool = False) -> list[float]:
  """TRAIN_STEPS SMoA steps (checkpoints at step 2 and at the end when ``output_dir`` is given)."""
  config = smoa_jax.TrainConfig(steps=TRAIN_STEPS, batch_size=8, learning_rate=2e-3, log_every=1,
                                save_every=2, seed=0, progress=False)
  result = smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(), config, mesh=mesh,
                          output_dir=output_dir, resume=resume)
  return [r["loss"] for r in result.history if r["split"] == "train"]


def reference(checkpoint: str) -> dict[str, np.ndarray]:
  """Losses and adapter params of the single-device run (no mesh)."""
  model = load(checkpoint)
  losses = train(model)
  return {"losses": np.asarray(losses), **adapter_arrays(model)}


def check_layout(model: nnx.Module, mesh) -> int:
  """Every base kernel sits on ``mesh`` as EXPECTED says (fitted), never replicated by mistake.

  Stacked kernels (scanned layers) have a replicated leading layer axis. Adapter factors follow
  their kernel's in/out axes; permutations are replicated. Returns the number of kernels checked.
  """
  checked = 0
  for path, var in nnx.to_flat_state(nnx.state(model)):
    names = [str(p) for p in path]
    owner = names[-2]
    if owner not in EXPECTED or names[-1] not in ("kernel", "embedding"):
      continue
    lead = (None,) * (len(var.shape) - 2)
    spec = lead + smoa_jax.parallel.sharding.fit_spec(EXPECTED[owner], var.shape[len(lead):], mesh)
    layout = var[...].sharding
    assert layout.is_equivalent_to(NamedSharding(mesh, P(*spec)), len(spec)), (path, layout, spec)
    split = [mesh.shape[a] for a in spec if a is not None]
    assert layout.is_fully_replicated == (np.prod(split) == 1), (path, layout)
    assert var.get_metadata("out_sharding") == spec, (path, var.get_metadata("out_sharding"))
    layer = model
    for name in path[:-1]:
      layer = layer[name] if isinstance(name, int) else getattr(layer, name)
    if isinstance(layer, smoa_jax.SMoADense):
      for factor, factor_spec in ((layer.lora_a, lead + (None, spec[-2], None)),
                                  (layer.lora_b, lead + (None, None, spec[-1]))):
        factor_spec = smoa_jax.parallel.sharding.fit_spec(factor_spec, factor.shape, mesh)
        assert factor[...].sharding.is_equivalent_to(
            NamedSharding(mesh, P(*factor_spec)), len(factor_spec)), (path, factor_spec)
      assert layer.in_perm[...].sharding.is_fully_replicated, path
    checked += 1
  return checked


def check_scanned(checkpoint: str, mesh, unrolled_logits: np.ndarray) -> None:
  """The scanned model on ``mesh``: stacked layouts, and (adapters are no-ops at step 0) the logits."""
  model = smoa_jax.from_hf(checkpoint, mesh=mesh, scan_layers=True)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(**ADAPTER), rngs=nnx.Rngs(1), verbose=False)
  assert check_layout(model, mesh) == 7 + 2
  np.testing.assert_allclose(to_host(logits(model)), unrolled_logits, atol=1e-5)


def logits(model: nnx.Module) -> jax.Array:
  data = token_data(n=8)
  return nnx.jit(lambda m, ids, mask: m(ids, mask))(model, data["input_ids"], data["attention_mask"])


def run_meshes(checkpoint: str, out: Path, shapes: tuple[tuple[int, int, int], ...] = MESHES) -> None:
  meshes = {shape: smoa_jax.make_mesh(*shape) for shape in shapes}
  trained = {}
  for shape, mesh in meshes.items():
    model = load(checkpoint, mesh)
    assert check_layout(model, mesh) == 2 * 7 + 2
    if shape == shapes[-1]:
      check_scanned(checkpoint, mesh, to_host(logits(model)))
    losses = train(model, mesh, output_dir=out / "x".join(map(str, shape)))
    assert check_layout(model, mesh) == 2 * 7 + 2  # training moved nothing
    np.savez(out / f"{'x'.join(map(str, shape))}.npz", losses=np.asarray(losses),
             **adapter_arrays(model))
    trained[shape] = model

  # A portable adapter saved on one mesh loads onto another (placed again by shard_model).
  (source, model), (target, _) = list(trained.items())[:2]
  smoa_jax.save_adapter(model, out / "adapter")
  fresh = load(checkpoint, meshes[target])
  smoa_jax.load_adapter(fresh, out / "adapter")
  smoa_jax.shard_model(fresh, meshes[target])
  check_layout(fresh, meshes[target])
  saved, loaded = adapter_arrays(model), adapter_arrays(fresh)
  assert saved.keys() == loaded.keys()
  for k in saved:
    np.testing.assert_array_equal(saved[k], loaded[k], err_msg=k)

  # The orbax train checkpoint of step 2 (written on the first mesh) resumes on the second: the
  # last step must reproduce the uninterrupted run.
  run = out / "x".join(map(str, source))
  shutil.rmtree(run / "checkpoints" / str(TRAIN_STEPS))
  resumed = load(checkpoint, meshes[target])
  losses = train(resumed, meshes[target], output_dir=run, resume=True)
  np.savez(out / "resumed.npz", losses=np.asarray(losses), **adapter_arrays(resumed))


def run_worker(checkpoint: str, out: Path) -> None:
  assert smoa_jax.initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.devices())
  mesh = smoa_jax.make_mesh(**smoa_jax.parse_mesh("data=2,fsdp=2,tp=2"))
  model = load(checkpoint, mesh)
  check_layout(model, mesh)
  losses = train(model, mesh, output_dir=out / "run")
  arrays = adapter_arrays(model)
  if smoa_jax.is_main_process():
    np.savez(out / "multiprocess.npz", losses=np.asarray(losses), **arrays)


# (mesh shape, kernel spec): fsdp only (block gradients on the gathered W), tp over the out or
# the in axis (dense local gradients), tp=2 < K=3 (block gradients of a piece), a tuple axis.
OP_LAYOUTS = (((1, 8, 1), ("fsdp", "tp")), ((1, 1, 8), ("fsdp", "tp")), ((1, 1, 8), ("tp", "fsdp")),
              ((2, 2, 2), ("tp", "fsdp")), ((1, 2, 4), (("fsdp", "tp"), None)))


def run_op_checks() -> None:
  """See the module docstring (mode ``op``); raises on the first mismatch."""
  from smoa_jax.parallel import sharding

  n_in, n_out, layers = 64, 48, 2
  kernels = jax.random.normal(jax.random.key(0), (layers, n_in, n_out))
  x = jax.random.normal(jax.random.key(1), (8, 4, n_in))
  dy = jax.random.normal(jax.random.key(2), (8, 4, n_out))
  for config in (smoa_jax.SMoAConfig(r=6, num_blocks=3, alpha=8),
                 smoa_jax.HiRAConfig(r=4, alpha=8)):
    blocks = (smoa_jax.spectral_blocks(kernels[0], config.num_blocks)
              if config.spectral_order else None)
    op = config.make_op(n_in, n_out, blocks)
    perms = (blocks.in_perm, blocks.out_perm) if blocks is not None else None
    a, _ = op.init_factors(jax.random.key(3))
    b = 0.1 * jax.random.normal(jax.random.key(4), op.b_shape)

    def grads(kernels, a, b, x, spec):
      def loss(a, b, x):
        def layer(h, kernel):  # the layers of a scanned model: the op inside lax.scan
          y = 0.5 * op.apply(h, None, kernel, a, b, perms, kernel_spec=spec)
          return jnp.concatenate([y, y[..., :n_in - n_out]], axis=-1), None
        h = jax.lax.scan(layer, x, kernels)[0]
        y = op.apply(x, None, kernels[0], a, b, perms, kernel_spec=spec)
        return jnp.sum(y * dy) + jnp.sum(h ** 2), y
      return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(a, b, x)

    expected = jax.jit(grads, static_argnums=4)(kernels, a, b, x, None)
    for shape, spec in OP_LAYOUTS:
      mesh = smoa_jax.make_mesh(*shape)
      def place(v, s):
        return sharding.place(v, sharding.named(mesh, sharding.fit_spec(s, v.shape, mesh)))
      args = (place(kernels, (None, *spec)), place(a, (None, spec[0], None)),
              place(b, (None, None, spec[1])), place(x, (sharding.BATCH_AXES, None, None)))
      with jax.set_mesh(mesh):
        found = jax.jit(grads, static_argnums=4)(*args, spec)
      for name, want, got in zip(("da", "db", "dx", "y"), jax.tree.leaves(expected),
                                 jax.tree.leaves(found)):
        want = np.asarray(want)  # float32 sums in another order: tolerance of the array's scale
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                   err_msg=f"{type(config).__name__} {shape} {spec}: {name}")
    print(f"{type(config).__name__}: {len(OP_LAYOUTS)} layouts match", flush=True)


if __name__ == "__main__":
  mode, checkpoint, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
  if mode == "op":
    run_op_checks()
  elif mode == "worker":
    run_worker(checkpoint, out)
  else:  # "meshes" or e.g. "meshes:2x2x2,1x2x4"
    _, _, chosen = mode.partition(":")
    shapes = tuple(tuple(map(int, s.split("x"))) for s in chosen.split(",")) if chosen else MESHES
    run_meshes(checkpoint, out, shapes)
