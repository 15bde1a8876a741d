"""Module paths: the ``/``-joined attribute paths that name layers everywhere in smoa-jax.

``('model', 'layers', 3, 'self_attn', 'q_proj')`` is ``model/layers/3/self_attn/q_proj``. A layer
index is the integer right after a layer container (``layers``, ``layer``, ``h``, ``blocks``); a
scanned model has no index there (``model/layers/self_attn/q_proj`` holds all layers).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

__all__ = ["LAYER_CONTAINERS", "module_path", "layer_index", "split_layer_path", "layer_path"]

# Module names that hold the numbered layers of a family (``model/layers/3``, ``transformer/h/3``).
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks")
_NUMBERED = re.compile(rf"(.*?(?:^|/)(?:{'|'.join(LAYER_CONTAINERS)}))/(\d+)/(.*)")


def module_path(path: Sequence[Any]) -> str:
  """``('model', 'layers', 3, 'q_proj')`` -> ``'model/layers/3/q_proj'``."""
  return "/".join(str(p) for p in path)


def layer_index(path: str) -> int | None:
  """The layer index in a path (``model/layers/3/mlp/up_proj`` -> 3), or None."""
  split = split_layer_path(path)
  return None if split is None else split[1]


def split_layer_path(path: str) -> tuple[str, int] | None:
  """``model/layers/3/mlp/up_proj/kernel`` -> ``("model/layers/mlp/up_proj/kernel", 3)``; else None."""
  m = _NUMBERED.fullmatch(path)
  return None if m is None else (f"{m.group(1)}/{m.group(3)}", int(m.group(2)))


def layer_path(stacked_path: str, index: int) -> str | None:
  """Inverse of :func:`split_layer_path`: the path of layer ``index`` (None without a container)."""
  parts = stacked_path.split("/")
  for i, part in enumerate(parts[:-1]):
    if part in LAYER_CONTAINERS:
      return "/".join(parts[:i + 1] + [str(index)] + parts[i + 1:])
  return None
