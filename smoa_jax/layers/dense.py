"""Flax NNX layers: ``SMoADense`` (and the ``LoRADense`` / ``HiRADense`` baselines), one thin
shell over any method's op.

Each is a drop-in for ``nnx.Linear``: the frozen weights keep the paths ``kernel`` ``(in, out)``
and ``bias`` ``(out,)``, so checkpoints and sharding rules written for ``nnx.Linear`` still apply.
The adapter adds:

* ``lora_a``, ``lora_b`` -- trainable, of type :class:`~smoa_jax.TrainableParam` (a subclass of
  ``nnx.LoRAParam``): ``nnx.Optimizer(model, tx, wrt=smoa_jax.TrainableParam)`` trains only them;
* ``in_perm``, ``out_perm`` -- for methods that work in W's spectral order (SMoA), of type
  :class:`~smoa_jax.SpectralIndex`: the permutations, non-trainable state saved with the adapter.

The math lives in the method's op (:mod:`smoa_jax.core.ops`: ``config.make_op(in, out,
blocks)``); the layer only holds state and picks the path (folded when the adapter's dropout
is inactive, unfolded otherwise). :class:`AdaptedDense` serves every method; ``SMoADense``,
``LoRADense`` and ``HiRADense`` are the same layer restricted to their config class (at
construction; a layer may later hold adapters of other methods).

Several named adapters (docs/design.md section 3): the layer's ACTIVE adapter, named
``adapter_name`` (``"default"`` unless named otherwise), always sits at the paths above, so a
model with one unnamed adapter has exactly the paths and files it always had. Every other
adapter the layer holds waits in ``inactive[name]`` (a :class:`StoredAdapter`: its config, op,
dropout and arrays as :class:`~smoa_jax.layers.variables.InactiveArray`, which nothing trains).
:meth:`AdaptedDense.set_adapter` swaps Variables between the two places: the kernel and bias are
never touched, the arrays are moved (never copied or recomputed), so switching back restores the
same outputs bit for bit. A layer may also have no active adapter (``adapter_name is None``):
it then computes ``x @ W + bias``.

Sharding: when the kernel carries ``out_sharding`` metadata, the factors inherit its in/out mesh
axes (:func:`factor_specs`) and the permutations are replicated; on a kernel laid out on a mesh
they are created there (:func:`shard_like_kernel`). A stacked kernel ``(L, in, out)`` (scanned
layers, :mod:`smoa_jax.layers.stacked`) gives stacked factors; the methods below then map over L.

Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import smoa_jax
    >>> linear = nnx.Linear(16, 24, rngs=nnx.Rngs(0))
    >>> layer = smoa_jax.SMoADense.from_linear(
    ...     linear, smoa_jax.SMoAConfig(r=4, num_blocks=2, alpha=8), rngs=nnx.Rngs(1))
    >>> y = layer(jnp.ones((3, 16)))          # == linear(x) at step 0 (b = 0)
    >>> layer.delta_weight().shape
    (16, 24)
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, ClassVar, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PrecisionLike

from smoa_jax.core import ops
from smoa_jax.core.config import AdapterConfig
from smoa_jax.core.methods import HiRAConfig, LoRAConfig, SMoAConfig
from smoa_jax.core.spectral import SpectralBlocks, spectral_blocks
from smoa_jax.errors import AdapterMismatchError, ConfigError, KernelError
from smoa_jax.layers.variables import (InactiveArray, SMoAParam, SpectralIndex, TrainableParam,
                                       retyped)
from smoa_jax.parallel import sharding

__all__ = [
    "TrainableParam",
    "SMoAParam",
    "SpectralIndex",
    "AdaptedDense",
    "StoredAdapter",
    "DEFAULT_ADAPTER",
    "check_adapter_name",
    "SMoADense",
    "HiRADense",
    "LoRADense",
    "adapter_class",
    "factor_specs",
    "shard_like_kernel",
]

default_kernel_init = initializers.lecun_normal()
# The name of an adapter given none (PEFT's name for its first adapter).
DEFAULT_ADAPTER = "default"
# Active array -> (its Variable type while active, its name inside a StoredAdapter). Stored names
# differ on purpose: tools that label pure dicts by leaf name ("lora_a") must not train them.
_ARRAYS = {"lora_a": (TrainableParam, "a"), "lora_b": (TrainableParam, "b"),
           "in_perm": (SpectralIndex, "in_perm"), "out_perm": (SpectralIndex, "out_perm")}


def check_adapter_name(name: Any) -> str:
  """``name`` if it can name an adapter (letters, digits, ``_`` and ``-``); else ConfigError."""
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
    raise ConfigError(f"adapter name {name!r} is invalid: expected a non-empty string of letters, "
                      "digits, '_' and '-' (it becomes part of parameter paths).")
  return name


def factor_specs(kernel_spec: tuple[Any, ...], a_ndim: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """``(lora_a, lora_b)`` specs from the kernel's ``(..., in, out)`` spec.

  The factors inherit the kernel's in/out mesh axes and any leading (stacked layer) axes; block
  and rank axes are replicated. SMoA / HiRA: ``a (..., K, max_in, max_r) -> (..., None, in, None)``
  and ``b (..., K, max_r, max_out) -> (..., None, None, out)``; LoRA: ``a (..., in, r) -> (..., in,
  None)`` and ``b (..., r, out) -> (..., None, out)``.
  """
  *lead, in_axis, out_axis = kernel_spec
  if a_ndim - len(lead) == 3:
    return (*lead, None, in_axis, None), (*lead, None, None, out_axis)
  return (*lead, in_axis, None), (*lead, None, out_axis)


def shard_like_kernel(kernel: nnx.Variable, value: jax.Array,
                      spec: tuple[Any, ...] | None) -> tuple[jax.Array, dict[str, Any]]:
  """A new array of the layer sharded like its kernel: ``(value, Variable metadata)``.

  Only when the kernel carries ``out_sharding`` metadata. ``spec`` falls back to replication on
  axes that do not divide the mesh (``sharding.fit_spec``); when the kernel is laid out on a mesh
  and not eagerly sharded by Flax, the value is placed on that mesh.
  """
  kernel_spec = kernel.get_metadata("out_sharding", None)
  if kernel_spec is None or len(kernel_spec) != len(kernel.shape):
    return value, {}
  eager = kernel.get_metadata("eager_sharding", True)
  mesh = sharding.mesh_of(kernel.get_value())
  context = jax.sharding.get_abstract_mesh()
  fit_mesh = mesh if mesh is not None else (None if context.empty else context)
  if fit_mesh is not None:
    spec = sharding.fit_spec(spec, value.shape, fit_mesh)
  if mesh is not None and not eager:
    value = sharding.place(value, sharding.named(mesh, spec))
  return value, {"out_sharding": tuple(spec), "eager_sharding": eager}


class StoredAdapter(nnx.Module):
  """An adapter a layer holds but does not use: config, op, dropout and its arrays
  (``a``, ``b`` and, in W's spectral order, ``in_perm``/``out_perm``) as ``InactiveArray``."""

  def __init__(self, config: AdapterConfig, op: ops.AdapterOp, arrays: dict[str, nnx.Variable],
               dropout: nnx.Dropout):
    self.config = config
    self.op = op
    self.array_names = tuple(arrays)  # their names while active (lora_a, ...)
    for name, variable in arrays.items():
      setattr(self, _ARRAYS[name][1], retyped(variable, InactiveArray))
    self.dropout = dropout

  def variables(self) -> dict[str, nnx.Variable]:
    """Active name (``lora_a``, ...) -> the stored Variable."""
    return {name: getattr(self, _ARRAYS[name][1]) for name in self.array_names}


class AdaptedDense(nnx.Module):
  """``nnx.Linear`` plus a trainable low-rank update; see the module docstring.

  Args:
    in_features, out_features: kernel shape ``(in, out)``.
    config: the adapter config; its class must match the layer class.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as in ``nnx.Linear``.
    rngs: ``params`` initializes the factors (and new weights); ``dropout`` drives adapter dropout.
    kernel, bias: existing frozen weights (arrays or ``nnx.Param``; a Variable is reused as is,
      metadata included) instead of freshly initialized ones.
    blocks: precomputed spectral blocks for ``kernel`` (SMoA), e.g. from a saved adapter.
    name: the adapter's name (``"default"``); see the module docstring.
  """

  config_type: ClassVar[type[AdapterConfig]] = AdapterConfig

  def __init__(
      self,
      in_features: int,
      out_features: int,
      config: AdapterConfig,
      *,
      use_bias: bool = True,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: PrecisionLike = None,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = initializers.zeros_init(),
      rngs: nnx.Rngs,
      kernel: nnx.Param | jax.Array | None = None,
      bias: nnx.Param | jax.Array | None = None,
      blocks: SpectralBlocks | None = None,
      name: str = DEFAULT_ADAPTER,
  ):
    if not isinstance(config, self.config_type) or config.trains_base_kernel:
      raise ConfigError(f"{type(self).__name__} needs a {self.config_type.__name__} of an adapter "
                        f"method, got {type(config).__name__}; use smoa_jax.adapter_class(config) "
                        "to pick the layer (full fine-tuning trains the kernel itself: use "
                        "apply_adapter).")
    config.check_layer(in_features, out_features, type(self).__name__)
    if kernel is None:
      kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = kernel if isinstance(kernel, nnx.Variable) else nnx.Param(jnp.asarray(kernel))
    if tuple(self.kernel.shape) != (in_features, out_features):
      raise KernelError(f"kernel has shape {tuple(self.kernel.shape)}, expected (in, out) = "
                        f"{(in_features, out_features)}.")
    if use_bias and bias is None:
      bias = bias_init(rngs.params(), (out_features,), param_dtype)
    if use_bias:
      self.bias = bias if isinstance(bias, nnx.Variable) else nnx.Param(jnp.asarray(bias))
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.config = config
    self.adapter_name: str | None = check_adapter_name(name)
    self.inactive = nnx.Dict()
    self.merged = False
    self.disabled = False
    self.op = self._make_op(blocks)
    a, b = self.op.init_factors(rngs.params(), config.param_dtype)
    kernel_spec = self.kernel.get_metadata("out_sharding", None)
    a_spec, b_spec = factor_specs(kernel_spec, a.ndim) if kernel_spec else (None, None)
    a, a_meta = shard_like_kernel(self.kernel, a, a_spec)
    b, b_meta = shard_like_kernel(self.kernel, b, b_spec)
    self.lora_a = TrainableParam(a, **a_meta)
    self.lora_b = TrainableParam(b, **b_meta)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs if config.dropout > 0 else None)

  def _make_op(self, blocks: SpectralBlocks | None) -> ops.AdapterOp:
    """The config's op; a method in W's spectral order also gets its permutation Variables
    (computed from the kernel unless ``blocks`` are given)."""
    if self.config.spectral_order:
      if blocks is None:
        blocks = spectral_blocks(self.kernel[...], self.config.num_blocks,
                                 method=self.config.spectral_method)
      for name, perm in (("in_perm", blocks.in_perm), ("out_perm", blocks.out_perm)):
        value, meta = shard_like_kernel(self.kernel, jnp.asarray(perm, jnp.int32), (None,))
        setattr(self, name, SpectralIndex(value, **meta))
    return self.config.make_op(self.in_features, self.out_features, blocks)

  def _perms(self) -> ops.Perms:
    if self.config.spectral_order:
      return self.in_perm[...], self.out_perm[...]
    return None

  def _kernel_spec(self) -> tuple[Any, ...] | None:
    """The kernel's ``(in, out)`` mesh axes (the last two of a stacked kernel's), if annotated."""
    spec = self.kernel.get_metadata("out_sharding", None)
    if spec is None or len(spec) < 2:
      return None
    return tuple(tuple(e) if isinstance(e, list) else e for e in spec[-2:])

  @property
  def blocks(self) -> SpectralBlocks | None:
    """The layer's :class:`SpectralBlocks` (permutations and block sizes), or None when its
    method works in the natural coordinate order (or no adapter is active)."""
    if self.adapter_name is None or not self.config.spectral_order:
      return None
    layout = self.op.layout
    return SpectralBlocks(self.in_perm[...], self.out_perm[...], layout.in_sizes, layout.out_sizes)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, config: AdapterConfig, *, rngs: nnx.Rngs,
                  blocks: SpectralBlocks | None = None,
                  name: str = DEFAULT_ADAPTER) -> "AdaptedDense":
    """Adapt an existing ``nnx.Linear``: its ``kernel``/``bias`` Variables are reused, not copied."""
    if not hasattr(linear, "kernel") or len(getattr(linear.kernel, "shape", ())) != 2:
      raise KernelError(f"from_linear needs an nnx.Linear-like layer with a 2-D kernel, got "
                        f"{type(linear).__name__}.")
    in_features, out_features = linear.kernel.shape
    bias = getattr(linear, "bias", None)
    return cls(in_features, out_features, config, use_bias=bias is not None,
               dtype=getattr(linear, "dtype", None),
               param_dtype=getattr(linear, "param_dtype", linear.kernel.dtype),
               precision=getattr(linear, "precision", None), rngs=rngs, kernel=linear.kernel,
               bias=bias, blocks=blocks, name=name)

  # -- several named adapters -------------------------------------------------------------------
  @property
  def adapter_names(self) -> tuple[str, ...]:
    """Every adapter the layer holds, the active one first."""
    active = () if self.adapter_name is None else (self.adapter_name,)
    return active + tuple(self.inactive)

  def _check_unmerged(self, what: str) -> None:
    if self.merged:
      raise ConfigError(f"cannot {what} while adapter {self.adapter_name!r} is merged into the "
                        "kernel: call unmerge() (or smoa_jax.unmerge_adapters) first.")

  def _take_active(self) -> tuple[dict[str, nnx.Variable], nnx.Dropout]:
    """Detach the active adapter's arrays and dropout; afterwards no adapter is active."""
    names = [n for n in _ARRAYS if n in ("lora_a", "lora_b") or self.config.spectral_order]
    arrays = {n: getattr(self, n) for n in names}
    dropout = self.dropout
    for n in names:
      delattr(self, n)
    del self.dropout
    self.adapter_name, self.config, self.op = None, None, None
    return arrays, dropout

  def _install(self, name: str, config: AdapterConfig, op: ops.AdapterOp,
               arrays: dict[str, nnx.Variable], dropout: nnx.Dropout) -> None:
    """Make these arrays (re-typed to trainable / permutation Variables, values not copied) the
    active adapter ``name``."""
    for n, variable in arrays.items():
      setattr(self, n, retyped(variable, _ARRAYS[n][0]))
    self.dropout = dropout
    self.adapter_name, self.config, self.op = name, config, op

  def _stash(self) -> None:
    """Move the active adapter (if any) into ``inactive``."""
    if self.adapter_name is not None:
      name, config, op = self.adapter_name, self.config, self.op
      self.inactive[name] = StoredAdapter(config, op, *self._take_active())

  def set_adapter(self, name: str | None) -> None:
    """Make adapter ``name`` active (``None``: none); the one active before is kept, inactive.

    Raises:
      AdapterMismatchError: the layer holds no adapter ``name``.
      ConfigError: the active adapter is merged (unmerge first).
    """
    if name == self.adapter_name:
      return
    if name is not None and name not in self.inactive:
      raise AdapterMismatchError(f"the layer holds no adapter named {name!r}; it holds "
                                 f"{list(self.adapter_names)}.")
    self._check_unmerged("switch adapters")
    self._stash()
    if name is not None:
      stored = self.inactive[name]
      del self.inactive[name]
      self._install(name, stored.config, stored.op, stored.variables(), stored.dropout)

  def adopt(self, other: "AdaptedDense", name: str) -> None:
    """Take ``other``'s active adapter as this layer's active adapter ``name``; the adapter
    active before is kept, inactive. ``other`` must be built over this layer's own kernel
    Variable (``AdaptedDense.from_linear(layer.base_linear(), ...)``).

    Raises:
      AdapterMismatchError: the layer already holds an adapter ``name``, or ``other`` has
        another kernel.
      ConfigError: this layer's active adapter is merged.
    """
    check_adapter_name(name)
    if other.kernel is not self.kernel or other.adapter_name is None:
      raise AdapterMismatchError("adopt() needs an adapter layer over this layer's own kernel "
                                 "Variable, with an active adapter.")
    if name in self.adapter_names:
      raise AdapterMismatchError(f"the layer already holds an adapter named {name!r}; delete it "
                                 "first or choose another name.")
    self._check_unmerged("add an adapter")
    self._stash()
    config, op = other.config, other.op
    self._install(name, config, op, *other._take_active())

  def remove_adapter(self, name: str) -> None:
    """Forget adapter ``name`` (if it was active, no adapter is active afterwards)."""
    if name == self.adapter_name:
      self._check_unmerged("delete the active adapter")
      self._take_active()
    elif name in self.inactive:
      del self.inactive[name]
    else:
      raise AdapterMismatchError(f"the layer holds no adapter named {name!r}; it holds "
                                 f"{list(self.adapter_names)}.")

  def base_linear(self) -> nnx.Linear:
    """A plain ``nnx.Linear`` over this layer's own ``kernel``/``bias`` Variables (not copied);
    the adapters are left behind. Refuses a merged layer (its kernel holds ``W + dW``)."""
    self._check_unmerged("take the base layer")
    linear = self._plain_linear(self.kernel.get_value(),
                                self.bias.get_value() if self.use_bias else None)
    linear.kernel = self.kernel
    if self.use_bias:
      linear.bias = self.bias
    return linear

  # -- math -------------------------------------------------------------------------------------
  @property
  def num_layers(self) -> int | None:
    """L for a stacked layer (``kernel (L, in, out)``, see :mod:`smoa_jax.layers.stacked`), else None."""
    return self.kernel.shape[0] if len(self.kernel.shape) == 3 else None

  def _layerwise(self, fn: Callable[..., jax.Array], *args: Any) -> jax.Array:
    """``fn`` on one layer's arrays, mapped over the leading layer axis of a stacked layer."""
    return fn(*args) if self.num_layers is None else jax.vmap(fn)(*args)

  def base_kernel(self) -> jax.Array:
    """The pristine frozen kernel ``W`` (recovered exactly-up-to-rounding when merged)."""
    kernel = self.kernel[...]
    if self.merged:
      return self._layerwise(self.op.unmerged_kernel, kernel, self.lora_a[...], self.lora_b[...],
                             self._perms())
    return kernel

  def delta_weight(self) -> jax.Array:
    """The dense update ``dW (in, out)`` (adapter dtype); zero outside SMoA's K blocks, and
    everywhere when no adapter is active."""
    if self.adapter_name is None:
      return jnp.zeros(self.kernel.shape, jnp.float32)
    return self._layerwise(self.op.delta, self.base_kernel(), self.lora_a[...], self.lora_b[...],
                           self._perms())

  @property
  def num_trainable_params(self) -> int:
    """Trainable adapter parameters, padding excluded (all layers of a stacked layer)."""
    if self.adapter_name is None:
      return 0
    return self.op.num_params * (self.num_layers or 1)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``y = x @ W + bias + dropout(x) @ dW`` for ``inputs (..., in)`` -> ``(..., out)``."""
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = dtypes.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    if self.merged and self.disabled:
      y = jnp.matmul(x, self.base_kernel().astype(x.dtype), precision=self.precision)
    elif self.merged or self.disabled or self.adapter_name is None:
      y = jnp.matmul(x, kernel, precision=self.precision)
    else:
      drop = self.config.dropout > 0 and not (
          deterministic if deterministic is not None else self.dropout.deterministic)
      x_adapter = self.dropout(x, deterministic=False, rngs=rngs) if drop else None
      y = self.op.apply(x, x_adapter, kernel, self.lora_a[...], self.lora_b[...], self._perms(),
                        self.precision, self._kernel_spec())
    if bias is not None:
      y = y + bias
    return y

  # -- merge ------------------------------------------------------------------------------------
  def merge(self) -> None:
    """Fold dW into the kernel (float32 sum, cast back); the forward then costs a plain matmul."""
    if self.merged or self.adapter_name is None:
      return
    a, b = self.lora_a[...], self.lora_b[...]
    if not bool(jnp.all(self._layerwise(self.op.invertible_merge, a, b, self._perms()))):
      raise ConfigError(
          f"cannot merge {type(self).__name__}: W could not be recovered from W + dW by unmerge "
          "with these factors (for SMoA and HiRA, some entries of 1 + (alpha/r) a_k b_k are ~0). "
          "Use merge_and_unload (which never unmerges) or keep the layer unmerged.")
    self.kernel[...] = self._layerwise(self.op.merged_kernel, self.kernel[...], a, b, self._perms())
    self.merged = True

  def unmerge(self) -> None:
    """Undo :meth:`merge` (W is recovered up to float rounding)."""
    if not self.merged:
      return
    self.kernel[...] = self.base_kernel()
    self.merged = False

  def folded_kernel(self) -> jax.Array:
    """``W + dW`` in the kernel's dtype (summed in float32), without changing the layer."""
    if self.merged or self.adapter_name is None:
      return self.kernel[...]
    return self._layerwise(self.op.merged_kernel, self.kernel[...], self.lora_a[...],
                           self.lora_b[...], self._perms())

  def to_linear(self) -> nnx.Linear:
    """A plain ``nnx.Linear`` holding ``W + dW`` (the adapter folded in)."""
    return self._plain_linear(self.folded_kernel(), self.bias[...] if self.use_bias else None,
                              self.kernel.get_metadata(),
                              self.bias.get_metadata() if self.use_bias else {})

  def _plain_linear(self, kernel: jax.Array, bias: jax.Array | None,
                    kernel_metadata: dict[str, Any] | None = None,
                    bias_metadata: dict[str, Any] | None = None) -> nnx.Linear:
    """An ``nnx.Linear`` with this layer's settings holding ``kernel`` and ``bias``."""
    return nnx.Linear(
        self.in_features, self.out_features, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=kernel.dtype, precision=self.precision, rngs=nnx.Rngs(0),
        kernel_init=lambda *_: kernel, bias_init=lambda *_: bias,
        kernel_metadata=kernel_metadata or {}, bias_metadata=bias_metadata or {})

  @contextlib.contextmanager
  def disable(self) -> Iterator[None]:
    """Within the block the layer computes the base ``x @ W + bias``; restores the prior state."""
    previous = self.disabled
    self.disabled = True
    try:
      yield
    finally:
      self.disabled = previous


class SMoADense(AdaptedDense):
  """SMoA layer: K spectral blocks, ``dW_k = (alpha/r)(a_k b_k) * W_k`` (see :mod:`smoa_jax.core.smoa`).

  ``lora_a`` is ``(K, max|C_k|, max r_k)`` and ``lora_b`` ``(K, max r_k, max|R_k|)``, stacked and
  zero-padded; ``in_perm``/``out_perm`` hold the spectral order, computed from the kernel at
  construction unless ``blocks`` is given.
  """

  config_type = SMoAConfig


class HiRADense(AdaptedDense):
  """HiRA baseline: ``dW = (alpha/r)(a @ b) * W`` over the whole kernel (SMoA's op, K=1, no permutation).

  ``lora_a`` is ``(1, in, r)`` and ``lora_b`` ``(1, r, out)``.
  """

  config_type = HiRAConfig


class LoRADense(AdaptedDense):
  """LoRA baseline: ``dW = (alpha/r) a @ b`` with ``lora_a (in, r)`` and ``lora_b (r, out)``."""

  config_type = LoRAConfig


# The named layer of each built-in method; any other method gets the generic AdaptedDense.
_LAYERS: dict[str, type[AdaptedDense]] = {"smoa": SMoADense, "hira": HiRADense, "lora": LoRADense}


def adapter_class(config: AdapterConfig) -> type[AdaptedDense]:
  """The NNX layer class for a config (``SMoAConfig`` -> ``SMoADense``, ...)."""
  if config.trains_base_kernel or type(config) is AdapterConfig:
    raise ConfigError(f"{type(config).__name__} has no adapter layer (full fine-tuning trains the "
                      "kernels themselves); use apply_adapter, or SMoAConfig, LoRAConfig, "
                      "HiRAConfig.")
  return _LAYERS.get(config.method, AdaptedDense)
