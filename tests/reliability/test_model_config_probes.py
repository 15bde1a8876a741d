"""Probes: hostile config.json files given to ``from_hf``: absurd sizes, wrong types, out-of-range
and inconsistent values; refused with one CheckpointError before any module is built."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import smoa_jax
from smoa_jax.models import BertForSequenceClassification, config_schema, sizes
from smoa_jax.models import hf as convert
from tests.reliability import probe, probe_cases

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=11, hidden_size=8,
             intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)
GPT2 = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=11, n_positions=8,
            n_embd=8, n_layer=2, n_head=2)
BERT = dict(architectures=["BertModel"], model_type="bert", vocab_size=11, hidden_size=8,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=8)
# A tiny valid config per family (the fuzzer edits these).
BASES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral",
                               sliding_window=4),
    "Qwen2ForCausalLM": dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                             layer_types=["full_attention", "sliding_attention"],
                             sliding_window=4),
    "Qwen3ForCausalLM": dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                             head_dim=6, attention_bias=True),
    "Gemma2ForCausalLM": dict(LLAMA, architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                              sliding_window=4, final_logit_softcapping=30.0,
                              attn_logit_softcapping=50.0),
    "Gemma3ForCausalLM": dict(LLAMA, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                              sliding_window=4, rope_parameters={
                                  "full_attention": {"rope_type": "linear", "factor": 8.0},
                                  "sliding_attention": {"rope_type": "default"}}),
    "Phi3ForCausalLM": dict(LLAMA, architectures=["Phi3ForCausalLM"], model_type="phi3",
                            sliding_window=4),
    "GPT2LMHeadModel": GPT2,
    "BertModel": BERT,
    "BertForSequenceClassification": dict(BERT, architectures=["BertForSequenceClassification"],
                                          num_labels=3),
}
assert set(BASES) == set(config_schema.SCHEMAS)  # every family is fuzzed


def _model_dir(path: Path, config: dict) -> Path:
  """config.json plus a tiny weights file (what the issue's reporter used)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  save_file({"model.norm.weight": np.ones(4, np.float32)}, str(path / "model.safetensors"))
  return path


@contextlib.contextmanager
def _nothing_built():
  def refuse(*_, **__):
    raise AssertionError("from_hf built a module or opened weights for a config it must refuse")

  with mock.patch.object(convert, "build_model", refuse), \
       mock.patch.object(convert, "_open_checkpoint", refuse):
    yield


# name -> (base config, edits (None: delete the field), every text the error must hold)
HOSTILE = {
    "negative_hidden_size": (LLAMA, {"hidden_size": -48}, ["hidden_size=-48: expected an integer "
                                                           ">= 1"]),
    "zero_heads": (LLAMA, {"num_attention_heads": 0}, ["num_attention_heads=0: expected an "
                                                       "integer >= 1"]),
    "vocab_as_text": (LLAMA, {"vocab_size": "many"}, ['vocab_size="many": expected an integer']),
    "gpt2_zero_width": (GPT2, {"n_embd": 0}, ["n_embd=0: expected an integer >= 1"]),
    "negative_rope_theta": (LLAMA, {"rope_theta": -1.0}, ["rope_theta=-1.0: expected a finite "
                                                          "number > 0"]),
    "unknown_rope_type": (LLAMA, {"rope_scaling": {"rope_type": "nonsense"}},
                          ['rope_scaling.rope_type="nonsense": expected one of "default", '
                           '"linear", "llama3"']),
    "bool_as_int": (LLAMA, {"num_hidden_layers": True}, ["num_hidden_layers=true: expected an "
                                                         "integer"]),
    "float_as_int": (GPT2, {"n_layer": 2.0}, ["n_layer=2.0: expected an integer"]),
    "nan_epsilon": (BERT, {"layer_norm_eps": math.nan}, ["layer_norm_eps=NaN: expected a finite "
                                                         "number > 0"]),
    "infinite_rope_theta": (LLAMA, {"rope_theta": math.inf}, ["rope_theta=Infinity"]),
    "missing_vocab": (LLAMA, {"vocab_size": None}, ["vocab_size is missing: expected an integer"]),
    "heads_not_dividing_width": (GPT2, {"n_head": 3}, ["n_embd=8, n_head=3: expected n_embd to "
                                                       "be a multiple of n_head"]),
    "kv_heads_not_dividing_heads": (LLAMA, {"num_attention_heads": 4, "num_key_value_heads": 3},
                                    ["expected num_attention_heads to be a multiple of "
                                     "num_key_value_heads"]),
    "head_dim_not_derivable": (LLAMA, {"hidden_size": 9}, ["head_dim is missing and cannot be "
                                                           "derived from hidden_size=9"]),
    "odd_head_dim": (LLAMA, {"head_dim": 5}, ["head_dim=5: expected an even head_dim"]),
    "zero_intermediate": (BERT, {"intermediate_size": 0}, ["intermediate_size=0"]),
    "llama3_rope_incomplete": (LLAMA, {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
                               ["rope_parameters.low_freq_factor is missing",
                                "rope_parameters.original_max_position_embeddings is missing"]),
    "rope_factor_as_text": (LLAMA, {"rope_parameters": {"rope_type": "linear", "factor": "2x"}},
                            ['rope_parameters.factor="2x": expected a finite number > 0']),
    "zero_sliding_window": (BASES["MistralForCausalLM"], {"sliding_window": 0},
                            ["sliding_window=0: expected an integer >= 1"]),
    "layer_types_too_short": (BASES["Qwen2ForCausalLM"], {"layer_types": ["full_attention"]},
                              ["expected one layer_types entry per layer"]),
    "unknown_layer_type": (BASES["Qwen2ForCausalLM"], {"layer_types": ["full", "sliding"]},
                           ["layer_types=[\"full\", \"sliding\"]: expected a list of strings"]),
    "unsupported_activation": (GPT2, {"activation_function": "mish"},
                               ['activation_function="mish": expected one of']),
    "relative_positions": (BERT, {"position_embedding_type": "relative_key"},
                           ["relative position embeddings are not supported"]),
    "zero_positions": (GPT2, {"n_positions": 0}, ["n_positions=0"]),
    "nested_garbage": (LLAMA, {"rope_parameters": [[{}]], "architectures": "LlamaForCausalLM"},
                       ['architectures="LlamaForCausalLM": expected a list of strings']),
    "every_violation_at_once": (LLAMA, {"hidden_size": -48, "num_attention_heads": 0,
                                        "vocab_size": "many", "rope_theta": -1.0},
                                ["4 invalid fields", "hidden_size=-48", "num_attention_heads=0",
                                 'vocab_size="many"', "rope_theta=-1.0"]),
}


def _situation(base: dict, edits: dict) -> str:
  changed = ", ".join(f"{k}: {json.dumps(v)}" for k, v in edits.items() if v is not None)
  removed = ", ".join(k for k, v in edits.items() if v is None)
  return (f"{base['architectures'][0]} config.json" + (f" with `{changed}`" if changed else "")
          + (f" without `{removed}`" if removed else ""))


@probe_cases("model configs", {
    case: (_situation(base, edits), "one CheckpointError naming config.json, each bad field, its "
           "value and what was expected; nothing is built")
    for case, (base, edits, _) in HOSTILE.items()})
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_config_values_are_refused_before_building(case, tmp_path):
  base, edits, texts = HOSTILE[case]
  config = {k: v for k, v in {**base, **edits}.items() if v is not None}
  directory = _model_dir(tmp_path / "model", config)
  with _nothing_built(), pytest.raises(smoa_jax.CheckpointError) as info:
    convert.from_hf(directory)
  message = str(info.value)
  assert message.startswith(f"{directory / 'config.json'}"), message
  for text in texts:
    assert text in message, message


@probe("model configs", "config.json with 4,096 layers of width 2^20 next to a tiny weights file",
       "CheckpointError with the GB needed and the memory available, computed from config.json "
       "alone (nothing is built, no weight file is opened)")
def test_absurd_sizes_are_priced_from_the_config_alone(tmp_path):
  config = dict(LLAMA, num_hidden_layers=4096, hidden_size=2**20, intermediate_size=2**22,
                num_attention_heads=2**10, num_key_value_heads=2**10)
  directory = _model_dir(tmp_path / "model", config)
  with _nothing_built(), pytest.raises(smoa_jax.CheckpointError,
                                       match=r"needs [0-9.]+ GB for its parameters but .* is "
                                       r"[0-9.]+ GB; refusing to allocate"):
    convert.from_hf(directory)


# -- the fuzzer ------------------------------------------------------------------------------------
MISSING = object()
_SCALARS = [0, 1, 2, 3, 4, 8, -1, -48, 2**31, 10**30, 2**64, 0.5, 1e-5, 1.5, -0.0, -1.0, 1e308,
            math.nan, math.inf, -math.inf, True, False, "many", "", "8", "silu", "gelu_new",
            "absolute", "full_attention", "sliding_attention", "default", "linear", "llama3",
            "LlamaForCausalLM", None]
_ROPE_KEYS = ["rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings"]
_HOSTILE = st.one_of(
    st.sampled_from(_SCALARS),
    st.lists(st.sampled_from(["full_attention", "sliding_attention", "x", 3, None]), max_size=4),
    st.dictionaries(st.sampled_from(_ROPE_KEYS), st.sampled_from(_SCALARS), max_size=6),
    st.sampled_from([[], {}, [[{}]], {"a": {"b": []}}, [1, [2]]]),
    st.just(MISSING))


def _plausible(field: config_schema.Field) -> st.SearchStrategy:
  """Values of the field's type and range (so that many fuzzed configs build)."""
  choices = st.sampled_from(field.choices or ("x",))
  return {int: st.integers(1, 16), float: st.sampled_from([1e-6, 0.02, 1.0, 10000.0]),
          bool: st.booleans(), str: choices, list: st.lists(choices, min_size=2, max_size=2),
          dict: st.just({})}[field.kind]


class _Built(Exception):
  """Raised in place of reading weights: from_hf accepted the config and built the model."""

  def __init__(self, model):
    super().__init__()
    self.model = model


def _reached_loading(model, *_):
  raise _Built(model)


@probe("fuzzing", "random values for every config.json field of every family (zero, negative, "
       "huge, wrong type, missing, NaN/inf, bools, strings, nested garbage)",
       "CheckpointError naming the model directory, or a model whose parameters are exactly "
       "what config.json alone predicted; no other exception type")
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(architecture=st.sampled_from(sorted(BASES)), data=st.data())
def test_fuzzed_configs_are_refused_cleanly_or_build(architecture, data, tmp_path):
  schema = config_schema.SCHEMAS[architecture].fields
  names = data.draw(st.lists(st.sampled_from(sorted(schema) + ["architectures", "model_type"]),
                             min_size=1, max_size=3, unique=True))
  hostile = data.draw(st.booleans())  # else values of the right type and range
  edits = {name: data.draw(_HOSTILE if hostile or name not in schema else _plausible(schema[name]))
           for name in names}
  config = {k: v for k, v in {**BASES[architecture], **edits}.items() if v is not MISSING}
  directory = tmp_path / "model"
  directory.mkdir(exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  with mock.patch.object(convert, "_open_checkpoint", lambda _: contextlib.nullcontext()), \
       mock.patch.object(convert, "_plan", _reached_loading):
    try:
      convert.from_hf(directory, max_bytes=2**24)
    except smoa_jax.CheckpointError as err:
      assert str(directory) in str(err)
      event("refused")
      return
    except _Built as built:
      model = built.model
  event("built")
  cls = type(model)
  values = config_schema.check(config, cls.architecture)
  labels = model.num_labels if cls is BertForSequenceClassification else None
  assert sizes.config_param_bytes(cls, values, np.float32, num_labels=labels) == \
      convert.param_bytes(model)
