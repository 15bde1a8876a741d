"""Checkpoint key maps as data: Hugging Face state-dict names <-> our module paths.

A :class:`KeyRule` pairs a Hugging Face state-dict name template with our module-path template,
e.g. ``"model.layers.{i}.self_attn.{p:[qkvo]_proj}.weight"`` <->
``"model/layers/{i}/self_attn/{p}/kernel"``; ``{name}`` matches digits (a layer index) and
``{name:regex}`` the given regex (no braces; write a module separator as ``\\.``, it becomes
``/`` on the path side). ``transpose=True`` marks a torch ``nn.Linear``
``torch_weight (out, in)`` stored by us as ``kernel (in, out)``. The same table drives loading
(HF name -> path) and export (path -> HF name).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

__all__ = ["KeyRule", "KeyMap", "linear_rules", "norm_rules", "prefixed"]

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
