"""Gemma 2 and Gemma 3 (text) causal LMs: the Llama decoder (:mod:`smoa_jax.models.llama`) with
Gemma's :class:`~smoa_jax.models.llama.DecoderSpec` flags.

What Gemma changes, all read from the HF config:

* RMSNorm multiplies by ``1 + weight`` (``weight`` stored as an offset, computed in float32), and
  every block has four norms: ``input_layernorm`` -> attention -> ``post_attention_layernorm``,
  ``pre_feedforward_layernorm`` -> MLP -> ``post_feedforward_layernorm``;
* the embedding is multiplied by ``sqrt(hidden_size)`` (the tied LM head reads it unscaled);
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` and, when
  ``attn_logit_softcapping`` is set, soft-capped ``cap * tanh(s / cap)`` before the mask; the final
  logits likewise with ``final_logit_softcapping`` (Gemma 2);
* sliding-window and global layers alternate (``layer_types``; legacy configs: every other layer
  for Gemma 2, five sliding layers to one global for Gemma 3, ``sliding_window_pattern``);
* the MLP's activation is ``hidden_activation`` (``gelu_pytorch_tanh``);
* Gemma 3: per-head ``q_norm`` / ``k_norm``, and the sliding layers have their own RoPE
  (``rope_parameters["sliding_attention"]``, legacy ``rope_local_base_freq``), the global ones
  ``rope_parameters["full_attention"]`` (legacy ``rope_theta`` + ``rope_scaling``); as in
  transformers, ``attn_logit_softcapping`` is not applied (only the final logits are capped).

Module paths mirror the HF state dict as for Llama, plus
``model/layers/3/pre_feedforward_layernorm`` and ``.../post_feedforward_layernorm``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from smoa_jax.models.llama import LlamaForCausalLM, rope_inv_freq

__all__ = ["Gemma2ForCausalLM", "Gemma3ForCausalLM"]


def _gemma_windows(hf_config: Mapping[str, Any], num_layers: int,
                   period: int) -> tuple[int | None, ...]:
  """Per-layer sliding windows from ``layer_types``, else every ``period``-th layer global
  (transformers' default when a config predates ``layer_types``)."""
  types = hf_config.get("layer_types") or [
      "full_attention" if (i + 1) % period == 0 else "sliding_attention"
      for i in range(num_layers)]
  return tuple(hf_config["sliding_window"] if t == "sliding_attention" else None for t in types)


class Gemma2ForCausalLM(LlamaForCausalLM):
  """Gemma 2: unit-offset sandwich norms, scaled embeddings, soft-capped attention and logits,
  alternating sliding-window layers (see the module docstring)."""

  architecture: ClassVar[str] = "Gemma2ForCausalLM"
  window_period: ClassVar[int] = 2  # configs without layer_types: every other layer global

  @classmethod
  def family_flags(cls, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    bias = hf_config["attention_bias"]
    return dict(
        qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=False,
        sliding_windows=_gemma_windows(
            hf_config, num_layers, hf_config.get("sliding_window_pattern") or cls.window_period),
        hidden_act=hf_config["hidden_activation"], unit_offset_norms=True, sandwich_norms=True,
        embed_scale=hf_config["hidden_size"] ** 0.5,
        query_scale=hf_config["query_pre_attn_scalar"] ** -0.5,
        attn_softcap=hf_config["attn_logit_softcapping"],
        final_softcap=hf_config["final_logit_softcapping"])


class Gemma3ForCausalLM(Gemma2ForCausalLM):
  """Gemma 3 text: Gemma 2 with per-head ``q_norm`` / ``k_norm`` and one RoPE for the sliding
  layers, another for the global ones (see the module docstring)."""

  architecture: ClassVar[str] = "Gemma3ForCausalLM"
  window_period: ClassVar[int] = 6

  @classmethod
  def family_flags(cls, hf_config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    ropes, head_dim = hf_config["rope_parameters"], hf_config["head_dim"]

    def freqs(layer_type: str) -> tuple[float, ...]:
      params = {"rope_parameters": ropes[layer_type]}
      return tuple(float(f) for f in rope_inv_freq(params, head_dim))

    # transformers' Gemma 3 never soft-caps attention scores (its checkpoints set no cap).
    return dict(super().family_flags(hf_config, num_layers), qk_norm=True, attn_softcap=None,
                inv_freq=freqs("full_attention"), local_inv_freq=freqs("sliding_attention"))
