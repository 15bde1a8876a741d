"""The lock of a directory being written (smoa_jax/io/rundir.py), in one process."""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest

import smoa_jax
from smoa_jax.io import rundir


def test_the_lock_names_its_holder_refuses_a_second_holder_and_leaves_nothing(tmp_path):
  run = tmp_path / "a" / "b" / "run"
  with rundir.lock(run, "finetune") as stale:
    assert stale is None
    record = json.loads(rundir.lock_path(run).read_text())
    assert (record["pid"], record["host"], record["command"]) == (os.getpid(),
                                                                   socket.gethostname(), "finetune")
    # Another descriptor is another holder, even in this process (flock is per open file).
    with pytest.raises(smoa_jax.CheckpointError, match=rf"run/\.\./run is in use by smoa-jax "
                       rf"finetune \(pid {os.getpid()} on host"):
      with rundir.lock(run / ".." / "run", "export"):
        pass
    assert not run.exists()
  assert not (tmp_path / "a").exists()  # the lock file and the parents it created are gone
  with pytest.raises(RuntimeError):
    with rundir.lock(tmp_path / "run", "finetune"):
      raise RuntimeError("the command failed")
  assert list(tmp_path.iterdir()) == []  # released on failure too


def test_a_file_system_without_locks_warns_and_runs_unlocked(tmp_path, monkeypatch):
  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
  with pytest.warns(UserWarning, match="does not support file locks"):
    with rundir.lock(tmp_path / "run", "finetune") as stale:
      assert stale is None
