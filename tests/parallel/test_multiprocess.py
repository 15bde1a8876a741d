"""Two JAX processes on localhost (4 simulated CPU devices each, one global 2x2x2 mesh, CPU
collectives) run the same SMoA steps as one process on one device, and agree with it."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from tests.support import sharded_run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_two_processes_match_single_process(sharded_llama, tmp_path):
  checkpoint, reference = sharded_llama
  address = f"127.0.0.1:{_free_port()}"
  procs = [sharded_run.start(["worker", checkpoint, str(tmp_path)], devices=4,
                              env={"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": str(i)})
           for i in range(2)]
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
