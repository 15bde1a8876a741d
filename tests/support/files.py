"""Files for tests: JSONL data, copies of shared fixtures, and a digest that shows a change."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


def write_bytes(directory: Path, content: bytes, name: str = "d.jsonl") -> Path:
  path = directory / name
  path.write_bytes(content)
  return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
  """One line per row: a dict as JSON, a string as it is (for malformed lines)."""
  path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                          for row in rows))
  return path


def copy_of(src: Path, directory: Path, name: str = "ckpt") -> Path:
  """A private copy of a (read-only, shared) fixture directory, for a test that writes to it."""
  dst = directory / name
  shutil.copytree(src, dst)
  return dst


def tree_digest(root: Path) -> dict[str, str]:
  """``relative path -> sha256`` of every file under ``root`` (directories as ``"dir"``)."""
  return {str(p.relative_to(root)):
          "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*"))}
