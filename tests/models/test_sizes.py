"""Parameter shapes and bytes from config.json alone (smoa_jax/models/sizes.py) against the built
model, for every family; absurd sizes refused by from_hf without building anything."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

import smoa_jax
from smoa_jax.layers.paths import module_path
from smoa_jax.models import build_model, config_schema, model_class, sizes
from smoa_jax.models import hf as convert
from smoa_jax.parallel import sharding, spmd

VOCAB = 97  # odd: the vocabulary axis never divides the mesh, so fit_spec must replicate it
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=72,
             num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2)
GPT2 = dict(model_type="gpt2", vocab_size=VOCAB, n_positions=32, n_embd=40, n_layer=3, n_head=5)
BERT = dict(model_type="bert", vocab_size=VOCAB, hidden_size=40, num_hidden_layers=3,
            num_attention_heads=5, intermediate_size=37, max_position_embeddings=64)

# name -> (config, num_labels given to the builder)
CONFIGS = {
    "llama_untied_biases_head_dim": (dict(LLAMA, architectures=["LlamaForCausalLM"], head_dim=10,
                                          attention_bias=True, mlp_bias=True), None),
    "llama_tied": (dict(LLAMA, tie_word_embeddings=True), None),
    "mistral_window": (dict(LLAMA, architectures=["MistralForCausalLM"], sliding_window=4), None),
    "qwen2_qkv_bias_tied": (dict(LLAMA, architectures=["Qwen2ForCausalLM"],
                                 tie_word_embeddings=True, use_sliding_window=True,
                                 sliding_window=4, max_window_layers=1), None),
    "qwen3_qk_norm_bias": (dict(LLAMA, architectures=["Qwen3ForCausalLM"], head_dim=14,
                                attention_bias=True), None),
    "gemma2_sandwich_norms_bias": (dict(LLAMA, architectures=["Gemma2ForCausalLM"], head_dim=16,
                                        attention_bias=True, sliding_window=4), None),
    "gemma3_qk_norm_untied": (dict(LLAMA, architectures=["Gemma3ForCausalLM"], head_dim=16,
                                   tie_word_embeddings=False, sliding_window=4), None),
    "phi3_fused": (dict(LLAMA, architectures=["Phi3ForCausalLM"], sliding_window=4), None),
    "gpt2_tied": (GPT2, None),
    "gpt2_untied_inner": (dict(GPT2, tie_word_embeddings=False, n_inner=24), None),
    "bert": (BERT, None),
    "bert_classifier_from_argument": (BERT, 3),
    "bert_classifier_from_id2label": (dict(BERT, architectures=["BertForSequenceClassification"],
                                           id2label={"0": "no", "1": "yes", "2": "maybe",
                                                     "3": "?"}), None),
}


def _abstract(config, num_labels, param_dtype, scan_layers, mesh):
  model = nnx.eval_shape(lambda: build_model(config, num_labels=num_labels, param_dtype=param_dtype,
                                             rngs=nnx.Rngs(0), scan_layers=scan_layers))
  if mesh is not None:
    spmd.annotate(model, mesh)
  return model


def _formula(config, num_labels, param_dtype, scan_layers, mesh):
  cls = model_class(config, num_labels)
  values = config_schema.check(config, cls.architecture)
  labels = (config_schema.label_count(values, num_labels)
            if cls is smoa_jax.models.BertForSequenceClassification else None)
  specs = sizes.param_specs(cls, values, num_labels=labels, scan_layers=scan_layers)
  nbytes = sizes.config_param_bytes(cls, values, param_dtype, num_labels=labels,
                                    scan_layers=scan_layers, mesh=mesh)
  return specs, nbytes


# (param dtype, mesh axis sizes (data, fsdp, tp) or None)
LAYOUTS = {"f32": (jnp.float32, None), "bf16_fsdp2_tp2": (jnp.bfloat16, (1, 2, 2)),
           "f32_tp4": (jnp.float32, (1, 1, 4))}


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.keys())
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_specs_and_bytes_are_those_of_the_built_model(name, layout):
  config, num_labels = CONFIGS[name]
  dtype, axes = LAYOUTS[layout]
  mesh = None if axes is None else AbstractMesh(axes, sharding.AXES)
  for scan_layers in (False, True):
    model = _abstract(config, num_labels, dtype, scan_layers, mesh)
    specs, nbytes = _formula(config, num_labels, dtype, scan_layers, mesh)
    built = {module_path(p): tuple(v.shape)
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {s.path.format(i=i): s.shape for s in specs for i in range(s.count)} == built
    assert nbytes == convert.param_bytes(model, mesh)


HUGE = {  # 4,096 layers of width 2^20 (and a head of 2^20 classes): petabytes
    "llama": dict(LLAMA, num_hidden_layers=4096, hidden_size=2**20, intermediate_size=2**22,
                  num_attention_heads=2**10, num_key_value_heads=2**10),
    "qwen2": dict(LLAMA, architectures=["Qwen2ForCausalLM"], num_hidden_layers=4096,
                  hidden_size=2**20, num_attention_heads=2**10, num_key_value_heads=2**10),
    "gpt2": dict(GPT2, n_layer=4096, n_embd=2**20, n_head=2**10),
    "bert_classifier": dict(BERT, architectures=["BertForSequenceClassification"],
                            num_hidden_layers=4096, hidden_size=2**20, num_attention_heads=2**10,
                            num_labels=2**20),
}


@pytest.mark.parametrize("name", sorted(HUGE))
def test_absurd_sizes_are_refused_before_anything_is_built(name, tmp_path, monkeypatch):
  def no_building(*_, **__):
    raise AssertionError("from_hf built a module for a config it should have refused")

  monkeypatch.setattr(convert, "build_model", no_building)
  monkeypatch.setattr(convert, "_open_checkpoint", no_building)
  (tmp_path / "config.json").write_text(json.dumps(HUGE[name]))
  with pytest.raises(smoa_jax.CheckpointError,
                     match=r"needs [0-9.]+ GB for its parameters but (available host memory|free "
                     r"memory on .*) is [0-9.]+ GB; refusing to allocate"):
    convert.from_hf(tmp_path)
  with pytest.raises(smoa_jax.CheckpointError, match=r"needs [0-9.]+ GB .*max_bytes is 1.00 GB"):
    convert.from_hf(tmp_path, max_bytes=10**9, scan_layers=True)
