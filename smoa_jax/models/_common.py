"""Pieces shared by the model families: the HF key-map machinery, layer factory, masks, attention.

Key maps are data. A :class:`KeyRule` pairs a Hugging Face state-dict name template with our
module-path template, e.g. ``"model.layers.{i}.self_attn.{p:[qkvo]_proj}.weight"`` <->
``"model/layers/{i}/self_attn/{p}/kernel"``; ``{name}`` matches digits (a layer index) and
``{name:regex}`` the given regex (no braces; write a module separator as ``\\.``, it becomes
``/`` on the path side). ``transpose=True`` marks a torch ``nn.Linear``
``torch_weight (out, in)`` stored by us as ``kernel (in, out)``. The same table drives loading
(HF name -> path) and export (path -> HF name).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from smoa_jax.errors import ConfigError

__all__ = [
    "KeyRule", "KeyMap", "linear_rules", "norm_rules", "prefixed", "HFModel", "LayerFactory",
    "activation", "attention", "make_attention_mask", "hf_get", "ShardingRule",
    "stack_layers", "scan_layers",
]

# (regex over a Variable path, mesh axis or None per array axis); see smoa_jax.spmd.
ShardingRule = tuple[str, tuple[str | None, ...]]
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")


def _placeholder_patterns(*templates: str) -> dict[str, str]:
  """``{name: regex}`` declared in any of the templates (``{name:regex}``); digits otherwise."""
  patterns: dict[str, str] = {}
  for template in templates:
    for m in _PLACEHOLDER.finditer(template):
      if m.group(2):
        patterns[m.group(1)] = m.group(2)
  return patterns


def _template_regex(template: str, patterns: Mapping[str, str] | None = None) -> re.Pattern[str]:
  """Compile a template into a full-match regex; placeholders become named groups."""
  patterns = {**_placeholder_patterns(template), **(patterns or {})}
  out, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    out.append(re.escape(template[pos:m.start()]))
    out.append(f"(?P<{m.group(1)}>{patterns.get(m.group(1), '[0-9]+')})")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out))


def _fill(template: str, match: re.Match[str], sep: tuple[str, str]) -> str:
  """Substitute the matched placeholder values, converting separators ``sep[0]`` -> ``sep[1]``."""
  return _PLACEHOLDER.sub(lambda p: match.group(p.group(1)).replace(*sep), template)


@dataclasses.dataclass(frozen=True)
class KeyRule:
  """One row of a key map: HF name template <-> module-path template (``/``-separated).

  ``transpose``: the HF tensor is a torch ``nn.Linear`` ``torch_weight (out, in)`` and ours the
  ``kernel (in, out)``; a transpose converts either way.
  """

  hf: str
  path: str
  transpose: bool = False

  def __post_init__(self):
    patterns = _placeholder_patterns(self.hf, self.path)
    path_patterns = {k: v.replace(r"\.", "/") for k, v in patterns.items()}
    object.__setattr__(self, "_hf_re", _template_regex(self.hf, patterns))
    object.__setattr__(self, "_path_re", _template_regex(self.path, path_patterns))

  def hf_to_path(self, hf_key: str) -> str | None:
    m = self._hf_re.fullmatch(hf_key)
    return None if m is None else _fill(self.path, m, (".", "/"))

  def path_to_hf(self, path: str) -> str | None:
    m = self._path_re.fullmatch(path)
    return None if m is None else _fill(self.hf, m, ("/", "."))


def linear_rules(hf: str, path: str, *, transpose: bool = True) -> tuple[KeyRule, ...]:
  """Rules for a linear layer: ``{hf}.weight`` -> ``{path}/kernel`` and ``{hf}.bias`` -> bias."""
  return (KeyRule(f"{hf}.weight", f"{path}/kernel", transpose), KeyRule(f"{hf}.bias", f"{path}/bias"))


def norm_rules(hf: str, path: str) -> tuple[KeyRule, ...]:
  """Rules for a LayerNorm/RMSNorm: HF ``weight`` is our ``scale``; ``bias`` stays ``bias``."""
  return (KeyRule(f"{hf}.weight", f"{path}/scale"), KeyRule(f"{hf}.bias", f"{path}/bias"))


def prefixed(rules: Iterable[KeyRule], prefix: str) -> tuple[KeyRule, ...]:
  """The same rules one module level down: HF ``{prefix}.`` and path ``{prefix}/`` in front."""
  return tuple(KeyRule(f"{prefix}.{r.hf}", f"{prefix}/{r.path}", r.transpose) for r in rules)


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """A model class's full correspondence with a Hugging Face state dict.

  Attributes:
    rules: the :class:`KeyRule` table.
    ignore: HF name templates dropped silently on load (non-persistent buffers that old
      checkpoints carry, heads of other architectures, a tied ``lm_head.weight``).
    fresh: path regexes of parameters that may be absent from a checkpoint; they keep a fresh
      initialization (e.g. a new classification head) and a warning names them.
    renames: ``(old_suffix, new_suffix)`` legacy spellings rewritten before matching
      (``LayerNorm.gamma`` -> ``LayerNorm.weight``).
    prefix: the base-model prefix this class's names start with (``"model"``, ``"bert"``), or
      ``""`` for a bare base model.
    base_prefix: the family's base-model prefix; checkpoints of a head class that carry it are
      stripped when loading a bare base model, and prefix-less base checkpoints get ``prefix``.
  """

  rules: tuple[KeyRule, ...]
  ignore: tuple[str, ...] = ()
  fresh: tuple[str, ...] = ()
  renames: tuple[tuple[str, str], ...] = ()
  prefix: str = ""
  base_prefix: str = ""

  def __post_init__(self):
    object.__setattr__(self, "_ignore_re", tuple(_template_regex(p) for p in self.ignore))

  def normalize(self, hf_keys: Sequence[str]) -> dict[str, str]:
    """Canonical HF name (as our rules spell it) -> the name found in the checkpoint."""
    def canon(key: str) -> str:
      for old, new in self.renames:
        if key.endswith(old):
          key = key[: -len(old)] + new
      return key

    keys = {canon(k): k for k in hf_keys}
    if self.prefix and not any(k.startswith(self.prefix + ".") for k in keys):
      # a bare base-model checkpoint: its names gain the prefix, head names (lm_head) stay
      keys = {(k if self.path_for(k) or self.ignored(k) else f"{self.prefix}.{k}"): v
              for k, v in keys.items()}
    elif not self.prefix and self.base_prefix:
      strip = self.base_prefix + "."
      keys = {(k[len(strip):] if k.startswith(strip) else k): v for k, v in keys.items()}
    return keys

  def path_for(self, hf_key: str) -> tuple[str, bool] | None:
    """``(path, transpose)`` for a canonical HF name, or None when no rule matches."""
    for rule in self.rules:
      path = rule.hf_to_path(hf_key)
      if path is not None:
        return path, rule.transpose
    return None

  def hf_for(self, path: str) -> tuple[str, bool] | None:
    """``(hf_name, transpose)`` for one of our parameter paths, or None."""
    for rule in self.rules:
      key = rule.path_to_hf(path)
      if key is not None:
        return key, rule.transpose
    return None

  def ignored(self, hf_key: str) -> bool:
    return any(p.fullmatch(hf_key) for p in self._ignore_re)

  def may_be_fresh(self, path: str) -> bool:
    return any(re.fullmatch(p, path) for p in self.fresh)


_REQUIRED = object()


def hf_get(config: Mapping[str, Any], *names: str, default: Any = _REQUIRED) -> Any:
  """The first of ``names`` present (and not None) in an HF config; raise if none and no default."""
  for name in names:
    if config.get(name) is not None:
      return config[name]
  if default is _REQUIRED:
    raise ConfigError(f"the Hugging Face config has no {' / '.join(names)!s}; expected an integer "
                      "field of that name in config.json.")
  return default


class HFModel(nnx.Module):
  """Base of every model family: keeps the HF config and knows its key map.

  Subclasses set ``architecture`` (the HF class name written to ``config.json``) and
  ``sharding_rules`` (Megatron-style partitioning, :mod:`smoa_jax.spmd`) and implement
  :meth:`key_map`. ``scan_layers`` is True when the layers are stacked (:func:`stack_layers`).
  ``hf_config`` is a copy of the Hugging Face config dict (stored as JSON so the module stays
  hashable under ``nnx.jit``); ``source_dir`` is the directory the weights came from (set by
  :func:`smoa_jax.from_hf`) so an export can copy its tokenizer files.
  """

  architecture: ClassVar[str] = ""
  sharding_rules: ClassVar[tuple[ShardingRule, ...]] = ()
  scan_layers: bool = False

  def _set_hf_config(self, hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Store the config (a dict or a ``transformers`` config object); returns it as a dict."""
    if hasattr(hf_config, "to_dict"):
      hf_config = hf_config.to_dict()
    config = json.loads(json.dumps(dict(hf_config), default=str))
    config["architectures"] = [self.architecture]
    self._hf_config_json = json.dumps(config, sort_keys=True)
    self.source_dir: str | None = None
    return config

  @property
  def hf_config(self) -> dict[str, Any]:
    """A fresh copy of the Hugging Face config dict (editing it does not change the model)."""
    return json.loads(self._hf_config_json)

  def key_map(self) -> KeyMap:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """Builds the ``nnx`` layers of one model with shared dtypes and HF-style initialization.

  ``dtype`` is the compute dtype (None: from the inputs and params), ``param_dtype`` the storage
  dtype; weights are ``normal(std)`` like Hugging Face's ``initializer_range``, biases zero and
  norm scales one.
  """

  dtype: Dtype | None
  param_dtype: Dtype
  std: float
  rngs: nnx.Rngs

  def linear(self, in_features: int, out_features: int, use_bias: bool) -> nnx.Linear:
    """``nnx.Linear`` with ``kernel (in, out)``."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, kernel_init=nnx.initializers.normal(self.std),
                      rngs=self.rngs)

  def embed(self, num_embeddings: int, features: int) -> nnx.Embed:
    """``nnx.Embed`` with ``embedding (num, features)``."""
    return nnx.Embed(num_embeddings, features, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nnx.initializers.normal(self.std), rngs=self.rngs)

  def rms_norm(self, features: int, eps: float) -> nnx.RMSNorm:
    return nnx.RMSNorm(features, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       rngs=self.rngs)

  def layer_norm(self, features: int, eps: float) -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         use_fast_variance=False, rngs=self.rngs)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation an HF config names (``hidden_act`` / ``activation_function``)."""
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ConfigError(f"activation {name!r} is not supported; expected one of "
                      f"{sorted(_ACTIVATIONS)}.") from None


def make_attention_mask(attention_mask: jax.Array | None, query_len: int, *, causal: bool,
                        sliding_window: int | None = None) -> jax.Array | None:
  """Boolean mask ``(B | 1, 1, T, S)``, True where a query may attend a key (``S == T``).

  ``attention_mask (B, S)`` holds 1 for real tokens and 0 for padding (HF convention). Causal:
  key ``s <= t``; with ``sliding_window`` w also ``t - s < w`` (HF's sliding-window rule).
  """
  mask = None
  if causal:
    t = jnp.arange(query_len)[:, None]
    s = jnp.arange(query_len)[None, :]
    mask = s <= t
    if sliding_window is not None:
      mask = mask & (t - s < sliding_window)
    mask = mask[None, None]
  if attention_mask is not None:
    pad = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    mask = pad if mask is None else mask & pad
  return mask


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
              scale: float) -> jax.Array:
  """Softmax attention with grouped KV heads, softmax in float32.

  ``query (B, T, N, D)``, ``key``/``value (B, S, K, D)`` with ``N % K == 0`` (GQA: query head
  ``n`` reads KV head ``n // (N // K)``, as HF's ``repeat_kv``), ``mask`` boolean broadcastable
  to ``(B, N, T, S)`` -> ``(B, T, N, D)``. A query with no visible key gets the mean of the values
  instead of NaN.
  """
  return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)


# -- stacked (scanned) layers ----------------------------------------------------------------------
def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """``num_layers`` layers as ONE module whose Variables carry a leading layer axis ``(L, ...)``.

  Built under ``nnx.vmap`` with split rngs (every layer initialized differently) and run by
  :func:`scan_layers`: the layer body is traced and compiled once instead of L times.
  """
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers)
  def build(layer_rngs: nnx.Rngs) -> nnx.Module:
    return make_layer(layer_rngs)

  return build(rngs)


def scan_layers(step: Callable[[nnx.Module, jax.Array, Any], jax.Array], layers: nnx.Module,
                x: jax.Array, per_layer: Any = None) -> jax.Array:
  """``x = step(layer_i, x, per_layer[i])`` for i = 0..L-1 under ``nnx.scan``.

  ``layers`` is a stacked module (:func:`stack_layers`); ``per_layer`` a pytree of arrays with a
  leading ``L`` axis (or None); ``x`` the carry, e.g. hidden states ``(B, T, hidden)``.
  """
  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
  def body(carry: jax.Array, layer: nnx.Module, item: Any) -> jax.Array:
    return step(layer, carry, item)

  return body(x, layers, per_layer)


