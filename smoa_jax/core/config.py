"""Adapter configurations: frozen, keyword-friendly dataclasses validated on construction.

One config class per method, all sharing the targeting fields:

* :class:`SMoAConfig` -- spectral blocks + Hadamard-modulated low-rank update (DESIGN section 1);
* :class:`LoRAConfig` -- ``dW = (alpha/r) a @ b``;
* :class:`HiRAConfig` -- ``dW = (alpha/r) (a @ b) * W`` over the whole matrix;
* :class:`FullFineTuneConfig` -- the targeted kernels themselves become trainable (upper bound).

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

__all__ = [
    "AdapterConfig",
    "SMoAConfig",
    "LoRAConfig",
    "HiRAConfig",
    "FullFineTuneConfig",
    "split_sizes",
    "config_from_dict",
]

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


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
    param_dtype: dtype in which the trainable factors are stored.
    adapter_dtype: dtype in which the adapter update is computed (float32 unless you choose).
  """

  method: ClassVar[str] = "base"
  _: dataclasses.KW_ONLY
  dropout: float = 0.0
  target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
  exclude_modules: tuple[str, ...] | str | None = None
  layers_to_transform: tuple[int, ...] | None = None
  param_dtype: str = "float32"
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
    self._set("param_dtype", _canonical_dtype(name, "param_dtype", self.param_dtype))
    self._set("adapter_dtype", _canonical_dtype(name, "adapter_dtype", self.adapter_dtype))

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


@dataclasses.dataclass(frozen=True)
class SMoAConfig(AdapterConfig):
  """Spectrum Modulation Adapter: K spectral blocks, each ``dW_k = (alpha/r)(a_k b_k) * W_k``.

  Attributes:
    r: total rank, split over the blocks (``split_sizes(r, num_blocks)``) unless
      ``branch_ranks`` is given. Trainable parameters ``sum_k r_k (|C_k| + |R_k|)``.
    num_blocks: K, the number of aligned spectral blocks (``1 <= K <= min(in, out)``).
    alpha: scale numerator; the update is multiplied by ``alpha / r``.
    branch_ranks: optional per-block ranks, K non-negative ints summing to ``r``; a block with
      rank 0 stays frozen.
    spectral_method: ``"gram"`` (eigh of the smaller Gram matrix + one matmul, 3-5x faster),
      ``"svd"``, or ``"auto"`` (Gram, falling back to the SVD for kernels the float32 Gram matrix
      cannot resolve; see :mod:`smoa_jax.core.spectral`).
  """

  method: ClassVar[str] = "smoa"
  r: int = 8
  num_blocks: int = 2
  alpha: float = 16.0
  _: dataclasses.KW_ONLY
  branch_ranks: tuple[int, ...] | None = None
  spectral_method: str = "auto"

  def __post_init__(self):
    super().__post_init__()
    self._check_rank_and_alpha()
    k = self.num_blocks
    if not _is_int(k) or k < 1:
      raise _fail("SMoAConfig", "num_blocks", k, "an int >= 1")
    self._set("num_blocks", int(k))
    ranks = self.branch_ranks
    if ranks is not None:
      if isinstance(ranks, str) or not isinstance(ranks, Sequence):
        raise _fail("SMoAConfig", "branch_ranks", ranks, f"None or a list of {k} ints")
      ranks = tuple(ranks)
      if len(ranks) != k:
        raise _fail("SMoAConfig", "branch_ranks", ranks,
                    f"exactly num_blocks={k} entries, got {len(ranks)}")
      if not all(_is_int(x) and x >= 0 for x in ranks):
        raise _fail("SMoAConfig", "branch_ranks", ranks, "non-negative ints")
      if sum(ranks) != self.r:
        raise _fail("SMoAConfig", "branch_ranks", ranks,
                    f"entries summing to r={self.r}, got sum {sum(ranks)}")
      self._set("branch_ranks", tuple(int(x) for x in ranks))
    if self.spectral_method not in ("auto", "gram", "svd"):
      raise _fail("SMoAConfig", "spectral_method", self.spectral_method,
                  "one of 'auto', 'gram', 'svd'")

  @property
  def block_ranks(self) -> tuple[int, ...]:
    """The rank r_k of every block (``branch_ranks`` or the even split of ``r``)."""
    return self.branch_ranks if self.branch_ranks is not None else split_sizes(self.r, self.num_blocks)

  def check_layer(self, in_features: int, out_features: int, path: str = "<layer>") -> None:
    if self.num_blocks > min(in_features, out_features):
      raise ConfigError(
          f"SMoAConfig.num_blocks={self.num_blocks} is too large for {path} with kernel "
          f"(in={in_features}, out={out_features}): every block needs at least one input and one "
          f"output coordinate, so num_blocks must be <= {min(in_features, out_features)}. "
          "Lower num_blocks or exclude this module.")


@dataclasses.dataclass(frozen=True)
class _SingleBlockConfig(AdapterConfig):
  """A rank-r pair ``a (in, r)``, ``b (r, out)`` over the whole kernel, scaled by ``alpha / r``."""

  r: int = 8
  alpha: float = 16.0

  def __post_init__(self):
    super().__post_init__()
    self._check_rank_and_alpha()


@dataclasses.dataclass(frozen=True)
class LoRAConfig(_SingleBlockConfig):
  """LoRA baseline: ``dW = (alpha/r) a @ b``, ``a`` uniform in ``+-1/sqrt(in)``, ``b`` zeros."""

  method: ClassVar[str] = "lora"


@dataclasses.dataclass(frozen=True)
class HiRAConfig(_SingleBlockConfig):
  """HiRA baseline: ``dW = (alpha/r) (a @ b) * W`` over the whole kernel (SMoA with K=1, no permutation)."""

  method: ClassVar[str] = "hira"


@dataclasses.dataclass(frozen=True)
class FullFineTuneConfig(AdapterConfig):
  """Full fine-tuning of the targeted kernels (the upper bound in comparisons).

  The targeted layers stay plain ``nnx.Linear``; their ``kernel`` becomes an ``SMoAParam`` so the
  same optimizer filter trains them. ``dropout``, ``param_dtype`` and ``adapter_dtype`` are unused.
  """

  method: ClassVar[str] = "full"


_CONFIG_TYPES: dict[str, type[AdapterConfig]] = {
    c.method: c for c in (SMoAConfig, LoRAConfig, HiRAConfig, FullFineTuneConfig)
}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
  """Rebuild a config from :meth:`AdapterConfig.to_dict` output; unknown keys are an error."""
  if not isinstance(data, dict):
    raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}")
  data = dict(data)
  method = data.pop("method", None)
  if method not in _CONFIG_TYPES:
    raise ConfigError(f"adapter config 'method'={method!r} is invalid: expected one of "
                      f"{sorted(_CONFIG_TYPES)}.")
  cls = _CONFIG_TYPES[method]
  known = {f.name for f in dataclasses.fields(cls)} - {"_"}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ConfigError(f"adapter config for method {method!r} has unknown fields {unknown}; "
                      f"known fields are {sorted(known)}.")
  return cls(**data)
