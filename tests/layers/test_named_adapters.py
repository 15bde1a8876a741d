"""Several named adapters on one base (smoa_jax/layers/dense.py, inject.py; io/portable.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import smoa_jax
from smoa_jax.layers.variables import InactiveArray
from tests.support.toy import ToyLM, token_data

SMOA = smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj", "v_proj"])
LORA = smoa_jax.LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "up_proj"])


def _ids():
  return jnp.asarray(token_data(4)["input_ids"])


def _perturb(model, seed):
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + i), layer.lora_b.shape)


def _logits(model):
  model.eval()
  return np.asarray(model(_ids()))


def _two_adapters():
  """ToyLM with an unnamed SMoA adapter on q, v and a LoRA adapter "b" on q, up (active)."""
  model = ToyLM()
  smoa_jax.apply_adapter(model, SMOA, rngs=nnx.Rngs(1), verbose=False)
  _perturb(model, 0)
  first = _logits(model)
  smoa_jax.apply_adapter(model, LORA, rngs=nnx.Rngs(2), verbose=False, name="b")
  _perturb(model, 10)
  return model, first, _logits(model)


def _kernels(model):
  return {"/".join(map(str, p)): v for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param) and p[-1] == "kernel"}


def test_switching_moves_no_base_weight_and_restores_the_logits_exactly():
  model, first, second = _two_adapters()
  kernels = _kernels(model)
  assert smoa_jax.list_adapters(model) == ["b", "default"]
  assert smoa_jax.active_adapter(model) == "b"
  assert not np.allclose(first, second, atol=1e-3)
  q = model.layers[0].self_attn.q_proj
  assert q.adapter_names == ("b", "default")  # SMoA and LoRA on one layer
  for _ in range(2):
    smoa_jax.set_adapter(model, "default")
    np.testing.assert_array_equal(_logits(model), first)
    smoa_jax.set_adapter(model, "b")
    np.testing.assert_array_equal(_logits(model), second)
  smoa_jax.set_adapter(model, None)  # no adapter active: the base model, exactly
  np.testing.assert_array_equal(_logits(model), _logits(ToyLM()))
  now = _kernels(model)
  assert now.keys() == kernels.keys() and all(now[k] is kernels[k] for k in kernels)


def test_only_the_active_adapter_trains():
  model, _, _ = _two_adapters()
  smoa_jax.set_adapter(model, "default")
  trainable = {"/".join(map(str, p)) for p, v in nnx.iter_graph(model)
               if isinstance(v, smoa_jax.TrainableParam)}
  # The unnamed adapter keeps today's paths: lora_a / lora_b on the layer.
  assert trainable == {f"layers/{i}/self_attn/{m}/lora_{f}" for i in (0, 1)
                       for m in ("q_proj", "v_proj") for f in "ab"}
  inactive = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
              if isinstance(v, InactiveArray)}
  assert "layers/0/self_attn/q_proj/inactive/b/a" in inactive
  before = {p: np.asarray(v[...]) for p, v in
            (("/".join(map(str, p)), v) for p, v in nnx.iter_graph(model)
             if isinstance(v, smoa_jax.TrainableParam))}
  config = smoa_jax.TrainConfig(steps=3, batch_size=8, learning_rate=3e-2, progress=False)
  smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(16), config)
  after = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
           if isinstance(v, (smoa_jax.TrainableParam, InactiveArray))}
  assert any(not np.array_equal(before[p], after[p]) for p in before)
  for path, value in inactive.items():
    np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_each_adapter_saves_by_name_like_a_lone_adapter(tmp_path):
  model, first, second = _two_adapters()
  smoa_jax.save_adapter(model, tmp_path / "default", name="default")
  smoa_jax.save_adapter(model, tmp_path / "b", name="b")
  assert smoa_jax.active_adapter(model) == "b"  # saving an inactive adapter switches back
  alone = ToyLM()
  smoa_jax.apply_adapter(alone, SMOA, rngs=nnx.Rngs(1), verbose=False)
  _perturb(alone, 0)
  smoa_jax.save_adapter(alone, tmp_path / "alone")
  ours, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors"))
                  for d in ("default", "alone"))
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key])
  # Files load as any name; loading a name makes it active.
  fresh = ToyLM()
  smoa_jax.load_adapter(fresh, tmp_path / "alone", name="x")
  smoa_jax.load_adapter(fresh, tmp_path / "b", name="y")
  np.testing.assert_array_equal(_logits(fresh), second)
  smoa_jax.set_adapter(fresh, "x")
  np.testing.assert_array_equal(_logits(fresh), first)
  assert smoa_jax.list_adapters(fresh) == ["x", "y"]


def test_delete_and_merge_and_unload_by_name():
  model, first, second = _two_adapters()
  kernel = model.layers[0].mlp["up_proj"].kernel
  smoa_jax.delete_adapter(model, "b")
  up = model.layers[0].mlp["up_proj"]
  assert type(up) is nnx.Linear and up.kernel is kernel  # no adapter left: the plain layer back
  assert smoa_jax.list_adapters(model) == ["default"] and smoa_jax.active_adapter(model) is None
  smoa_jax.set_adapter(model, "default")
  np.testing.assert_array_equal(_logits(model), first)
  model, first, second = _two_adapters()
  smoa_jax.merge_and_unload(model, name="default")
  assert not smoa_jax.list_adapters(model)
  assert type(model.layers[0].self_attn.q_proj) is nnx.Linear
  np.testing.assert_allclose(_logits(model), first, atol=1e-5, rtol=0)


def test_errors_name_what_to_do(tmp_path):
  model, _, _ = _two_adapters()
  with pytest.raises(smoa_jax.AdapterMismatchError, match=r"no adapter named 'c'.*'b', 'default'"):
    smoa_jax.set_adapter(model, "c")
  for call in (lambda: smoa_jax.delete_adapter(model, "c"),
               lambda: smoa_jax.save_adapter(model, tmp_path / "c", name="c"),
               lambda: smoa_jax.merge_and_unload(model, name="c")):
    with pytest.raises(smoa_jax.AdapterMismatchError, match="no adapter named 'c'"):
      call()
  assert not (tmp_path / "c").exists()
  with pytest.raises(smoa_jax.TargetError, match="already hold an adapter named 'b'"):
    smoa_jax.apply_adapter(model, LORA, rngs=nnx.Rngs(0), verbose=False, name="b")
  with pytest.raises(smoa_jax.ConfigError, match="adapter name 'a/b' is invalid"):
    smoa_jax.apply_adapter(model, LORA, rngs=nnx.Rngs(0), verbose=False, name="a/b")
  with pytest.raises(smoa_jax.ConfigError, match="cannot be a named adapter"):
    smoa_jax.apply_adapter(model, smoa_jax.FullFineTuneConfig(target_modules=["k_proj"]),
                           rngs=nnx.Rngs(0), verbose=False, name="full")
  smoa_jax.merge_adapters(model)
  with pytest.raises(smoa_jax.ConfigError, match="unmerge"):
    smoa_jax.set_adapter(model, "default")
  assert smoa_jax.active_adapter(model) == "b"  # nothing switched


def test_an_adapter_with_a_head_needs_a_model_of_its_own(tmp_path):
  model = ToyLM()
  smoa_jax.apply_adapter(model, SMOA, rngs=nnx.Rngs(1), verbose=False)
  smoa_jax.mark_trainable(model, "lm_head/kernel")
  smoa_jax.save_adapter(model, tmp_path / "head")
  other, _, second = _two_adapters()
  with pytest.raises(smoa_jax.AdapterMismatchError, match="outside adapter layers.*lm_head"):
    smoa_jax.load_adapter(other, tmp_path / "head", name="h")
  assert smoa_jax.list_adapters(other) == ["b", "default"]
  np.testing.assert_array_equal(_logits(other), second)


# Slow: scanned compiles; named adapters on unrolled layers run by default above.
@pytest.mark.slow
def test_scanned_layers_hold_named_adapters_and_convert_to_lora(tmp_path):
  from tests.support.hf import adapter_base_lm

  adapter_base_lm("llama").save_pretrained(tmp_path / "llama")
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 5)))
  scanned = smoa_jax.from_hf(tmp_path / "llama", scan_layers=True)
  smoa_jax.apply_adapter(scanned, SMOA, rngs=nnx.Rngs(1), verbose=False)
  _perturb(scanned, 0)
  first = np.asarray(scanned(ids))
  smoa_jax.apply_adapter(scanned, LORA, rngs=nnx.Rngs(2), verbose=False, name="b")
  _perturb(scanned, 10)
  second = np.asarray(scanned(ids))
  smoa_jax.set_adapter(scanned, "default")
  np.testing.assert_array_equal(np.asarray(scanned(ids)), first)
  report = smoa_jax.to_lora(scanned, rank=64)  # full rank: exact
  assert len(report.layers) == 6 and report.max_error < 1e-5  # q, v of 3 unrolled layers
  np.testing.assert_allclose(np.asarray(scanned(ids)), first, atol=1e-4)
  smoa_jax.set_adapter(scanned, "b")
  np.testing.assert_array_equal(np.asarray(scanned(ids)), second)
