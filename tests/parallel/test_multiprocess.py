"""Two JAX processes on localhost (4 simulated CPU devices each, one global mesh over the 8, CPU
collectives) train as one process on one device does, and agree with it: through the library on
a 2x2x2 mesh, and through ``smoa-jax finetune`` with fsdp=8 spanning both processes, killed and
resumed."""

from __future__ import annotations

import json
import signal
import socket

import numpy as np
import pytest
from flax import nnx

from tests.support import sharded_run
from tests.support.cli import (
  LM_RUN_EXTRA,
  adapter_tensors,
  finetune_argv,
  ours_with_adapter,
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _process_envs(count: int) -> list[dict[str, str]]:
  """The environment of each process of one job on localhost (read by jax.distributed)."""
  address = f"127.0.0.1:{_free_port()}"
  return [{"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(count),
           "JAX_PROCESS_ID": str(i)} for i in range(count)]


@pytest.mark.slow  # the CLI test below spans processes with fsdp=8 in the default run
@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_two_processes_match_single_process(sharded_llama, tmp_path):
  checkpoint, reference = sharded_llama
  procs = [sharded_run.start(["worker", checkpoint, str(tmp_path)], devices=4, env=env)
           for env in _process_envs(2)]
  sharded_run.finish(procs, timeout=900)
  result = dict(np.load(tmp_path / "multiprocess.npz"))
  np.testing.assert_allclose(result["losses"], reference["losses"], atol=1e-5, rtol=0)
  for k in reference:
    np.testing.assert_allclose(result[k], reference[k], atol=1e-5, rtol=0, err_msg=k)
  # Process 0 alone wrote the metrics (one line per step); orbax wrote one checkpoint per save.
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == list(range(1, sharded_run.TRAIN_STEPS + 1))
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, sharded_run.TRAIN_STEPS]


def _records(run) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli_job(argv: list, kill_at: int = 0) -> list:
  """``smoa-jax ARGV`` as a job of 2 processes with 4 simulated devices each (the flags name the
  coordinator); the processes are SIGKILLed after the save of step ``kill_at`` (0: never)."""
  address = f"127.0.0.1:{_free_port()}"
  return [sharded_run.start([str(kill_at), *map(str, argv), "--coordinator-address", address,
                             "--num-processes", "2", "--process-id", str(i)],
                            devices=4, module="tests.support.cli_worker")
          for i in range(2)]


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_cli_finetune_with_fsdp_across_processes_is_killed_resumed_and_matches_one_process(
    cli_files, cli_lm_run, tmp_path):
  """``finetune --mesh fsdp=8`` on 2 processes (every kernel and adapter factor split over both):
  apply_adapter and save_adapter on the mesh, a SIGKILL of both right after the step-2 save, then
  ``--resume`` (load_adapter onto the mesh, the orbax restore). Losses and the adapter equal the
  one-process, one-device run of the same flags (``cli_lm_run``)."""
  run = tmp_path / "run"
  argv = finetune_argv(cli_files, run, "causal-lm", *LM_RUN_EXTRA, "--mesh", "fsdp=8")
  sharded_run.finish(_cli_job(argv, kill_at=2), timeout=900, returncode=-signal.SIGKILL)
  assert max(r["step"] for r in _records(run)) == 2
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]

  logs = sharded_run.finish(_cli_job(["finetune", "--output", run, "--resume", "--no-progress"]),
                            timeout=900)
  summaries = [[line for line in log.splitlines() if line.startswith('{"step"')] for log in logs]
  assert len(summaries[0]) == 1 and summaries[1] == []  # one summary line per job
  assert json.loads(summaries[0][0])["step"] == 4
  config = json.loads((run / "run_config.json").read_text())
  assert config["flags"]["mesh"] == "fsdp=8" and len(config["resumed"]) == 1

  # The same records, in the same order, as the uninterrupted one-process run.
  single, job = _records(cli_lm_run), _records(run)
  assert [(r["step"], r["split"]) for r in job] == [(r["step"], r["split"]) for r in single]
  for ours, want in zip(job, single):
    np.testing.assert_allclose(ours["loss"], want["loss"], rtol=0, atol=1e-5, err_msg=ours)
  whole, resumed = adapter_tensors(cli_lm_run), adapter_tensors(run)
  assert whole.keys() == resumed.keys()
  for key in whole:
    np.testing.assert_allclose(resumed[key], whole[key], rtol=0, atol=1e-5, err_msg=key)

  # The job's adapter, loaded on one device, gives the one-process run's logits.
  ids = np.arange(2, 18, dtype=np.int32).reshape(2, 8)
  logits = [nnx.jit(lambda m, x: m(x))(ours_with_adapter(cli_files["llama"], r), ids)
            for r in (run, cli_lm_run)]
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(logits[1]), rtol=0, atol=1e-4)
