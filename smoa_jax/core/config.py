"""What every adapter config shares: targeting and dtype fields, validation, the method registry.

Configs are frozen, keyword-friendly dataclasses validated on construction. Each method's module
defines its own (:mod:`smoa_jax.core.smoa`, ``hira``, ``lora``, ``full``) on top of
:class:`AdapterConfig` and registers itself under its ``method`` name, which is how
:func:`smoa_jax.config_from_dict` finds it again. A config knows how to describe one layer:
``make_op(in_features, out_features, blocks)`` returns the method's op
(:class:`smoa_jax.core.ops.AdapterOp`).

Every invalid value raises :class:`smoa_jax.errors.ConfigError` (a ``ValueError``) naming the
field, the value and what is allowed. Dtype fields accept a dtype or its name and are stored as
the canonical name (``"float32"``), so a config round-trips through JSON unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Sequence

import jax.numpy as jnp
import numpy as np

from smoa_jax.errors import ConfigError

__all__ = ["AdapterConfig", "LowRankConfig", "split_sizes", "config_from_dict", "METHODS"]

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
# method name -> config class; filled by each method's module as it is defined.
METHODS: dict[str, type["AdapterConfig"]] = {}


def split_sizes(total: int, num_pieces: int) -> tuple[int, ...]:
  """Sizes of ``num_pieces`` contiguous pieces of ``total`` items (numpy ``array_split`` rule).

  Every piece has ``total // num_pieces`` items and the first ``total % num_pieces`` pieces one
  more, e.g. ``split_sizes(10, 3) == (4, 3, 3)``.
  """
  base, extra = divmod(total, num_pieces)
  return tuple(base + (1 if k < extra else 0) for k in range(num_pieces))


def _fail(cls_name: str, field: str, value: Any, expected: str) -> ConfigError:
  return ConfigError(f"{cls_name}.{field}={value!r} is invalid: expected {expected}.")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _canonical_dtype(cls_name: str, field: str, value: Any) -> str:
  try:
    dtype = jnp.dtype(value)
  except TypeError as err:
    raise _fail(cls_name, field, value, "a floating dtype such as 'float32' or 'bfloat16'") from err
  if not jnp.issubdtype(dtype, jnp.floating):
    raise _fail(cls_name, field, value, "a floating dtype such as 'float32' or 'bfloat16'")
  return dtype.name


def _canonical_patterns(cls_name: str, field: str, value: Any, *, optional: bool):
  """Names (tuple of str) or one regex (str); validated so a typo fails here, not at injection."""
  if value is None and optional:
    return None
  if isinstance(value, str):
    if not value:
      raise _fail(cls_name, field, value, "a non-empty regex or a non-empty list of module names")
    try:
      re.compile(value)
    except re.error as err:
      raise _fail(cls_name, field, value, f"a valid regular expression ({err})") from err
    return value
  if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
    names = tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
      raise _fail(cls_name, field, value, "a non-empty list of non-empty module names")
    return names
  raise _fail(cls_name, field, value, "a regex string or a list of module names")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Fields shared by every method: which layers to adapt and in which dtypes.

  Attributes:
    dropout: dropout rate on the adapter path's input, in ``[0, 1)``; the frozen path never sees
      dropout. Zero (the default) lets SMoA/HiRA fold the update into the kernel (fastest path).
    target_modules: module names matched against the last component(s) of a module path
      (``"q_proj"`` matches ``.../self_attn/q_proj``; ``"self_attn/q_proj"`` matches two
      components), or one regex string full-matched against the ``/``-joined path.
    exclude_modules: same forms as ``target_modules``; matching modules are skipped.
    layers_to_transform: only adapt modules whose path holds one of these layer indices
      (the integer component after ``layers``/``layer``/``h``/``blocks``).
    param_dtype: dtype in which the trainable factors are stored (the optimizer state follows
      them); None (the default): ``adapter_dtype``.
    adapter_dtype: dtype in which the adapter update is computed, and the factors stored unless
      ``param_dtype`` says otherwise. float32 by default, also on a bfloat16 base model (mixed
      precision: the frozen base in bfloat16, factors, their updates and AdamW state in float32);
      ``"bfloat16"`` makes the factors and the optimizer state bfloat16 as well.
  """

  method: ClassVar[str] = "base"
  # The targeted kernels themselves are trained (full fine-tuning): no adapter layer is injected.
  trains_base_kernel: ClassVar[bool] = False
  # The method works in W's spectral order: layers hold in_perm / out_perm (SMoA).
  spectral_order: ClassVar[bool] = False
  # AdamW's peak learning rate when TrainConfig.learning_rate / --lr is not given: chosen on the
  # validation splits of benchmarks/quality_real.py (MiniLM sentiment, SmolLM2 Shakespeare).
  default_learning_rate: ClassVar[float] = 1e-3
  _: dataclasses.KW_ONLY
  dropout: float = 0.0
  target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
  exclude_modules: tuple[str, ...] | str | None = None
  layers_to_transform: tuple[int, ...] | None = None
  param_dtype: str | None = None
  adapter_dtype: str = "float32"

  def __post_init__(self):
    name = type(self).__name__
    dropout = self.dropout
    if not isinstance(dropout, (int, float, np.floating)) or isinstance(dropout, bool) or not (
        0.0 <= float(dropout) < 1.0):
      raise _fail(name, "dropout", dropout, "a float in [0, 1)")
    self._set("dropout", float(dropout))
    self._set("target_modules",
              _canonical_patterns(name, "target_modules", self.target_modules, optional=False))
    self._set("exclude_modules",
              _canonical_patterns(name, "exclude_modules", self.exclude_modules, optional=True))
    layers = self.layers_to_transform
    if layers is not None:
      layers = (layers,) if _is_int(layers) else layers
      if (not isinstance(layers, Sequence) or isinstance(layers, str) or not layers
          or not all(_is_int(i) and i >= 0 for i in layers)):
        raise _fail(name, "layers_to_transform", self.layers_to_transform,
                    "None, a non-negative int or a non-empty list of non-negative ints")
      self._set("layers_to_transform", tuple(int(i) for i in layers))
    self._set("adapter_dtype", _canonical_dtype(name, "adapter_dtype", self.adapter_dtype))
    self._set("param_dtype", self.adapter_dtype if self.param_dtype is None else
              _canonical_dtype(name, "param_dtype", self.param_dtype))

  def __init_subclass__(cls, **kwargs: Any):
    super().__init_subclass__(**kwargs)
    if "method" in cls.__dict__:
      METHODS[cls.method] = cls

  def _set(self, field: str, value: Any) -> None:
    object.__setattr__(self, field, value)

  def _check_rank_and_alpha(self) -> None:
    name = type(self).__name__
    if not _is_int(self.r) or self.r < 1:
      raise _fail(name, "r", self.r, "an int >= 1 (the total adapter rank)")
    self._set("r", int(self.r))
    alpha = self.alpha
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number))
        or not math.isfinite(float(alpha)) or float(alpha) <= 0):
      raise _fail(name, "alpha", alpha, "a finite number > 0 (the update is scaled by alpha / r)")
    self._set("alpha", float(alpha))

  @property
  def scaling(self) -> float:
    """``alpha / r``: the factor in front of every update (r is the TOTAL rank)."""
    return self.alpha / self.r

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict with a ``method`` key; :func:`config_from_dict` inverts it."""
    out: dict[str, Any] = {"method": self.method}
    for f in dataclasses.fields(self):
      if f.name == "_":
        continue
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    return out

  def check_layer(self, in_features: int, out_features: int, path: str = "<layer>") -> None:
    """Raise :class:`ConfigError` if this config cannot adapt an ``(in, out)`` kernel."""
    del in_features, out_features, path

  def make_op(self, in_features: int, out_features: int, blocks: Any = None) -> Any:
    """The op (:class:`smoa_jax.core.ops.AdapterOp`) of one ``(in, out)`` layer; ``blocks``
    are its :class:`~smoa_jax.SpectralBlocks` when ``spectral_order``."""
    raise ConfigError(f"{type(self).__name__} is not an adapter method; use SMoAConfig, "
                      "LoRAConfig, HiRAConfig or FullFineTuneConfig.")


@dataclasses.dataclass(frozen=True)
class LowRankConfig(AdapterConfig):
  """A rank-r pair ``a (in, r)``, ``b (r, out)`` over the whole kernel, scaled by ``alpha / r``
  (the shared fields of LoRA and HiRA)."""

  r: int = 8
  alpha: float = 16.0

  def __post_init__(self):
    super().__post_init__()
    self._check_rank_and_alpha()


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
  """Rebuild a config from :meth:`AdapterConfig.to_dict` output; unknown keys are an error."""
  if not isinstance(data, dict):
    raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}")
  data = dict(data)
  method = data.pop("method", None)
  if method not in METHODS:
    raise ConfigError(f"adapter config 'method'={method!r} is invalid: expected one of "
                      f"{sorted(METHODS)}.")
  cls = METHODS[method]
  known = {f.name for f in dataclasses.fields(cls)} - {"_"}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ConfigError(f"adapter config for method {method!r} has unknown fields {unknown}; "
                      f"known fields are {sorted(known)}.")
  return cls(**data)
