"""What each model family reads from a Hugging Face ``config.json``, as data, and its check.

Every family has a :class:`Schema`: a table of the fields it reads (:class:`Field`: type, range,
default or required) and the rules that tie fields together (:class:`Rule`). :func:`check` applies
it to a config dict and returns the values the family builds from (defaults filled in, derived
fields such as ``head_dim = hidden_size / num_attention_heads`` computed, RoPE parameters
normalized), or raises ONE error listing every violation: the field, its value and what was
expected. :func:`smoa_jax.from_hf` runs it before anything is built, naming the ``config.json``
(:class:`~smoa_jax.errors.CheckpointError`); the families' constructors run it too, so a model
built straight from a dict is checked the same way (:class:`~smoa_jax.errors.ConfigError`).

Types are strict: an integer field takes an ``int`` (not ``true``, not ``48.0``, not ``"48"``); a
number field takes an int or a float that is finite; a flag takes ``true``/``false``. A field set
to ``null`` counts as absent, as Hugging Face writes unset optional fields that way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping

from smoa_jax.errors import CheckpointError, ConfigError
from smoa_jax.models.blocks import _ACTIVATIONS  # the activations the families implement

__all__ = ["REQUIRED", "Field", "Derived", "Rule", "Schema", "SCHEMAS", "SELECTION", "ROPE_TYPES",
           "check", "check_selection", "label_count"]

REQUIRED = object()  # a Field default: the field must be present
_INT32_MAX = 2**31 - 1  # windows are compared with int32 positions inside jit


@dataclasses.dataclass(frozen=True)
class Derived:
  """A default computed from other fields: ``fn(*their values)``, or None when not derivable."""

  inputs: tuple[str, ...]
  fn: Callable[..., Any]
  text: str  # what makes it derivable, for the error


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field.

  ``kind``: ``int`` (an int, not a bool), ``float`` (an int or float, finite), ``str``, ``bool``,
  ``list`` (of strings, each in ``choices`` when given) or ``dict`` (a JSON object).
  ``default``: :data:`REQUIRED`, a value (None: may be absent), or a :class:`Derived`.
  ``minimum`` / ``above``: inclusive / exclusive lower bound; ``maximum``: inclusive upper bound.
  ``choices``: the values a ``str`` or ``bool`` may take (or a ``list``'s items); ``note`` says why.
  """

  kind: type
  default: Any = REQUIRED
  minimum: float | None = None
  above: float | None = None
  maximum: float | None = None
  choices: tuple[Any, ...] | None = None
  note: str = ""

  def expected(self) -> str:
    """What a valid value is, in words: ``an integer >= 1``, ``one of "gelu", "relu"``."""
    kind = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            list: "a list of strings", dict: "an object"}[self.kind]
    bounds = [f">= {self.minimum}" if self.minimum is not None else "",
              f"> {self.above}" if self.above is not None else "",
              f"<= {self.maximum}" if self.maximum is not None else ""]
    text = " ".join([kind] + [b for b in bounds if b])
    if self.choices is not None:
      shown = ", ".join(_json(c) for c in self.choices)
      text = (f"{kind} from {shown}" if self.kind is list else
              _json(self.choices[0]) if len(self.choices) == 1 else f"one of {shown}")
    return text + (f" ({self.note})" if self.note else "")

  def valid(self, value: Any) -> bool:
    if self.kind in (int, float):
      numeric = int if self.kind is int else (int, float)
      if isinstance(value, bool) or not isinstance(value, numeric):
        return False
      if self.kind is float:
        try:
          if not math.isfinite(float(value)):
            return False
        except OverflowError:  # an integer beyond the range of a float
          return False
      return ((self.minimum is None or value >= self.minimum)
              and (self.above is None or value > self.above)
              and (self.maximum is None or value <= self.maximum))
    if not isinstance(value, self.kind):
      return False
    if self.kind is list:
      return all(isinstance(v, str) and (self.choices is None or v in self.choices) for v in value)
    return self.choices is None or value in self.choices


@dataclasses.dataclass(frozen=True)
class Rule:
  """A consistency rule: ``holds(*values of fields)``; ``expected`` says it in words.

  A rule is checked only when all its fields are valid (absent optional fields pass None).
  """

  fields: tuple[str, ...]
  holds: Callable[..., bool]
  expected: str


@dataclasses.dataclass(frozen=True)
class Schema:
  """The fields a family reads and its rules; ``rope``: also reads RoPE parameters (one set, or
  with ``rope_per_layer_type`` one per layer type)."""

  fields: Mapping[str, Field]
  rules: tuple[Rule, ...] = ()
  rope: bool = False
  rope_per_layer_type: bool = False  # Gemma 3: RoPE parameters per layer type


def _size(default: Any = REQUIRED) -> Field:
  return Field(int, default, minimum=1)


def _eps(default: float) -> Field:
  return Field(float, default, above=0)


_FLAG_FALSE = Field(bool, False)
_ACT = tuple(sorted(_ACTIVATIONS))
_INIT = Field(float, 0.02, minimum=0)
_WINDOW = Field(int, None, minimum=1, maximum=_INT32_MAX)
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _divides(field: str, by: str, why: str = "") -> Rule:
  return Rule((field, by), lambda a, b: a % b == 0,
              f"{field} to be a multiple of {by}" + (f" ({why})" if why else ""))


# -- the families ----------------------------------------------------------------------------------
_DECODER = {
    "vocab_size": _size(), "hidden_size": _size(), "intermediate_size": _size(),
    "num_hidden_layers": _size(), "num_attention_heads": _size(),
    "num_key_value_heads": Field(int, Derived(("num_attention_heads",), lambda n: n,
                                              "num_attention_heads"), minimum=1),
    "head_dim": Field(int, Derived(("hidden_size", "num_attention_heads"),
                                   lambda h, n: h // n if h % n == 0 else None,
                                   "hidden_size to be a multiple of num_attention_heads"),
                      minimum=1),
    "rms_norm_eps": _eps(1e-6), "hidden_act": Field(str, "silu", choices=_ACT),
    "tie_word_embeddings": _FLAG_FALSE, "initializer_range": _INIT,
    "max_position_embeddings": _size(None),  # the CLI's --seq-len limit
    "rope_theta": Field(float, 10000.0, above=0),
    "rope_parameters": Field(dict, None), "rope_scaling": Field(dict, None),
}
_DECODER_RULES = (
    _divides("num_attention_heads", "num_key_value_heads", "grouped-query attention"),
    Rule(("head_dim",), lambda d: d % 2 == 0,
         "an even head_dim (rotary embeddings rotate pairs of dimensions)"),
)
_FULL_ROTARY = Rule(  # Phi-3 configs may rotate part of each head (Phi-4-mini: 0.75)
    ("rope_parameters", "rope_scaling", "partial_rotary_factor"),
    lambda *given: all((g if isinstance(g, (int, float)) else (g or {}).get(
        "partial_rotary_factor", 1.0)) in (None, 1, 1.0) for g in given),
    "partial_rotary_factor 1.0 (rotary embeddings over part of each head are not supported)")
_SLIDING_LAYERS = {
    "use_sliding_window": _FLAG_FALSE, "sliding_window": _WINDOW,
    "max_window_layers": Field(int, 0, minimum=0),
    "layer_types": Field(list, None, choices=_LAYER_TYPES),
}
_SLIDING_RULES = (
    Rule(("layer_types", "num_hidden_layers"), lambda t, n: t is None or len(t) == n,
         "one layer_types entry per layer (num_hidden_layers)"),
    Rule(("layer_types", "sliding_window"),
         lambda t, w: w is not None or "sliding_attention" not in (t or ()),
         "a sliding_window for the 'sliding_attention' layers"),
)
_GEMMA = {
    **{k: f for k, f in _DECODER.items() if k != "hidden_act"},
    "hidden_activation": Field(str, "gelu_pytorch_tanh", choices=_ACT),
    "tie_word_embeddings": Field(bool, True), "attention_bias": _FLAG_FALSE,
    "query_pre_attn_scalar": Field(float, 256.0, above=0),
    "attn_logit_softcapping": Field(float, None, above=0),
    "final_logit_softcapping": Field(float, None, above=0),
    "sliding_window": _WINDOW, "layer_types": Field(list, None, choices=_LAYER_TYPES),
    "use_bidirectional_attention": Field(bool, False, choices=(False,),
                                         note="bidirectional Gemma (an encoder) is not supported"),
}
_GEMMA3 = {
    **_GEMMA, "rope_theta": Field(float, 1_000_000.0, above=0),  # the global layers' (legacy)
    "rope_local_base_freq": Field(float, 10_000.0, above=0),  # the sliding layers' (legacy)
    "sliding_window_pattern": Field(int, 6, minimum=1),  # legacy: every n-th layer global
}
_GPT2 = {
    "vocab_size": _size(), "n_positions": _size(), "n_embd": _size(), "n_layer": _size(),
    "n_head": _size(),
    "n_inner": Field(int, Derived(("n_embd",), lambda h: 4 * h, "n_embd"), minimum=1),
    "layer_norm_epsilon": _eps(1e-5),
    "activation_function": Field(str, "gelu_new", choices=_ACT),
    "scale_attn_weights": Field(bool, True), "scale_attn_by_inverse_layer_idx": _FLAG_FALSE,
    "add_cross_attention": Field(bool, False, choices=(False,),
                                 note="GPT-2 with cross-attention is not supported"),
    "tie_word_embeddings": Field(bool, True), "initializer_range": _INIT,
    "max_position_embeddings": _size(None),  # the CLI's --seq-len limit, when present
}
_BERT = {
    "vocab_size": _size(), "hidden_size": _size(), "num_hidden_layers": _size(),
    "num_attention_heads": _size(), "intermediate_size": _size(),
    "max_position_embeddings": _size(512), "type_vocab_size": _size(2),
    "layer_norm_eps": _eps(1e-12), "hidden_act": Field(str, "gelu", choices=_ACT),
    "position_embedding_type": Field(str, "absolute", choices=("absolute",),
                                     note="relative position embeddings are not supported"),
    "is_decoder": Field(bool, False, choices=(False,), note="BERT as a decoder is not supported"),
    "add_cross_attention": Field(bool, False, choices=(False,),
                                 note="BERT with cross-attention is not supported"),
    "initializer_range": _INIT,
}
_BERT_RULES = (_divides("hidden_size", "num_attention_heads"),)

SCHEMAS: dict[str, Schema] = {
    "LlamaForCausalLM": Schema({**_DECODER, "attention_bias": _FLAG_FALSE,
                                "mlp_bias": _FLAG_FALSE}, _DECODER_RULES, rope=True),
    "MistralForCausalLM": Schema({**_DECODER, "sliding_window": _WINDOW}, _DECODER_RULES,
                                 rope=True),
    "Qwen2ForCausalLM": Schema({**_DECODER, **_SLIDING_LAYERS}, _DECODER_RULES + _SLIDING_RULES,
                               rope=True),
    "Qwen3ForCausalLM": Schema({**_DECODER, **_SLIDING_LAYERS, "attention_bias": _FLAG_FALSE},
                               _DECODER_RULES + _SLIDING_RULES, rope=True),
    "Gemma2ForCausalLM": Schema(_GEMMA, _DECODER_RULES + _SLIDING_RULES, rope=True),
    "Gemma3ForCausalLM": Schema(_GEMMA3, _DECODER_RULES + _SLIDING_RULES, rope=True,
                                rope_per_layer_type=True),
    "Phi3ForCausalLM": Schema(
        {**_DECODER, "sliding_window": _WINDOW, "partial_rotary_factor": Field(float, None)},
        _DECODER_RULES + (_FULL_ROTARY,), rope=True),
    "GPT2LMHeadModel": Schema(_GPT2, (_divides("n_embd", "n_head"),)),
    "BertModel": Schema(_BERT, _BERT_RULES),
    "BertForSequenceClassification": Schema(
        {**_BERT, "num_labels": _size(None), "id2label": Field(dict, None)}, _BERT_RULES),
}

# What picks the family (smoa_jax.models.model_class).
SELECTION = Schema({"architectures": Field(list, None), "model_type": Field(str, None)})

# RoPE parameters (``rope_parameters``, or transformers 4.x ``rope_scaling``) by ``rope_type``.
_ROPE_THETA = Field(float, None, above=0)
_FACTOR = Field(float, REQUIRED, above=0)
ROPE_TYPES: dict[str, Schema] = {
    "default": Schema({"rope_theta": _ROPE_THETA}),
    "linear": Schema({"rope_theta": _ROPE_THETA, "factor": _FACTOR}),
    "llama3": Schema({"rope_theta": _ROPE_THETA, "factor": _FACTOR, "low_freq_factor": _FACTOR,
                      "high_freq_factor": _FACTOR,
                      "original_max_position_embeddings": _size()},
                     (Rule(("low_freq_factor", "high_freq_factor"), lambda low, high: high > low,
                           "high_freq_factor > low_freq_factor"),)),
}


# -- checking --------------------------------------------------------------------------------------
def _json(value: Any, limit: int = 60) -> str:
  """A value as config.json spells it (shortened): ``-48``, ``"many"``, ``true``, ``null``."""
  try:
    text = json.dumps(value)
  except (TypeError, ValueError):
    text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_fields(config: Mapping[str, Any], schema: Schema, problems: list[str],
                  prefix: str = "") -> dict[str, Any]:
  """The valid values of ``schema``'s fields (defaults filled); appends a line per violation."""
  values: dict[str, Any] = {}
  derived = []
  for name, field in schema.fields.items():
    value = config.get(name)
    if value is None:
      if field.default is REQUIRED:
        problems.append(f"{prefix}{name} is missing: expected {field.expected()}")
      elif isinstance(field.default, Derived):
        derived.append((name, field))
      else:
        values[name] = field.default
    elif not field.valid(value):
      problems.append(f"{prefix}{name}={_json(value)}: expected {field.expected()}")
    else:
      values[name] = float(value) if field.kind is float else value
  for name, field in derived:
    rule = field.default
    if all(i in values for i in rule.inputs):
      value = rule.fn(*(values[i] for i in rule.inputs))
      if value is None or not field.valid(value):
        given = ", ".join(f"{prefix}{i}={_json(values[i])}" for i in rule.inputs)
        problems.append(f"{prefix}{name} is missing and cannot be derived from {given}: expected "
                        f"{prefix}{name} ({field.expected()}), or {rule.text}")
      else:
        values[name] = value
  for rule in schema.rules:
    if all(f in values for f in rule.fields) and not rule.holds(*(values[f] for f in rule.fields)):
      given = ", ".join(f"{prefix}{f}={_json(values[f])}" for f in rule.fields)
      problems.append(f"{given}: expected {rule.expected}")
  return values


def _check_rope(values: dict[str, Any], problems: list[str]) -> None:
  """Normalize ``values["rope_parameters"]`` to ``{"rope_type", "rope_theta", <its fields>}``.

  The first non-empty of ``rope_parameters`` / ``rope_scaling`` holds them (``type`` is the 4.x
  spelling of ``rope_type``); a ``rope_theta`` there overrides the top-level one.
  """
  if any(n not in values for n in ("rope_parameters", "rope_scaling")):
    return  # not objects, and already reported
  source = next((n for n in ("rope_parameters", "rope_scaling") if values[n]), "rope_parameters")
  params = values[source] or {}
  key = "rope_type" if params.get("rope_type") is not None else "type"
  rope_type = params.get(key)
  rope_type = "default" if rope_type is None else rope_type
  if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
    problems.append(f"{source}.{key}={_json(rope_type)}: expected one of "
                    f"{', '.join(_json(t) for t in ROPE_TYPES)} (other RoPE types are not "
                    "supported)")
    return
  before = len(problems)
  fields = _check_fields(params, ROPE_TYPES[rope_type], problems, prefix=f"{source}.")
  theta = fields.pop("rope_theta", None)
  theta = values.get("rope_theta") if theta is None else theta
  if len(problems) == before and theta is not None:
    values["rope_parameters"] = {"rope_type": rope_type, **fields, "rope_theta": theta}


def _check_layer_type_ropes(values: dict[str, Any], problems: list[str]) -> None:
  """Gemma 3: ``values["rope_parameters"]`` becomes ``{layer type: normalized parameters}``
  (:func:`_check_rope` for each).

  transformers 5 writes ``rope_parameters`` as ``{"full_attention": {...}, "sliding_attention":
  {...}}``; older configs give the global layers' as ``rope_theta`` + ``rope_scaling`` and the
  sliding layers' theta as ``rope_local_base_freq``.
  """
  if any(n not in values for n in ("rope_parameters", "rope_scaling")):
    return  # not objects, and already reported
  params = values["rope_parameters"] or {}
  nested = bool(set(params) & set(_LAYER_TYPES))
  legacy = {"full_attention": values["rope_scaling"] or params, "sliding_attention": {}}
  # .get: a theta that failed its own check is already reported and absent from values.
  thetas = {"full_attention": values.get("rope_theta"),
            "sliding_attention": values.get("rope_local_base_freq")}
  ropes = {}
  for layer_type in _LAYER_TYPES:
    given = params.get(layer_type) if nested else legacy[layer_type]
    if given is not None and not isinstance(given, dict):
      problems.append(f"rope_parameters.{layer_type}={_json(given)}: expected an object")
      continue
    one = {"rope_parameters": given, "rope_scaling": None, "rope_theta": thetas[layer_type]}
    _check_rope(one, problems)
    ropes[layer_type] = one["rope_parameters"]
  values["rope_parameters"] = ropes


def _raise(problems: list[str], what: str, file: str | os.PathLike | None) -> None:
  where = str(file) if file is not None else f"the Hugging Face config of {what}"
  count = f"{len(problems)} invalid field{'s' if len(problems) > 1 else ''}"
  message = f"{where} has {count}:\n  " + "\n  ".join(problems)
  if file is not None:
    raise CheckpointError(message + "\nFix these fields in config.json; it must describe the "
                          "weights stored next to it (compare with the model's original "
                          "config.json).")
  raise ConfigError(message + "\nFix these fields of the config.")


def check(config: Mapping[str, Any], architecture: str, *,
          file: str | os.PathLike | None = None) -> dict[str, Any]:
  """The values ``architecture`` builds from, every field of its :class:`Schema` checked.

  Args:
    config: the Hugging Face config dict.
    architecture: a key of :data:`SCHEMAS` (``"LlamaForCausalLM"``, ``"BertModel"``, ...).
    file: the ``config.json`` it came from, named in the error.

  Returns:
    Field -> value for every field of the schema, defaults filled and derived fields computed;
    with RoPE, ``rope_parameters`` is ``{"rope_type", "rope_theta", ...its fields}``.

  Raises:
    CheckpointError (with ``file``) or ConfigError (without): one error listing every invalid,
    missing or inconsistent field with its value and what was expected.
  """
  schema = SCHEMAS[architecture]
  problems: list[str] = []
  values = _check_fields(config, schema, problems)
  if schema.rope:
    (_check_layer_type_ropes if schema.rope_per_layer_type else _check_rope)(values, problems)
  if problems:
    _raise(problems, architecture, file)
  return values


def check_selection(config: Mapping[str, Any], *, file: str | os.PathLike | None = None) -> None:
  """Check the fields that pick the family (``architectures``, ``model_type``); errors as
  :func:`check`."""
  problems: list[str] = []
  _check_fields(config, SELECTION, problems)
  if problems:
    _raise(problems, "this model", file)


def label_count(config: Mapping[str, Any], num_labels: Any = None) -> int:
  """The size of a classification head: ``num_labels``, else the config's ``num_labels``, else
  the length of its ``id2label``, else 2 (as transformers). ConfigError when not an int >= 1."""
  if num_labels is None:
    num_labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
  if not _size().valid(num_labels):
    raise ConfigError(f"num_labels={num_labels!r} is invalid: expected a positive integer.")
  return num_labels
