"""File primitives every reader and writer shares: atomic directory writes, JSON objects read
with clear errors, and PyTorch pickles loaded safely (tensors only, never code)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from smoa_jax.errors import CheckpointError

__all__ = ["atomic_directory", "read_json_object", "safe_torch_load", "torch_to_numpy"]


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
  """Yield an empty staging directory next to ``target``; on success it replaces ``target``.

  On an exception the staging directory is removed and ``target`` is untouched, so readers see
  the old directory or the complete new one, never a half-written one. Permissions follow the
  umask (``mkdtemp`` would leave the directory private).
  """
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  try:
    yield staged
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(staged):
      for name in dirs:
        os.chmod(Path(root) / name, 0o777 & ~umask)
      for name in files:
        os.chmod(Path(root) / name, 0o666 & ~umask)
    os.chmod(staged, 0o777 & ~umask)
    if target.exists():
      backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
      backup.rmdir()
      target.rename(backup)
      try:
        staged.rename(target)
      except OSError:
        backup.rename(target)
        raise
      shutil.rmtree(backup, ignore_errors=True)
    else:
      staged.rename(target)
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    raise


def read_json_object(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
  """The JSON object in ``path``; a :class:`CheckpointError` when it is missing, not JSON or not
  an object (``what`` says what the file should be, for the message)."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist{f'; expected {what}' if what else ''}.")
  try:
    document = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as err:
    raise CheckpointError(f"{path} is not valid JSON ({err}).") from err
  if not isinstance(document, dict):
    raise CheckpointError(f"{path} holds a JSON {type(document).__name__}, expected an object.")
  return document


def _import_torch(file: Path) -> Any:
  try:
    import torch
  except ImportError as err:
    raise CheckpointError(f"{file} is a PyTorch pickle, which needs torch to read; install it "
                          "(pip install 'smoa-jax[torch]') or convert the file to "
                          "safetensors.") from err
  return torch


def safe_torch_load(file: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
  """A PyTorch state dict read with ``torch.load(weights_only=True)``: a pickle that would run
  code or build anything but tensors is refused, never run.

  ``mmap`` memory-maps the tensors (large checkpoints; falls back to a plain read for the
  legacy non-zip format). Returns ``{name: torch.Tensor}``.

  Raises:
    CheckpointError: torch missing, an unsafe pickle, a truncated or corrupt file, or anything
      but a dict of tensors.
  """
  file = Path(file)
  torch = _import_torch(file)
  try:
    try:
      state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
      if not mmap or "mmap" not in str(err):
        raise
      state = torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    raise CheckpointError(
        f"refused to load {file}: its pickle would execute code or build objects other than "
        f"tensors, which torch.load(weights_only=True) forbids ({str(err).splitlines()[0]}). Only "
        "use files you trust; convert a trusted one to safetensors first.") from err
  except Exception as err:  # torch raises RuntimeError/EOFError/... on corrupt files
    raise CheckpointError(f"{file} is not a readable PyTorch file ({type(err).__name__}: {err}); "
                          "it may be truncated or corrupted. Re-download or re-save it.") from err
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise CheckpointError(f"{file} holds {type(state).__name__}, expected a state dict of "
                          "tensor name -> tensor.")
  return state


def torch_to_numpy(tensor: Any) -> np.ndarray:
  """A CPU ``torch.Tensor`` as numpy, bfloat16 included (reinterpreted as ``ml_dtypes``)."""
  import torch

  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()
