"""Hugging Face model families as Flax NNX modules whose paths mirror the HF state dict.

Every projection is a plain ``nnx.Linear`` (``kernel (in, out)``) at the path of its HF module
(``model/layers/3/self_attn/q_proj``, ``transformer/h/0/attn/c_attn``,
``bert/encoder/layer/0/attention/self/query``), so adapter ``target_modules`` mean what they mean
in PEFT. Each model keeps its HF config (``model.hf_config``) and its key map
(``model.key_map()``), which :mod:`smoa_jax.models.hf` uses to load and export checkpoints, and
its partitioning table (``sharding_rules``, used by :mod:`smoa_jax.parallel.spmd`). Built with
``scan_layers=True``, the layers are one stacked module run under ``nnx.scan``. The causal LMs
generate with a KV cache (:mod:`smoa_jax.models.cache`, used by :mod:`smoa_jax.inference`).

Supported architectures (``config.json`` ``architectures[0]``): see :data:`ARCHITECTURES`;
``BertForMaskedLM`` / ``BertForPreTraining`` checkpoints load as the encoder (their ``cls``
heads are dropped).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from smoa_jax.errors import ConfigError
from smoa_jax.models import config_schema
from smoa_jax.models.base import CausalLM, HFModel
from smoa_jax.models.keymap import KeyMap, KeyRule
from smoa_jax.models.bert import BertForSequenceClassification, BertModel
from smoa_jax.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from smoa_jax.models.gpt2 import GPT2LMHeadModel
from smoa_jax.models.llama import (LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM,
                                   Qwen2ForCausalLM, Qwen3ForCausalLM)

__all__ = [
    "ARCHITECTURES", "BertForSequenceClassification", "BertModel", "CausalLM", "GPT2LMHeadModel",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "HFModel", "KeyMap", "KeyRule", "LlamaForCausalLM",
    "MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "build_model",
    "model_class",
]

ARCHITECTURES: dict[str, type[HFModel]] = {
    cls.architecture: cls for cls in (
        LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM,
        Gemma3ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel, BertModel,
        BertForSequenceClassification)
}
# Checkpoints of other heads whose body we load (their own heads are ignored).
_BODY_OF = {"BertForMaskedLM": BertModel, "BertForPreTraining": BertModel}
# config.json without ``architectures``: the class for its ``model_type``.
_BY_MODEL_TYPE = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
                  "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "phi3": Phi3ForCausalLM,
                  "gemma2": Gemma2ForCausalLM, "gemma3_text": Gemma3ForCausalLM,
                  "gpt2": GPT2LMHeadModel, "bert": BertModel}


def model_class(hf_config: Mapping[str, Any], num_labels: int | None = None) -> type[HFModel]:
  """The model class for an HF config (``architectures[0]``, else ``model_type``).

  With ``num_labels`` a BERT checkpoint becomes :class:`BertForSequenceClassification`.
  Raises ConfigError naming the supported architectures.
  """
  config_schema.check_selection(hf_config)
  names = hf_config.get("architectures") or []
  if names:
    cls = ARCHITECTURES.get(names[0]) or _BODY_OF.get(names[0])
  else:
    cls = _BY_MODEL_TYPE.get(hf_config.get("model_type", ""))
  if cls is None:
    found = names[0] if names else f"model_type={hf_config.get('model_type')!r}"
    raise ConfigError(f"architecture {found} is not supported; supported: "
                      f"{sorted(ARCHITECTURES) + sorted(_BODY_OF)}.")
  if num_labels is not None:
    if cls not in (BertModel, BertForSequenceClassification):
      raise ConfigError(f"num_labels={num_labels} asks for a sequence-classification head, which "
                        f"only BERT checkpoints get here; {cls.architecture} is a causal LM. "
                        "Leave num_labels unset.")
    cls = BertForSequenceClassification
  return cls


def build_model(hf_config: Mapping[str, Any], *, num_labels: int | None = None,
                dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                rngs: nnx.Rngs, scan_layers: bool = False) -> HFModel:
  """A randomly initialized model for an HF config dict (wrap in ``nnx.eval_shape`` for shapes).

  ``scan_layers`` stacks the layers under ``nnx.scan`` (see :func:`smoa_jax.models.blocks.stack_layers`).
  """
  cls = model_class(hf_config, num_labels)
  kwargs = {"num_labels": num_labels} if cls is BertForSequenceClassification else {}
  return cls(hf_config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, scan_layers=scan_layers,
             **kwargs)
