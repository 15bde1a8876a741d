"""File primitives every reader and writer shares: paths on any storage, atomic directory
writes, JSON objects read with clear errors, and PyTorch pickles loaded safely (tensors only,
never code).

Paths: run directories, metrics, checkpoints and adapters may live on a local disk or on any
storage ``etils.epath`` reaches (``gs://bucket/run`` on Google Cloud Storage, ``s3://``, ...;
orbax uses the same library). :func:`as_path` turns a string into such a path (local paths
absolute, URIs kept as they are); :func:`is_local` tells them apart.
"""

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
from etils import epath

from smoa_jax.errors import CheckpointError

__all__ = ["as_path", "is_local", "atomic_directory", "read_json_object", "safe_torch_load",
           "torch_to_numpy"]


def is_local(path: str | os.PathLike) -> bool:
  """False for a URI such as ``gs://bucket/x`` (object storage), True for a file system path."""
  return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """``path`` on whatever storage it names: a local path (``~`` expanded, made absolute) or a URI
  (``gs://bucket/run``, ``s3://...``) kept as it is, never turned into ``<cwd>/gs:/bucket``."""
  if is_local(path):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  return epath.Path(path)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
  """Yield an empty local staging directory; on success its files replace ``target``'s.

  On an exception the staging directory is removed and ``target`` is untouched. On a file
  system the staging directory sits next to ``target`` and is renamed into place, so readers see
  the old directory or the complete new one, never a half-written one; permissions follow the
  umask (``mkdtemp`` would leave the directory private). On object storage (``gs://``...), which
  has no directory rename, the files are staged locally and uploaded one by one once all are
  written (each object appears whole; ``.json`` files last, so a reader of a new directory
  finds its config only once the rest is there), then files of the old directory that the new
  one lacks are deleted.
  """
  if not is_local(target):
    with tempfile.TemporaryDirectory(prefix="smoa-jax-upload-") as staged:
      yield Path(staged)
      _upload(Path(staged), as_path(target))
    return
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


def _upload(staged: Path, target: epath.Path) -> None:
  """Copy the files under ``staged`` into ``target`` (JSON last), then drop what it held besides."""
  files = sorted((p for p in staged.rglob("*") if p.is_file()),
                 key=lambda p: (p.suffix == ".json", str(p)))
  names = {p.relative_to(staged).as_posix() for p in files}
  target.mkdir(parents=True, exist_ok=True)
  for file in files:
    destination = target / file.relative_to(staged).as_posix()
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(file.read_bytes())
  for old in _stored_files(target, ""):
    if old[0] not in names:
      old[1].unlink()


def _stored_files(directory: epath.Path, prefix: str) -> list[tuple[str, epath.Path]]:
  """``(relative name, path)`` of every file under ``directory`` (``iterdir``, which object
  stores list with full URIs, unlike their ``walk``)."""
  found = []
  for entry in directory.iterdir():
    name = f"{prefix}{entry.name}"
    found.extend(_stored_files(entry, f"{name}/") if entry.is_dir() else [(name, entry)])
  return found


def read_json_object(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
  """The JSON object in ``path``; a :class:`CheckpointError` when it is missing, not JSON or not
  an object (``what`` says what the file should be, for the message)."""
  path = as_path(path)
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
