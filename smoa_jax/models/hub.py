"""Hugging Face Hub ids (``"org/name"``) -> a local model directory, through ``huggingface_hub``.

:func:`resolve` is what :func:`smoa_jax.from_hf` and the command line's ``--model`` call: an
existing local directory is returned as it is; an ``org/name`` id is fetched with
``huggingface_hub.snapshot_download`` into its cache (``HF_HOME`` / ``HF_HUB_CACHE``), which
honours ``HF_HUB_OFFLINE``, ``HF_TOKEN`` / a stored login, and shows its own progress bars.
Only the files a model needs are fetched (:data:`ALLOW_PATTERNS`: config, tokenizer and
safetensors files), never PyTorch pickles. Every failure is one
:class:`~smoa_jax.errors.CheckpointError` line saying what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from smoa_jax.errors import CheckpointError

__all__ = ["ALLOW_PATTERNS", "is_hub_id", "resolve"]

# config.json, generation_config.json, every tokenizer file (tokenizer_config.json,
# special_tokens_map.json, tokenizer.model, vocab/merges, chat templates) and the safetensors
# weights (single file or shards + index), of the repo's top level only (subfolders hold other
# formats: onnx/, original/, ...).
ALLOW_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.safetensors")
# "org/name": one slash, Hub characters (validate_repo_id has the full rules).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TOKEN_HINT = "set HF_TOKEN or run `hf auth login` if it is private or gated"


def is_hub_id(source: str | os.PathLike[str]) -> bool:
  """True when ``source`` names a Hub repo (``org/name``) and no local path of that name exists."""
  text = os.fspath(source)
  return bool(_HUB_ID.fullmatch(text)) and not Path(text).expanduser().exists()


def _offline() -> bool:
  from huggingface_hub import constants

  return constants.is_offline_mode()


def resolve(source: str | os.PathLike[str], revision: str | None = None) -> Path:
  """The local directory of ``source``: a model directory, or a Hub id fetched into the cache.

  Args:
    source: a local directory (returned unchanged), or ``"org/name"`` on the Hugging Face Hub.
    revision: a branch, tag or commit of a Hub repo (default: ``main``); only with a Hub id.

  Returns:
    The directory (for a Hub id: its cached snapshot, holding config, tokenizer and safetensors).

  Raises:
    CheckpointError: a revision with a local directory; a repo or revision that does not exist
      (or is private/gated without a token); offline (``HF_HUB_OFFLINE=1`` or no network) without
      a cached copy; a repo without ``config.json``; a repo with no safetensors weights (e.g.
      only PyTorch ``.bin`` files).
  """
  if not is_hub_id(source):
    if revision is not None:
      raise CheckpointError(f"revision={revision!r} applies to Hugging Face Hub ids (org/name); "
                            f"{source} is a local path. Drop the revision.")
    return Path(source).expanduser()
  import huggingface_hub
  from huggingface_hub import errors

  repo = os.fspath(source)
  where = f"{repo}" + (f" (revision {revision})" if revision else "")
  try:
    directory = Path(huggingface_hub.snapshot_download(
        repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=["*/*"]))
  except errors.RevisionNotFoundError as err:
    raise CheckpointError(f"revision {revision!r} of Hugging Face repo {repo} does not exist; "
                          "pass an existing branch, tag or commit.") from err
  except errors.RepositoryNotFoundError as err:  # also gated repos without access
    raise CheckpointError(f"Hugging Face repo {repo} was not found and no local directory has "
                          f"that name; check the id ({_TOKEN_HINT}).") from err
  except errors.LocalEntryNotFoundError as err:  # also an incomplete cached snapshot
    state = ("HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached")
    raise CheckpointError(f"{where} is neither a local directory nor in the Hugging Face cache "
                          f"({_cache_dir()}), and {state}; "
                          "download it once with network access (unset HF_HUB_OFFLINE), or pass "
                          "a local model directory.") from err
  except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as err:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise CheckpointError(f"cannot download {where} from the Hugging Face Hub: {first} "
                          f"({_TOKEN_HINT}).") from err
  if not (directory / "config.json").is_file():
    raise CheckpointError(f"Hugging Face repo {where} has no config.json; expected a transformers "
                          "model repo (config, tokenizer and safetensors weights).")
  if not any(directory.glob("*.safetensors")):
    only_bin = " (only PyTorch .bin files)" if _has_bin(repo, revision, directory) else ""
    raise CheckpointError(f"Hugging Face repo {where} has no safetensors weights{only_bin}; "
                          "smoa-jax downloads safetensors only. Convert the weights (transformers: "
                          "from_pretrained then save_pretrained) and pass that local directory.")
  return directory


def _has_bin(repo: str, revision: str | None, directory: Path) -> bool:
  """Whether the repo holds PyTorch ``.bin`` weights: in the cached snapshot, else (online) in the
  repo's file listing (a dry run downloads nothing)."""
  if any(directory.glob("*.bin")):
    return True
  if _offline():
    return False
  import huggingface_hub
  from huggingface_hub import errors

  try:
    return bool(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=["*.bin"],
                                                  dry_run=True))
  except (errors.HfHubHTTPError, OSError):
    return False  # the listing is only used to word the error


def _cache_dir() -> str:
  from huggingface_hub import constants

  return constants.HF_HUB_CACHE
