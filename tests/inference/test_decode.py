"""Token-level generation (smoa_jax/inference/decode.py) on tiny random models of every family:
greedy ids equal transformers' ``generate(do_sample=False)``, sampling is reproducible, EOS stops
each row, one program per bucket, and every kind of model (adapters, scanned layers, bfloat16)
generates what its merged / unrolled / float32 twin does."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import smoa_jax
from smoa_jax.inference import decode
from smoa_jax.inference.sampling import top_p_keep
from tests.support.hf import CAUSAL_VOCAB, family_params, tiny_causal_lm

# Of different lengths (left padding), and longer than the sliding windows (4) once generated.
PROMPTS = [[5, 7, 9], [11, 3, 60, 2, 8, 31, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
NEW = 10


# By default four families (different attention, norms, RoPE, fused kernels); the rest with -m slow.
@pytest.fixture(scope="module", params=family_params(("gemma3", "gpt2", "llama", "phi3")))
def family(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  return request.param, tiny_causal_lm(request.param, path), path


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """Sliding-window and full layers, tied embeddings: the family the model-kind tests use."""
  path = tmp_path_factory.mktemp("qwen2")
  return tiny_causal_lm("qwen2", path), path


def transformers_greedy(hf, prompt: list[int], new: int = NEW) -> list[int]:
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                      do_sample=False, max_new_tokens=new, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_greedy_ids_equal_transformers_for_a_padded_batch(family):
  name, hf, path = family
  ours = smoa_jax.generate_ids(smoa_jax.from_hf(path), PROMPTS, max_new_tokens=NEW)
  # Each row against transformers on the unpadded prompt alone: positions must be right per row.
  assert ours == [transformers_greedy(hf, p) for p in PROMPTS], name


def greedy(model, prompts=PROMPTS, **kwargs) -> list[list[int]]:
  return smoa_jax.generate_ids(model, prompts, max_new_tokens=NEW, **kwargs)


def with_adapter(path, config):
  model = smoa_jax.from_hf(path)
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(0), verbose=False, show_progress=False)
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):  # as if trained: b != 0
    b = layer.lora_b[...]
    layer.lora_b[...] = 0.5 * np.random.default_rng(i).standard_normal(b.shape).astype(b.dtype)
  return model


ADAPTERS = {
    "smoa": smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8.0,
                                target_modules=["q_proj", "v_proj", "up_proj"]),
    "lora": smoa_jax.LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"]),
    "hira": smoa_jax.HiRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"]),
}


@pytest.mark.parametrize("method", [m if m == "smoa" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(ADAPTERS)])  # one op interface: SMoA's is enough
def test_unmerged_adapters_generate_like_the_merged_model(qwen2, method):
  hf, path = qwen2
  model = with_adapter(path, ADAPTERS[method])
  before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
  ours = greedy(model)
  merged = greedy(smoa_jax.merge_and_unload(nnx.clone(model)))
  assert ours == merged
  assert ours != transformers_greedy_all(hf)  # the adapter changes what is generated
  # The caller's model is untouched: same arrays, adapters still unmerged and enabled.
  after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
  assert before.keys() == after.keys()
  assert all(np.array_equal(before[p], after[p]) for p in before)
  assert all(not layer.merged and not layer.disabled for _, layer in smoa_jax.adapter_layers(model))
  with smoa_jax.disable_adapter(model):
    assert greedy(model) == transformers_greedy_all(hf)


def test_one_fold_program_per_model_structure(qwen2):
  _, path = qwen2
  # Programs are cached per process: an adapter no other test uses, so the counts are exact.
  config = smoa_jax.SMoAConfig(r=2, num_blocks=2, alpha=4.0, target_modules=["k_proj", "o_proj"])
  model = with_adapter(path, config)
  start = decode.fold_traces()
  folded = decode.folded_copy(model)
  assert decode.fold_traces() == start + 1
  # Another model object of the same structure (other values) and the same model with its
  # adapters disabled (the base kernels, a structure of its own): one new program in all.
  other = with_adapter(path, config)
  pairs = smoa_jax.adapter_layers(other)
  pairs[0][1].lora_b[...] = 2 * pairs[0][1].lora_b[...]
  again = decode.folded_copy(other)
  assert decode.fold_traces() == start + 1
  with smoa_jax.disable_adapter(model):
    plain = decode.folded_copy(model)
    decode.folded_copy(model)
  assert decode.fold_traces() == start + 2
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                                  atol=1e-6)
  for (_, ours), (_, base), (_, layer) in zip(smoa_jax.adapter_layers(folded),
                                              smoa_jax.adapter_layers(plain),
                                              smoa_jax.adapter_layers(model)):
    assert ours.merged and not ours.disabled and base.merged and not base.disabled
    close(ours.kernel[...], layer.folded_kernel())
    np.testing.assert_array_equal(np.asarray(base.kernel[...]), np.asarray(layer.kernel[...]))
  # The program folds the values it is given, not those it was traced with.
  close(smoa_jax.adapter_layers(again)[0][1].kernel[...], pairs[0][1].folded_kernel())
  assert not any(layer.merged for _, layer in pairs + smoa_jax.adapter_layers(model))


def transformers_greedy_all(hf) -> list[list[int]]:
  return [transformers_greedy(hf, p) for p in PROMPTS]


def test_scanned_layers_generate_like_unrolled_ones(qwen2, tmp_path):
  hf, path = qwen2
  assert greedy(smoa_jax.from_hf(path, scan_layers=True)) == transformers_greedy_all(hf)
  unrolled = with_adapter(path, ADAPTERS["smoa"])
  smoa_jax.save_adapter(unrolled, tmp_path / "adapter")
  scanned = smoa_jax.from_hf(path, scan_layers=True)
  smoa_jax.load_adapter(scanned, tmp_path / "adapter")  # the same adapter, stacked
  assert greedy(scanned) == greedy(unrolled)


def test_bfloat16_weights_generate(qwen2):
  _, path = qwen2
  model = smoa_jax.from_hf(path, dtype=jnp.bfloat16)
  assert model.init_cache(1, 8).dtype == jnp.bfloat16
  out = greedy(model)
  assert [len(row) for row in out] == [NEW] * len(PROMPTS)
  assert all(0 <= t < CAUSAL_VOCAB for row in out for t in row)


def sampler(qwen2):
  """The qwen2 model and ``sample(prompts, **kw)``: its ids at temperature 1.5."""
  model = smoa_jax.from_hf(qwen2[1])
  return model, lambda prompts, **kw: smoa_jax.generate_ids(model, prompts, max_new_tokens=NEW,
                                                            temperature=1.5, **kw)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(qwen2):
  model, sample = sampler(qwen2)
  first = sample(PROMPTS, seed=3)
  assert sample(PROMPTS, seed=3) == first
  assert sample(PROMPTS, seed=4) != first
  assert first != greedy(model)
  assert sample(PROMPTS, seed=3, top_k=1) == greedy(model)


@pytest.mark.slow  # one program per sampling setting; the default run checks seeds and top_k=1
def test_sampling_draws_per_row_and_top_p_limits_reduce_to_greedy(qwen2):
  model, sample = sampler(qwen2)
  first = sample(PROMPTS, seed=3)
  # A row's draws depend on the seed and its row, not on the other prompts of the batch.
  assert sample([PROMPTS[0], [40, 41], PROMPTS[2]], seed=3)[0] == first[0]
  assert sample(PROMPTS, seed=3, batch_size=2) == first
  assert sample(PROMPTS, seed=3, top_p=1e-6) == greedy(model)
  assert sample(PROMPTS, seed=3, top_k=5, top_p=0.9) == sample(PROMPTS, seed=3, top_k=5,
                                                                top_p=0.9)


def test_top_p_keeps_what_transformers_keeps():
  logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32) * 3
  for p in (0.05, 0.3, 0.8, 0.99):
    warper = transformers.generation.logits_process.TopPLogitsWarper(p)
    reference = np.isfinite(warper(None, torch.tensor(logits)).numpy())
    order = np.argsort(-logits, axis=-1, kind="stable")
    keep_sorted = np.asarray(top_p_keep(jnp.asarray(np.take_along_axis(logits, order, -1)), p))
    ours = np.zeros_like(reference)
    np.put_along_axis(ours, order, keep_sorted, axis=-1)
    np.testing.assert_array_equal(ours, reference)


def test_eos_stops_each_row_on_its_own(qwen2):
  _, path = qwen2
  model = smoa_jax.from_hf(path)
  free = greedy(model)
  # An id that some row first generates at a step k >= 1: that row must stop there, mid-way.
  row, k, eos = next((r, k, t) for r, ids in enumerate(free) for k, t in enumerate(ids)
                     if k >= 1 and t not in ids[:k])
  out = greedy(model, eos_token_ids=[eos])
  assert out[row] == free[row][:k + 1]  # stops after its EOS, which it keeps
  for ids, new in zip(free, out):  # every row on its own
    assert new == (ids[:ids.index(eos) + 1] if eos in ids else ids)
  # All rows stopping ends the loop: one prompt that emits EOS first thing.
  assert greedy(model, [PROMPTS[0]], eos_token_ids=[free[0][0]]) == [[free[0][0]]]


def test_one_program_per_batch_size_and_bucket(qwen2):
  _, path = qwen2
  model = smoa_jax.from_hf(path)
  smoa_jax.generate_ids(model, [[1, 2, 3], [4, 5]], max_new_tokens=5)
  start = decode.traces()
  # Other prompt lengths in the same bucket (<= 16), other max_new_tokens in the same (<= 8),
  # another model object of the same structure: no new program.
  smoa_jax.generate_ids(model, [[1] * 16, [4, 5, 6]], max_new_tokens=8)
  smoa_jax.generate_ids(smoa_jax.from_hf(path), [[9], [8, 7]], max_new_tokens=3)
  assert decode.traces() == start
  smoa_jax.generate_ids(model, [[1] * 17, [4]], max_new_tokens=3)  # prompt bucket 32
  smoa_jax.generate_ids(model, [[1, 2], [4]], max_new_tokens=9)  # new-token bucket 16
  assert decode.traces() == start + 2
  assert decode.bucket(1, 16) == 16 and decode.bucket(17, 16) == 32 and decode.bucket(9, 8) == 16


def test_streaming_reports_every_token_in_order(qwen2):
  _, path = qwen2
  model = smoa_jax.from_hf(path)
  seen = []
  out = smoa_jax.generate_ids(model, PROMPTS[:2], max_new_tokens=NEW, on_token=seen.append)
  assert np.stack(seen).T.tolist() == out
  assert out == greedy(model, PROMPTS[:2])
