"""Probes: two commands writing one directory. ``finetune --output`` and ``export --output`` hold
a lock on their output (smoa_jax/io/rundir.py); a second writer is refused, a stale lock is taken
over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smoa_jax.io import rundir
from tests.support.cli import adapter_tensors, finetune_argv, run_cli
from tests.reliability import probe

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI with ``smoa_jax.<name>`` held until the file GO exists (READY is created first):
# ``train`` waits right after checkpoint 2, ``to_hf`` before it writes anything.
HOLDING = """
import pathlib, sys, time
import smoa_jax
from smoa_jax.app import cli

name, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
argv = sys.argv[4:]
original = getattr(smoa_jax, name)

def hold():
  ready.touch()
  deadline = time.monotonic() + 300
  while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.05)

def train(*args, on_save, **kwargs):
  def hook(step):
    on_save(step)
    if step == 2:
      hold()
  return original(*args, on_save=hook, **kwargs)

def to_hf(*args, **kwargs):
  hold()
  return original(*args, **kwargs)

setattr(smoa_jax, name, {"train": train, "to_hf": to_hf}[name])
sys.exit(cli.main(argv))
"""


def _holding(name: str, argv: list, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
  """Start the CLI in a subprocess that stops inside ``name``; returns it and its GO file."""
  ready, go = tmp_path / f"{name}.ready", tmp_path / f"{name}.go"
  proc = subprocess.Popen([sys.executable, "-c", HOLDING, name, ready, go, *map(str, argv)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while not ready.exists():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"the holding command never got there:\n{proc.communicate()[1][-3000:]}")
    time.sleep(0.1)
  return proc, go


def _finish(proc: subprocess.Popen, go: Path) -> str:
  go.touch()
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return err


def _one_error_line(err: str) -> str:
  errors = [line for line in err.splitlines() if line.startswith("smoa-jax: error: ")]
  assert len(errors) == 1 and "Traceback" not in err, err
  return errors[0]


@probe("runs", "a second `finetune --output RUN --overwrite` (and `--resume`, and `export "
       "--output RUN`) while a finetune writes RUN",
       "exit 1, one line naming the holder (pid, host, start time) and what to do; the first "
       "run finishes with all its cli_files intact")
@pytest.mark.subprocess
def test_a_second_writer_is_refused_while_a_run_writes(cli_files, tmp_path, capsys):
  run = tmp_path / "run"
  argv = finetune_argv(cli_files, run)
  first, go = _holding("train", argv, tmp_path)
  try:
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    second = subprocess.run([sys.executable, "-m", "smoa_jax", *map(str, argv), "--overwrite"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    line = _one_error_line(second.stderr)
    assert (f"{run} is in use by smoa-jax finetune (pid {first.pid} on host "
            f"{socket.gethostname()}, started ") in line and "wait for it to finish" in line
    for extra in (["finetune", "--output", run, "--resume", "--no-progress"],
                  ["export", "--run", run, "--output", run, "--overwrite"]):
      code, _, err = run_cli(capsys, *extra)
      assert code == 1 and f"pid {first.pid}" in _one_error_line(err)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # untouched
  finally:
    err = _finish(first, go)
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  assert json.loads((run / "run_config.json").read_text())["argv"] == list(map(str, argv))
  assert adapter_tensors(run)
  assert not rundir.lock_path(run).exists()  # released at the end


def _dead_pid() -> int:
  pid = 2**22 + 17
  while True:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return pid
    except PermissionError:
      pass
    pid += 1


@probe("runs", "a lock file left by a killed finetune (its pid gone, this host)",
       "taken over: the run proceeds and stderr says whose lock it was; the lock file is removed "
       "at the end")
def test_a_stale_lock_is_taken_over(cli_files, tmp_path, capsys):
  run = tmp_path / "run"
  pid = _dead_pid()
  rundir.lock_path(run).write_text(json.dumps({
      "pid": pid, "host": socket.gethostname(), "command": "finetune",
      "started": "2024-01-01T00:00:00+00:00"}))
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, run, "causal-lm", "--steps", 1))
  assert code == 0, err
  assert (f"smoa-jax: took over the lock of {run} left by smoa-jax finetune (pid {pid} on host "
          f"{socket.gethostname()}, started 2024-01-01T00:00:00+00:00), which no longer runs"
          ) in err
  assert (run / "adapter").is_dir() and not rundir.lock_path(run).exists()


@probe("runs", "a lock file left by a process on ANOTHER host (e.g. on gcsfuse, whose locks are "
       "local to a host)", "exit 1, one line: the run may be in use, delete the lock file if "
       "that process has stopped; nothing is written")
def test_a_lock_from_another_host_is_not_taken_over(cli_files, tmp_path, capsys):
  run = tmp_path / "run"
  lock = rundir.lock_path(run)
  lock.write_text(json.dumps({"pid": 1, "host": "another-host", "command": "finetune",
                              "started": "2024-01-01T00:00:00+00:00"}))
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, run))
  assert code == 1
  line = _one_error_line(err)
  assert "may be in use" in line and "host another-host" in line and "delete the lock" in line
  assert not run.exists() and lock.exists()  # the other host's record stays


@probe("runs", "`export --output DIR` while another export writes DIR",
       "exit 1, one line naming the other export's pid; that export completes")
@pytest.mark.subprocess
@pytest.mark.slow  # the same lock as a second writer (default run); here the export entry
def test_a_second_export_to_one_directory_is_refused(cli_lm_run, tmp_path, capsys):
  merged = tmp_path / "merged"
  first, go = _holding("to_hf", ["export", "--run", cli_lm_run, "--output", merged], tmp_path)
  try:
    code, _, err = run_cli(capsys, "export", "--run", cli_lm_run, "--output", merged, "--adapter-only")
    assert code == 1
    line = _one_error_line(err)
    assert f"{merged} is in use by smoa-jax export (pid {first.pid} on host" in line
    assert not merged.exists()
  finally:
    _finish(first, go)
  assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
  assert not rundir.lock_path(merged).exists()
