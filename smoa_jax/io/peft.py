"""PEFT's own LoRA and HiRA adapters, both ways (the layout PEFT 0.21 writes and reads).

A PEFT adapter directory (``PeftModel.save_pretrained``) holds::

    adapter_config.json        a LoraConfig (``"peft_type": "LORA"``) or HiraConfig ("HIRA")
    adapter_model.safetensors  for every adapted module M (Hugging Face dotted name):
                                 LoRA  base_model.model.<M>.lora_A.weight  (r, in)  = a^T
                                       base_model.model.<M>.lora_B.weight  (out, r) = b^T
                                 HiRA  base_model.model.<M>.hira_A         (r, in)
                                       base_model.model.<M>.hira_B         (out, r)
                               and, for ``modules_to_save``, each saved module's parameters
                               under its own name (``base_model.model.lm_head.weight``)

The mathematics, PEFT's (torch layout, ``W_t = W^T (out, in)``) against ours:

* **LoRA**: PEFT adds ``scaling * B (A dropout(x))`` with ``scaling = lora_alpha / r``, or
  ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and ``lora_alpha`` of a module come from
  ``rank_pattern`` / ``alpha_pattern`` when a key matches it. Ours is ``(alpha / r) x a b``, so a
  module maps to ``LoRAConfig(r, alpha')`` with ``alpha' / r`` equal to PEFT's scaling and
  ``a = A^T``, ``b = B^T``.
* **HiRA**: PEFT adds ``dropout(x) (W_t * (B A))^T``: ``dW_t = W_t * (hira_B @ hira_A)``, with no
  scaling at all (and PEFT 0.21.2 gives every module the rank ``r``: its HiRA ignores
  ``rank_pattern``). Ours is ``dW = (alpha / r) (a @ b) * W``. Export writes ``hira_A = (alpha / r)
  a^T`` and ``hira_B = b^T``, zero-padding a module of smaller rank to the largest (zero rows and
  columns add nothing); import builds ``HiRAConfig(r, alpha=r)`` (scaling 1) with ``a = hira_A^T``,
  ``b = hira_B^T``.

Import honours ``target_modules`` (names or a regex, PEFT's matching rules), ``exclude_modules``,
``layers_to_transform`` / ``layers_pattern``, ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``,
``fan_in_fan_out`` (GPT-2 ``Conv1D``: the factors' layout does not depend on it, and PEFT corrects
a wrong flag per module; so do we, with a warning) and ``modules_to_save`` (those parameters
become trainable, as :func:`smoa_jax.mark_trainable` makes them). Our layers take one config
each, so the modules are adapted group by group, one group per distinct config. What cannot be
represented is refused naming the option (:data:`UNSUPPORTED`): DoRA, trained biases, inits that
change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or the forward (MiCA), and the rest.
PEFT files name modules by their Hugging Face names; the model must come from
:func:`smoa_jax.from_hf`, whose key map translates them (:func:`smoa_jax.io.formats.hf_modules`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import save_file

from smoa_jax.core.config import AdapterConfig
from smoa_jax.core.methods import HiRAConfig, LoRAConfig
from smoa_jax.errors import AdapterMismatchError, CheckpointError, ConfigError
from smoa_jax.io import formats
from smoa_jax.io.files import as_path, atomic_directory
from smoa_jax.layers.inject import (AdapterReport, adapt_modules, loading_adapter, mark_trainable,
                                    using_adapter)
from smoa_jax.layers.paths import module_path
from smoa_jax.layers.sites import LinearSite, linear_sites
from smoa_jax.layers.variables import TrainableParam
from smoa_jax.models.base import HFModel
from smoa_jax.parallel.sharding import to_host

__all__ = ["save_peft_adapter", "load_peft_adapter", "PeftImport", "UNSUPPORTED", "PEFT_TYPES"]

PEFT_TYPES = {"LORA": "lora", "HIRA": "hira"}  # PEFT's peft_type -> our method
_NAMES = {"lora": formats.LORA_NAMES, "hira": formats.HIRA_NAMES}
_DROPOUT = {"lora": "lora_dropout", "hira": "hira_dropout"}
_INIT = {"lora": "init_lora_weights", "hira": "init_weights"}
# Inits that leave the base weights and the forward as they are (the rest are refused).
_PLAIN_INITS = {"lora": (True, False, "gaussian", "eva", "orthogonal"),
                "hira": (True, False, "gaussian")}
# Fields that describe the file or training only: the adapter's mathematics ignores them.
_NEUTRAL = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
            "revision", "inference_mode", "megatron_config", "megatron_core", "runtime_config",
            "loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config",
            "qalora_group_size"}
# Fields honoured on import (beyond dropout and init, per method).
_HONOURED = {"r", "target_modules", "exclude_modules", "lora_alpha", "fan_in_fan_out", "bias",
             "use_rslora", "modules_to_save", "layers_to_transform", "layers_pattern",
             "rank_pattern", "alpha_pattern"}
# Options smoa-jax cannot represent: field -> (what it does). Refused unless at their default.
UNSUPPORTED = {
    "use_dora": "DoRA, a learned magnitude vector",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QALoRA's pooled inputs",
    "alora_invocation_tokens": "activated LoRA, applied from invocation tokens on",
    "layer_replication": "replicated base layers",
    "target_parameters": "adapters on raw parameters",
    "trainable_token_indices": "trainable token embeddings",
    "monteclora_config": "Monte Carlo sampled adapters",
    "arrow_config": "arrow routing between adapters",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA, which truncates the base weight",
    "ensure_weight_tying": "adapters tied across tied layers",
}


# -- reading a config ------------------------------------------------------------------------------
def _field_error(path: epath.Path, field: str, value: Any, expected: str) -> CheckpointError:
  return CheckpointError(f"{path / formats.CONFIG_NAME}: {field}={value!r} is invalid: expected "
                         f"{expected}.")


def _check_field(document: dict[str, Any], path: epath.Path, field: str,
                 ok: Callable[[Any], bool], expected: str) -> None:
  if field in document and not ok(document[field]):
    raise _field_error(path, field, document[field], expected)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_names(v: Any) -> bool:
  return isinstance(v, list) and all(isinstance(n, str) and n for n in v)


def _unsupported(document: dict[str, Any], method: str, path: epath.Path) -> None:
  """Refuse, naming the option, whatever changes the adapter beyond plain LoRA / HiRA."""
  where = path / formats.CONFIG_NAME
  for field, what in UNSUPPORTED.items():
    value = document.get(field)
    if value not in (None, False, [], {}):
      raise ConfigError(f"{where}: {field}={value!r} ({what}) is not supported by smoa-jax; "
                        "train the adapter without it.")
  if document.get("bias", "none") != "none":
    raise ConfigError(f"{where}: bias={document['bias']!r} (trained biases) is not supported by "
                      "smoa-jax; only bias='none' adapters can be imported.")
  init = document.get(_INIT[method], True)
  if init not in _PLAIN_INITS[method]:
    raise ConfigError(
        f"{where}: {_INIT[method]}={init!r} is not supported by smoa-jax: that initialisation "
        "changes the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or the layer's forward "
        "(MiCA), so the adapter only works on PEFT's modified model. Convert it to a plain "
        "adapter in PEFT first (save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...)).")
  known = _NEUTRAL | _HONOURED | set(UNSUPPORTED) | {_DROPOUT[method], _INIT[method]}
  unknown = sorted(k for k, v in document.items() if k not in known and v not in
                   (None, False, [], {}, ""))
  if unknown:
    raise ConfigError(f"{where}: option(s) {unknown} are unknown to smoa-jax (a newer PEFT?) and "
                      "may change the adapter; refusing to guess. Remove them if they are unset.")


def _read_spec(document: dict[str, Any], path: epath.Path) -> tuple[str, dict[str, Any]]:
  """``(method, fields)`` of a validated PEFT LoRA / HiRA config, every field filled in."""
  peft_type = document.get("peft_type")
  if peft_type not in PEFT_TYPES:
    raise ConfigError(f"{path / formats.CONFIG_NAME}: peft_type={peft_type!r} is not supported; "
                      f"smoa-jax reads PEFT adapters of types {sorted(PEFT_TYPES)}.")
  method = PEFT_TYPES[peft_type]
  checks = [
      ("r", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
      ("lora_alpha", lambda v: _is_number(v) and v > 0, "a number > 0"),
      (_DROPOUT[method], lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
      ("target_modules", lambda v: v is None or isinstance(v, str) or _is_names(v),
       "null, a regex or a list of module names"),
      ("exclude_modules", lambda v: v is None or isinstance(v, str) or _is_names(v),
       "null, a regex or a list of module names"),
      ("modules_to_save", lambda v: v is None or _is_names(v), "null or a list of module names"),
      ("layers_to_transform", lambda v: v is None or _is_int(v) or (
          isinstance(v, list) and all(_is_int(i) for i in v)), "null, an int or a list of ints"),
      ("layers_pattern", lambda v: v is None or isinstance(v, str) or _is_names(v),
       "null, a name or a list of names"),
      ("rank_pattern", lambda v: isinstance(v, dict) and all(
          _is_int(r) and r >= 1 for r in v.values()), "an object of pattern -> int >= 1"),
      ("alpha_pattern", lambda v: isinstance(v, dict) and all(
          _is_number(a) and a > 0 for a in v.values()), "an object of pattern -> number > 0"),
      ("fan_in_fan_out", lambda v: isinstance(v, bool), "true or false"),
      ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
  ]
  for field, ok, expected in checks:
    _check_field(document, path, field, ok, expected)
  _unsupported(document, method, path)
  spec = {"r": 8 if method == "lora" else 32, "lora_alpha": 8, "dropout": 0.0,
          "target_modules": None, "exclude_modules": None, "modules_to_save": None,
          "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
          "alpha_pattern": {}, "fan_in_fan_out": False, "use_rslora": False}
  spec.update({k: v for k, v in document.items() if k in spec and v is not None})
  spec["dropout"] = float(document.get(_DROPOUT[method]) or 0.0)
  for field in ("target_modules", "exclude_modules"):
    if isinstance(spec[field], str):
      try:
        re.compile(spec[field])
      except re.error as err:
        raise _field_error(path, field, spec[field], f"a valid regular expression ({err})") from err
  return method, spec


# -- PEFT's matching rules (peft 0.21.2, tuners_utils.check_target_module_exists) ------------------
def _excluded(spec: dict[str, Any], key: str) -> bool:
  exclude = spec["exclude_modules"]
  if isinstance(exclude, str) and re.fullmatch(exclude, key):
    return True
  if isinstance(exclude, list) and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
    return True
  return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in spec["modules_to_save"] or ())


def _layer_selected(spec: dict[str, Any], key: str) -> bool:
  layers, patterns = spec["layers_to_transform"], spec["layers_pattern"]
  if layers is None or layers == []:
    return True
  match = None
  if not patterns:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
  else:
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
      match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
      if match is not None:
        break
  if match is None:
    return False
  index = int(match["idx"])
  return index == layers if _is_int(layers) else index in layers


def _targeted(spec: dict[str, Any], key: str) -> bool:
  """Whether PEFT adapts the module with dotted name ``key`` under this config."""
  if _excluded(spec, key):
    return False
  targets = spec["target_modules"]
  if isinstance(targets, str):
    return re.fullmatch(targets, key) is not None
  if key in targets:
    return True
  return any(key.endswith(f".{t}") for t in targets) and _layer_selected(spec, key)


def _pattern_value(pattern: dict[str, Any], key: str, default: Any) -> Any:
  """``rank_pattern`` / ``alpha_pattern`` lookup (peft's ``get_pattern_key``): the first pattern
  ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)``."""
  for p, value in pattern.items():
    if re.match(rf"(.*\.)?({p})$", key):
      return value
  return default


# -- import ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PeftImport:
  """What :func:`load_peft_adapter` did.

  Attributes:
    method: ``"lora"`` or ``"hira"``.
    configs: our module path -> the config of its adapter (one per distinct ``r`` / scaling).
    trainable_arrays: parameter paths of the ``modules_to_save`` now trainable and loaded.
    reports: one injection report per group of modules adapted now (empty when every module
      already carried the adapter).
  """

  method: str
  configs: dict[str, AdapterConfig]
  trainable_arrays: tuple[str, ...]
  reports: tuple[AdapterReport, ...]


def _targets(model: HFModel, spec: dict[str, Any], tensors: dict[str, np.ndarray],
             modules: dict[str, formats.HFModule], method: str, path: epath.Path) -> list[str]:
  """The HF names of the linear modules PEFT adapts under this config."""
  names = _NAMES[method]
  if spec["target_modules"] is None:  # PEFT saves the resolved list; else take the keys'
    suffix = "." + names[0].format(k="")
    found = {k[len(formats.PREFIX):-len(suffix)] for k in tensors
             if k.startswith(formats.PREFIX) and k.endswith(suffix)}
    targets = sorted(n for n in found if n in modules)
  else:
    targets = [n for n in modules if _targeted(spec, n)]
  if not targets:
    scanned = " (load into an unrolled model: scan_layers=False)" if model.scan_layers else ""
    wanted = spec["target_modules"]
    shown = [*wanted[:4], "..."] if isinstance(wanted, list) and len(wanted) > 4 else wanted
    raise AdapterMismatchError(
        f"target_modules={shown!r} of {path / formats.CONFIG_NAME} matches no "
        f"linear module of {type(model).__name__}{scanned}: is this the base model the adapter "
        f"was trained on? Its linear modules are e.g. {sorted(modules)[:8]}.")
  return targets


def _module_config(spec: dict[str, Any], method: str, name: str, path: str,
                   tensors: dict[str, np.ndarray]) -> AdapterConfig:
  """Our config for module ``name`` (its r and scaling as PEFT gives them) at our ``path``."""
  r = _pattern_value(spec["rank_pattern"], name, spec["r"])
  common = {"dropout": spec["dropout"], "target_modules": (path,)}
  if method == "hira":
    # PEFT 0.21.2's HiRA gives every module the rank r (it ignores rank_pattern): take the rank
    # the tensors have, if it is one of the two.
    key = formats.factor_keys(name, (r,), per_block=False, names=formats.HIRA_NAMES)[0]
    stored = tensors[key].shape[0] if key in tensors and tensors[key].ndim == 2 else r
    r = stored if stored in (r, spec["r"]) else r
    return HiRAConfig(r=r, alpha=float(r), **common)
  alpha = _pattern_value(spec["alpha_pattern"], name, spec["lora_alpha"])
  # Ours scales by alpha / r: rsLoRA's alpha / sqrt(r) is alpha * sqrt(r) / r.
  return LoRAConfig(r=r, alpha=alpha * math.sqrt(r) if spec["use_rslora"] else alpha, **common)


def _heads(model: HFModel, spec: dict[str, Any], tensors: dict[str, np.ndarray],
           factor_keys: set[str]) -> tuple[dict[str, np.ndarray], list[str]]:
  """``modules_to_save`` parameters: our Param path -> value in our layout; and the keys that
  belong to no factor and no saved module."""
  key_map = model.key_map()
  params = {module_path(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  saved = spec["modules_to_save"] or []
  heads, stray = {}, []
  for key in sorted(set(tensors) - factor_keys):
    hf_param = key.removeprefix(formats.PREFIX)
    module = hf_param.rpartition(".")[0]
    found = key_map.path_for(hf_param) if key.startswith(formats.PREFIX) else None
    if not any(module == m or module.endswith(f".{m}") for m in saved) or found is None:
      stray.append(key)
      continue
    target, transpose = found
    if target not in params:
      stray.append(key)
      continue
    shape = tuple(params[target].shape)
    heads[target] = formats.checked_tensor(tensors, key, shape[::-1] if transpose else shape)
    if transpose:
      heads[target] = heads[target].T
  return heads, stray


def _fit_problems(targets: list[str], modules: dict[str, formats.HFModule],
                  configs: dict[str, AdapterConfig]) -> list[str]:
  """Layers already carrying this adapter must have its method, rank and scaling."""
  problems = []
  for n in targets:
    site = modules[n].site
    if not site.adapted:
      continue
    layer, config = site.module, configs[n]
    if (layer.config.method != config.method or layer.op.ranks != (config.r,)
        or not math.isclose(layer.config.scaling, config.scaling, rel_tol=1e-6) or layer.merged):
      problems.append(f"{n} already carries a {layer.config.method} adapter (ranks "
                      f"{layer.op.ranks}, scaling {layer.config.scaling:g}, merged={layer.merged}) "
                      f"that differs from this {config.method} one (r={config.r}, scaling "
                      f"{config.scaling:g}); load into a model without it, or unmerge")
  return problems


def load_peft_adapter(model: HFModel, directory: str | os.PathLike, *,
                      name: str | None = None, rngs: nnx.Rngs | None = None,
                      verbose: bool = False) -> PeftImport:
  """Import a PEFT LoRA or HiRA adapter directory into ``model`` (in place).

  The modules PEFT's config targets (see the module docstring) receive adapter layers of their
  own config (``LoRAConfig`` / ``HiRAConfig``) unless they already carry the adapter, then the
  factors; ``modules_to_save`` parameters are made trainable and loaded. ``name`` names the
  adapter (``"default"``) beside others the model holds; it becomes active
  (:func:`smoa_jax.set_adapter`). ``rngs`` drives adapter dropout (default ``nnx.Rngs(0)``).

  Raises:
    CheckpointError: missing or unreadable files, a config that is not PEFT's or has invalid
      fields.
    ConfigError: a PEFT type or option smoa-jax cannot represent (the message names it).
    AdapterMismatchError: targets the model lacks, missing or unexpected tensors, wrong shapes
      (another base model), or an existing adapter of another structure.
  """
  formats.check_hf_model(model, "load_peft_adapter")
  path = as_path(directory)
  document = formats.read_config(path)
  formats.expect_format(path, document, "peft")
  method, spec = _read_spec(document, path)
  tensors = {k: np.asarray(v, np.float32)
             for k, v in formats.read_tensors(path, torch_bin=True).items()}
  modules = formats.hf_modules(model)
  targets = _targets(model, spec, tensors, modules, method, path)
  configs = {n: _module_config(spec, method, n, modules[n].path, tensors) for n in targets}
  factor_keys = {k for n in targets
                 for k in formats.factor_keys(n, (1,), per_block=False, names=_NAMES[method])}
  heads, stray = _heads(model, spec, tensors, factor_keys)
  _check_keys(model, path, modules, sorted(factor_keys - set(tensors)), stray)
  for n in targets:  # every shape before the model changes
    n_in, n_out = modules[n].site.shape
    key_a, key_b = formats.factor_keys(n, (1,), per_block=False, names=_NAMES[method])
    formats.checked_tensor(tensors, key_a, (configs[n].r, n_in))
    formats.checked_tensor(tensors, key_b, (n_out, configs[n].r))
  formats.warn_fan_in_fan_out(spec["fan_in_fan_out"], targets, modules, "PEFT", stacklevel=2)
  with loading_adapter(model, name, extras=list(heads)) as name:
    problems = _fit_problems(targets, modules, configs)
    if problems:
      raise AdapterMismatchError(f"{path} does not fit this {type(model).__name__}:\n  "
                                 + "\n  ".join(problems))
    reports = _adapt_targets(model, targets, modules, configs, name=name,
                             rngs=rngs or nnx.Rngs(0), verbose=verbose)
    layers = {site.name: site.module for site in linear_sites(model) if site.adapted}
    for n in targets:
      layer = layers[modules[n].path]
      a, b = formats.decode_factors(n, layer.op, tensors, per_block=False, names=_NAMES[method])
      layer.lora_a[...] = a.astype(layer.lora_a.dtype)
      layer.lora_b[...] = b.astype(layer.lora_b.dtype)
    _write_heads(model, heads)
  return PeftImport(method, {modules[n].path: configs[n] for n in targets}, tuple(heads),
                    tuple(reports))

def _check_keys(model: HFModel, path: epath.Path, modules: dict[str, Any], missing: list[str],
                stray: list[str]) -> None:
  """Raise :class:`AdapterMismatchError` naming the missing factor keys and the stray keys
  (modules the model lacks point at another base model)."""
  if not (missing or stray):
    return
  owners = {re.sub(r"\.(lora_[AB]\.weight|hira_[AB]|weight|bias)$", "",
                   k.removeprefix(formats.PREFIX)) for k in stray}
  unknown = sorted(owners - set(modules))
  raise AdapterMismatchError(
      f"{path} does not fit this {type(model).__name__}: "
      + (f"missing keys ({len(missing)}): {missing[:6]}; " if missing else "")
      + (f"unexpected keys ({len(stray)}): {stray[:6]} (modules the model lacks, like "
         f"{unknown[:3]}, mean another base model; keys outside target_modules and "
         "modules_to_save are not imported)" if stray else ""))


def _adapt_targets(model: HFModel, targets: list[str], modules: dict[str, Any],
                   configs: dict[str, Any], *, name: str, rngs: nnx.Rngs,
                   verbose: bool) -> list[AdapterReport]:
  """Give every target that has no adapter yet its layer, one :func:`adapt_modules` call per
  distinct config; returns their reports."""
  groups: dict[tuple, list[str]] = collections.defaultdict(list)
  for n in targets:
    c = configs[n]
    if not modules[n].site.adapted:
      groups[c.method, c.r, c.alpha, c.dropout].append(n)
  reports = []
  for names in groups.values():
    paths = [modules[n].path for n in names]
    config = dataclasses.replace(configs[names[0]], target_modules=tuple(paths))
    reports.append(adapt_modules(model, config, paths, rngs=rngs, verbose=verbose, name=name))
  return reports


def _write_heads(model: HFModel, heads: dict[str, np.ndarray]) -> None:
  """Make the ``modules_to_save`` parameters trainable (if they are not) and load them."""
  if not heads:
    return
  frozen = [p for p in heads if p not in _trainable_paths(model)]
  if frozen:
    mark_trainable(model, "|".join(map(re.escape, frozen)))
  variables = _trainable_paths(model)
  for p, value in heads.items():
    variables[p][...] = value.astype(variables[p].dtype)


def _trainable_paths(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {module_path(p): v for p, v in nnx.iter_graph(model) if isinstance(v, TrainableParam)}


# -- export ----------------------------------------------------------------------------------------
def _number(value: float) -> int | float:
  return int(value) if float(value).is_integer() else float(value)


def _most_common(values: list[Any]) -> Any:
  return collections.Counter(values).most_common(1)[0][0]


def _exported_sites(model: HFModel) -> tuple[str, list[LinearSite]]:
  """The one method (lora or hira) of the model's active adapter layers, and those layers."""
  sites = [site for site in linear_sites(model) if site.adapted]
  if not sites:
    raise AdapterMismatchError("the model has no active adapter layers: apply or load a LoRA or "
                               "HiRA adapter first.")
  methods = sorted({site.module.config.method for site in sites})
  if "smoa" in methods:
    raise AdapterMismatchError("PEFT has no SMoA: convert the adapter to LoRA first "
                               "(smoa_jax.to_lora(model, rank=...) or energy=...), or save it with "
                               "smoa_jax.save_adapter / save_authors_adapter.")
  if len(methods) > 1 or methods[0] not in _NAMES:
    raise AdapterMismatchError(f"the model carries {methods} adapters; a PEFT adapter holds one "
                               "method, LoRA or HiRA.")
  dropouts = {site.module.config.dropout for site in sites}
  if len(dropouts) > 1:
    raise AdapterMismatchError(f"the adapter layers use different dropouts {sorted(dropouts)}; a "
                               "PEFT config has one.")
  return methods[0], sites


def _saved_modules(model: HFModel, sites: list[LinearSite]
                   ) -> tuple[list[str], dict[str, np.ndarray]]:
  """``modules_to_save``: the HF modules of the trainable arrays outside adapter layers, with
  every parameter of each module (PEFT saves whole modules) in torch layout."""
  key_map = model.key_map()
  adapted = {site.path for site in sites}
  extras = [p for p, v in nnx.iter_graph(model)
            if isinstance(v, TrainableParam) and tuple(p[:-1]) not in adapted]
  params = {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  names, tensors = set(), {}
  for p in extras:
    found = key_map.hf_for(module_path(p))
    if found is None or "." not in found[0]:
      raise AdapterMismatchError(f"trainable array {module_path(p)!r} has no Hugging Face name, "
                                 "so PEFT cannot hold it.")
    names.add(found[0].rpartition(".")[0])
    for q, var in params.items():
      if q[:-1] == tuple(p[:-1]) and (mapped := key_map.hf_for(module_path(q))) is not None:
        value = to_host(var[...]).astype(np.float32)
        value = value.T if mapped[1] else value
        tensors[formats.module_key(mapped[0])] = np.ascontiguousarray(value)
  return sorted(names), tensors


def _module_tensors(method: str, module: formats.HFModule, host: dict[str, Any], r_max: int
                    ) -> dict[str, np.ndarray]:
  layer = module.site.module
  a, b = (v if module.index is None else v[module.index] for v in host[module.site.name])
  tensors = formats.encode_factors(module.hf_name, layer.op, a, b, per_block=False,
                                   names=_NAMES[method])
  if method == "hira":  # PEFT's HiRA has no scaling: fold it into A; pad to the common rank
    key_a, key_b = formats.factor_keys(module.hf_name, (r_max,), per_block=False,
                                       names=formats.HIRA_NAMES)
    r = tensors[key_a].shape[0]
    tensors[key_a] = np.pad(layer.config.scaling * tensors[key_a], ((0, r_max - r), (0, 0)))
    tensors[key_b] = np.pad(tensors[key_b], ((0, 0), (0, r_max - r)))
  return tensors


def save_peft_adapter(model: HFModel, directory: str | os.PathLike, *, name: str | None = None,
                      base_model_name_or_path: str | None = None) -> epath.Path:
  """Write the model's active LoRA or HiRA adapter (or adapter ``name``) as a PEFT adapter.

  ``peft.PeftModel.from_pretrained(transformers_model, directory)`` loads it with the same
  outputs. Modules are listed by their Hugging Face names in ``target_modules``; LoRA modules of
  another rank or alpha than the most common go into ``rank_pattern`` / ``alpha_pattern``;
  trainable arrays outside adapter layers (heads) go into ``modules_to_save``. An SMoA adapter
  has no PEFT form: convert it first with :func:`smoa_jax.to_lora`. The write is atomic; with
  several processes every process calls this and process 0 writes.

  Raises:
    AdapterMismatchError: the model is not from ``from_hf``, holds no LoRA / HiRA adapter (or no
      adapter ``name``), mixes methods or dropouts, or trains arrays without a Hugging Face name.
  """
  formats.check_hf_model(model, "save_peft_adapter")
  if name is not None:
    with using_adapter(model, name):
      return save_peft_adapter(model, directory, base_model_name_or_path=base_model_name_or_path)
  method, sites = _exported_sites(model)
  layers = formats.hf_layers(model, sites)
  host = {site.name: (to_host(site.module.lora_a[...]), to_host(site.module.lora_b[...]))
          for site in sites}  # every process gathers
  ranks = {m.hf_name: m.site.module.config.r for m in layers}
  alphas = {m.hf_name: m.site.module.config.alpha for m in layers}
  r_max = max(ranks.values())
  tensors: dict[str, np.ndarray] = {}
  for module in layers:
    tensors.update(_module_tensors(method, module, host, r_max))
  saved, head_tensors = _saved_modules(model, sites)
  tensors.update(head_tensors)
  document: dict[str, Any] = {
      "peft_type": method.upper(), "task_type": formats.peft_task_type(model),
      "base_model_name_or_path": base_model_name_or_path or model.source_dir, "revision": None,
      "inference_mode": True, "target_modules": sorted(ranks), "exclude_modules": None,
      "fan_in_fan_out": all(m.conv1d for m in layers), "modules_to_save": saved or None,
      "layers_to_transform": None, "layers_pattern": None,
      _DROPOUT[method]: sites[0].module.config.dropout, _INIT[method]: True}
  if method == "hira":
    document.update(r=r_max, rank_pattern={})
  else:
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    document.update(
        r=r, lora_alpha=_number(alpha), bias="none", use_rslora=False, use_dora=False,
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={re.escape(n): _number(v) for n, v in alphas.items() if v != alpha})
  if jax.process_index() == 0:
    with atomic_directory(directory) as staged:
      (staged / formats.CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True))
      save_file(tensors, str(staged / formats.SAFETENSORS_NAME), metadata={"format": "pt"})
  return as_path(directory)

