"""Atomic file-system writes shared by every exporter (models, adapters, assets)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_directory"]


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
