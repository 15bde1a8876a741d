"""Tests for smoa_jax/layers/inject.py: targeting, reports, merging, disabling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.core import spectral
from tests.support.toy import ToyLM, token_data

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _ids():
  return jnp.asarray(token_data(4)["input_ids"])


def _perturb(model, seed=0):
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    layer.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(seed + i), layer.lora_b.shape)


def test_report_and_replacement(capsys):
  model = ToyLM()
  report = smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8, target_modules=TARGETS),
                                  rngs=nnx.Rngs(1))
  paths = [m.path for m in report.modules]
  assert "layers/0/self_attn/q_proj" in paths and "layers/1/mlp/down_proj" in paths
  assert len(paths) == 8 and not any("k_proj" in p or "lm_head" in p for p in paths)
  assert isinstance(model.layers[0].self_attn.q_proj, smoa_jax.SMoADense)
  assert isinstance(model.layers[0].self_attn.k_proj, nnx.Linear)
  # sum_k r_k (|C_k| + |R_k|): q_proj 16x16 -> 2*(8+8) * 2 blocks = 64
  q = next(m for m in report.modules if m.path == "layers/0/self_attn/q_proj")
  assert q.trainable_params == 64 and q.ranks == (2, 2) and q.num_blocks == 2
  stored = sum(x.size for x in jax.tree.leaves(nnx.state(model, smoa_jax.TrainableParam)))
  # 33 = 17 + 16 coordinates: the 16-row block of every 33-wide kernel is padded by one row/col.
  assert report.trainable_params == 648 and stored == 648 + 4 * 2
  out = capsys.readouterr().out
  assert "trainable params: 648" in out and "trainable%" in out
  assert "trainable params: 648 || all params:" in str(report)


def test_adapted_model_starts_as_the_base_model():
  base = ToyLM()
  model = ToyLM()
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8, target_modules=TARGETS),
                         rngs=nnx.Rngs(1), verbose=False)
  np.testing.assert_allclose(model(_ids()), base(_ids()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(target_modules=".*layers/1/.*_proj"), 6),
    (dict(target_modules=["self_attn/q_proj"]), 2),
    (dict(target_modules=TARGETS, exclude_modules=["up_proj"]), 6),
    (dict(target_modules=TARGETS, exclude_modules=".*layers/0/.*"), 4),
    (dict(target_modules=TARGETS, layers_to_transform=[1]), 4),
    (dict(target_modules=TARGETS, layers_to_transform=0), 4),
])
def test_selection(kwargs, expected):
  model = ToyLM()
  report = smoa_jax.apply_adapter(model, smoa_jax.LoRAConfig(r=2, alpha=4, **kwargs),
                                  rngs=nnx.Rngs(1), verbose=False)
  assert len(report.modules) == expected


def test_batched_spectral_blocks_equal_per_layer(capsys):
  model = ToyLM(layers=4)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8, target_modules=TARGETS),
                         rngs=nnx.Rngs(1), verbose=False, show_progress=True)
  assert "spectral blocks" in capsys.readouterr().err  # the progress bar
  for _, layer in smoa_jax.adapter_layers(model):
    expected = spectral.spectral_blocks(layer.kernel[...], 2)
    np.testing.assert_array_equal(layer.in_perm[...], expected.in_perm)
    np.testing.assert_array_equal(layer.out_perm[...], expected.out_perm)


@pytest.mark.parametrize("config", [smoa_jax.SMoAConfig(4, 2, 8, target_modules=TARGETS),
                                    smoa_jax.HiRAConfig(r=4, alpha=8, target_modules=TARGETS),
                                    smoa_jax.LoRAConfig(r=4, alpha=8, target_modules=TARGETS)],
                         ids=["smoa", "hira", "lora"])
def test_merge_and_unload_gives_plain_layers_with_same_logits(config):
  model = ToyLM()
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1), verbose=False)
  _perturb(model)
  logits = model(_ids())
  smoa_jax.merge_and_unload(model)
  assert not smoa_jax.adapter_layers(model)
  assert not jax.tree.leaves(nnx.state(model, smoa_jax.TrainableParam))
  assert type(model.layers[0].self_attn.q_proj) is nnx.Linear
  np.testing.assert_allclose(model(_ids()), logits, rtol=1e-5, atol=1e-5)
  # Merged inference costs what the base model costs: it is the very same program.
  assert _forward_hlo(model) == _forward_hlo(ToyLM())


def _forward_hlo(model: nnx.Module) -> str:
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)).lower(state, _ids()).as_text()


def test_merge_unmerge_and_disable_whole_model():
  base = ToyLM()
  model = ToyLM()
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8, target_modules=TARGETS),
                         rngs=nnx.Rngs(1), verbose=False)
  _perturb(model)
  logits = model(_ids())
  assert not np.allclose(logits, base(_ids()), atol=1e-3)
  with smoa_jax.disable_adapter(model):
    np.testing.assert_allclose(model(_ids()), base(_ids()), rtol=1e-6, atol=1e-6)
    with smoa_jax.disable_adapter(model):
      np.testing.assert_allclose(model(_ids()), base(_ids()), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model(_ids()), base(_ids()), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model(_ids()), logits, rtol=1e-6, atol=1e-6)
  with pytest.raises(KeyError, match="inside"), smoa_jax.disable_adapter(model):
    raise KeyError("inside")
  np.testing.assert_allclose(model(_ids()), logits, rtol=1e-6, atol=1e-6)
  smoa_jax.merge_adapters(model)
  np.testing.assert_allclose(model(_ids()), logits, rtol=1e-5, atol=1e-5)
  with smoa_jax.disable_adapter(model):  # merged + disabled: recovers W on the fly
    np.testing.assert_allclose(model(_ids()), base(_ids()), rtol=1e-4, atol=1e-4)
  smoa_jax.unmerge_adapters(model)
  for (_, layer), (_, linear) in zip(smoa_jax.adapter_layers(model),
                                     [(p, m) for p, m in nnx.iter_graph(base) if isinstance(m, nnx.Linear)
                                      and p[-1] in TARGETS]):
    np.testing.assert_allclose(layer.kernel[...], linear.kernel[...], rtol=1e-5, atol=1e-6)


def test_bf16_merged_logits_match_unmerged():
  model = ToyLM()
  for path, v in list(nnx.iter_graph(model)):
    if isinstance(v, nnx.Param):
      v.set_value(v[...].astype(jnp.bfloat16))
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8, target_modules=TARGETS),
                         rngs=nnx.Rngs(1), verbose=False)
  _perturb(model)
  logits = model(_ids()).astype(jnp.float32)
  smoa_jax.merge_and_unload(model)
  assert model.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
  merged = model(_ids()).astype(jnp.float32)
  # bf16 rounding of W + dW vs the folded forward: within 2% of the logit scale.
  assert float(jnp.abs(merged - logits).max()) < 0.02 * float(jnp.abs(logits).max())


def test_full_fine_tuning_and_mark_trainable():
  model = ToyLM()
  report = smoa_jax.apply_adapter(model, smoa_jax.FullFineTuneConfig(target_modules=["q_proj"]),
                                  rngs=nnx.Rngs(0), verbose=False)
  assert report.trainable_params == 2 * 16 * 16
  assert isinstance(model.layers[0].self_attn.q_proj.kernel, smoa_jax.TrainableParam)
  paths = smoa_jax.mark_trainable(model, "lm_head/.*")
  assert paths == ["lm_head/kernel"]
  trainable = nnx.state(model, smoa_jax.TrainableParam)
  assert sum(x.size for x in jax.tree.leaves(trainable)) == 2 * 256 + 16 * 31
  with pytest.raises(smoa_jax.TargetError, match="no frozen parameter path matched 'nothing/"):
    smoa_jax.mark_trainable(model, "nothing/.*")
  smoa_jax.merge_and_unload(model)
  assert not jax.tree.leaves(nnx.state(model, smoa_jax.TrainableParam))
  assert type(model.lm_head.kernel) is nnx.Param
