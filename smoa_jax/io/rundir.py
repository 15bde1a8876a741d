"""The run directory: what ``smoa-jax finetune --output RUN_DIR`` (and :func:`smoa_jax.train`)
write, and the rules for reusing one. The command line and the training loop share it.

Layout::

  adapter/          the portable adapter (save_adapter), rewritten at every checkpoint
  checkpoints/      the orbax training state; ``--resume`` continues from the latest one
  metrics.jsonl     one JSON object a line: step, split ("train" or "eval"), loss, ...
  run_config.json   every resolved flag, the model directory, the data files (their record kind
                    and how many examples were truncated or skipped), library versions
  loss.png          the loss (and accuracy) curves
  dw_analysis.png   ``smoa-jax inspect --run``: the learned updates against W's spectrum

A non-empty run directory is refused unless the run is resumed or overwritten; ``--overwrite``
deletes the entries above and nothing else, and refuses a directory holding anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from smoa_jax.errors import CheckpointError

__all__ = [
    "ADAPTER_DIR", "CHECKPOINT_DIR", "METRICS_NAME", "RUN_CONFIG", "LOSS_PLOT", "DELTA_PLOT",
    "RUN_ENTRIES", "read_run", "run_entries", "check_run_dir", "clear_run_dir", "write_json",
]

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_NAME = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
LOSS_PLOT = "loss.png"
DELTA_PLOT = "dw_analysis.png"
# Everything a run may leave in its directory; --overwrite removes these and nothing else.
RUN_ENTRIES = (ADAPTER_DIR, CHECKPOINT_DIR, METRICS_NAME, RUN_CONFIG, LOSS_PLOT, DELTA_PLOT)


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
  """A run directory's ``run_config.json``, with a clear error when it is not a run."""
  file = Path(run_dir) / RUN_CONFIG
  if not file.is_file():
    raise CheckpointError(f"{run_dir} is not a smoa-jax run directory ({RUN_CONFIG} is missing); "
                          "create one with 'smoa-jax finetune --output RUN_DIR'.")
  try:
    document = json.loads(file.read_text())
  except ValueError as err:
    raise CheckpointError(f"{file} is not valid JSON ({err}).") from err
  if not isinstance(document, dict) or not isinstance(document.get("flags"), dict):
    raise CheckpointError(f"{file} is damaged: it has no \"flags\" object.")
  return document


def run_entries(output: Path) -> list[str]:
  """The names in ``output`` (empty when it does not exist); a file there is an error."""
  if output.exists() and not output.is_dir():
    raise CheckpointError(f"--output {output} is a file; give a directory.")
  return sorted(p.name for p in output.iterdir()) if output.is_dir() else []


def check_run_dir(output: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
  """Check RUN_DIR against resume/overwrite, deleting nothing; the run's config when resuming."""
  entries = run_entries(output)
  if resume:
    if not entries:
      raise CheckpointError(f"--resume: {output} holds no run to resume; start one without "
                            "--resume.")
    return read_run(output)
  if entries and not overwrite:
    raise CheckpointError(f"--output {output} is not empty; pass --resume to continue the run in "
                          "it, --overwrite to replace it, or choose another directory.")
  foreign = [name for name in entries if name not in RUN_ENTRIES]
  if foreign:
    raise CheckpointError(f"--overwrite: {output} holds files that are not from a smoa-jax run "
                          f"({', '.join(foreign[:5])}); refusing to delete them. Choose another "
                          "directory.")
  return None


def clear_run_dir(output: Path) -> None:
  """Remove a previous run's entries (``--overwrite``, after :func:`check_run_dir` passed)."""
  for name in run_entries(output):
    path = output / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_json(path: Path, document: dict[str, Any]) -> None:
  """Write ``document`` as indented JSON, atomically (a temporary file renamed into place)."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(document, indent=2) + "\n")
  os.replace(tmp, path)
