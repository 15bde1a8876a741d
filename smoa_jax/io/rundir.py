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
RUN_DIR may be local or on object storage (``gs://bucket/run``; :func:`smoa_jax.io.files.as_path`).

A directory being written is locked (:func:`lock`): ``finetune --output RUN_DIR`` (fresh,
``--resume`` or ``--overwrite``) and ``export --output DIR`` hold the lock of their output for the
whole command, so a second writer is refused instead of clobbering the first one's files. The
lock is the file ``.NAME.smoa-jax.lock`` NEXT to the directory (``PARENT/.RUN_DIR.smoa-jax.lock``):
it never collides with a run's entries or with an export that replaces its directory by a
rename, and a refused command leaves nothing behind. Its design:

* Exclusion is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on that file, held by an open descriptor. The
  kernel releases it when the process dies, SIGKILL included, so a killed run never leaves a lock
  held. On NFS, Linux implements ``flock`` with NFS (byte-range) locks that hold across
  clients; a client that crashes keeps its lock until the server's lease expires (~90 s).
* The file records the holder: pid, host, start time, command (JSON). A second writer is refused
  with one line naming them. When the lock can be taken but the file still holds a record, the
  holder died without cleaning up: from this host the record is taken over (no process holds
  the lock, whatever its pid is now); from ANOTHER host it is refused, because file systems
  whose locks are local to a host (gcsfuse and other FUSE mounts, NFS mounted ``nolock`` /
  ``local_lock``) cannot tell whether that process still runs: the message says to delete the
  file once it has stopped.
* Release unlinks the file, then closes the descriptor; a process that opened the old file
  meanwhile sees that the path no longer names the inode it locked and tries again.
* Where the file system has no locks at all, or the directory is on object storage
  (``gs://...``, which has none), a warning says so and the command runs unlocked.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator

from smoa_jax.errors import CheckpointError
from smoa_jax.io.files import as_path, is_local

try:
  import fcntl
except ImportError:  # Windows: no flock
  fcntl = None

__all__ = [
    "ADAPTER_DIR", "CHECKPOINT_DIR", "METRICS_NAME", "RUN_CONFIG", "LOSS_PLOT", "DELTA_PLOT",
    "RUN_ENTRIES", "read_run", "run_entries", "check_run_dir", "clear_run_dir", "write_json",
    "lock_path", "lock",
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
  file = as_path(run_dir) / RUN_CONFIG
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


def run_entries(output: str | os.PathLike) -> list[str]:
  """The names in ``output`` (empty when it does not exist); a file there is an error."""
  output = as_path(output)
  if output.exists() and not output.is_dir():
    raise CheckpointError(f"--output {output} is a file; give a directory.")
  return sorted(p.name for p in output.iterdir()) if output.is_dir() else []


def check_run_dir(output: str | os.PathLike, *, resume: bool,
                  overwrite: bool) -> dict[str, Any] | None:
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


def clear_run_dir(output: str | os.PathLike) -> None:
  """Remove a previous run's entries (``--overwrite``, after :func:`check_run_dir` passed)."""
  for name in run_entries(output):
    path = as_path(output) / name
    path.rmtree() if path.is_dir() else path.unlink()


def write_json(path: str | os.PathLike, document: dict[str, Any]) -> None:
  """Write ``document`` as indented JSON, atomically: a temporary file renamed into place, or on
  object storage (no rename there) the object written whole, which readers see whole or not."""
  path, text = as_path(path), json.dumps(document, indent=2) + "\n"
  if not is_local(path):
    path.write_text(text)
    return
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  tmp.replace(path)


# -- the lock of a directory being written ---------------------------------------------------------
def lock_path(directory: str | os.PathLike) -> Path:
  """``PARENT/.NAME.smoa-jax.lock``: the lock file of ``directory`` (symlinks resolved)."""
  directory = Path(directory).resolve()
  return directory.parent / f".{directory.name}.smoa-jax.lock"


def _holder(record: dict[str, Any] | None) -> str:
  if not record:
    return "another smoa-jax command (it is starting)"
  return (f"smoa-jax {record.get('command', '?')} (pid {record.get('pid', '?')} on host "
          f"{record.get('host', '?')}, started {record.get('started', '?')})")


def _read_record(fd: int) -> dict[str, Any] | None:
  """The holder record in the lock file (None when empty or unreadable: a holder starting up)."""
  try:
    record = json.loads(os.pread(fd, 4096, 0) or b"null")
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


def _acquire(path: Path, directory: str | os.PathLike) -> int | None:
  """An open descriptor holding ``flock`` on ``path`` (the file ``path`` names now); None when
  the file system has no locks; CheckpointError naming the holder when another process has it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      record = _read_record(fd)
      os.close(fd)
      raise CheckpointError(f"{directory} is in use by {_holder(record)}; wait for it to finish "
                            f"or stop it, or choose another directory (lock file: {path})."
                            ) from None
    except OSError as err:
      os.close(fd)
      if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return None
      raise
    try:
      current = os.stat(path)
    except FileNotFoundError:
      current = None
    mine = os.fstat(fd)
    if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
      return fd
    os.close(fd)  # its holder removed the file while we opened it: lock the new one


@contextlib.contextmanager
def lock(directory: str | os.PathLike, command: str) -> Iterator[str | None]:
  """Hold the lock of ``directory`` (a run or export directory) while the block runs.

  Yields who held a stale lock that was taken over (``"smoa-jax finetune (pid 4242 on host h,
  started ...)"``: that process is gone), else None. Creates missing parent directories, and
  removes them again (when empty) with the lock file.

  Raises:
    CheckpointError: another process holds the lock (its pid, host and start time named), or a
      holder on another host left a record whose process this host cannot check.
  """
  if not is_local(directory):
    warnings.warn(f"{directory} is on object storage, which has no file locks; it is written "
                  "without a lock, so make sure no other command writes it at the same time.",
                  stacklevel=3)
    yield None
    return
  path = lock_path(directory)
  created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = None
  try:
    fd = _acquire(path, directory) if fcntl is not None else None
    if fd is None:
      warnings.warn(f"{path.parent} does not support file locks; {directory} is written without "
                    "a lock, so make sure no other command writes it at the same time.",
                    stacklevel=3)
      yield None
      return
    stale = _read_record(fd)
    if stale and stale.get("host") != socket.gethostname():
      os.close(fd)
      fd = None
      raise CheckpointError(
          f"{directory} may be in use: its lock file {path} names {_holder(stale)}, and this "
          "host cannot check whether that process still runs. If it has stopped, delete the lock "
          "file and retry.")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    yield _holder(stale) if stale else None
  finally:
    if fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
      os.close(fd)
    for parent in created:  # innermost first; only the empty ones go
      with contextlib.suppress(OSError):
        parent.rmdir()
