"""One process of a multi-process ``smoa-jax`` command; started by tests/parallel/test_multiprocess.py.

Usage: ``python -m tests.support.cli_worker KILL_AT ARGV...`` runs ``smoa-jax ARGV`` here. With
KILL_AT > 0, once the checkpoint and the adapter of step KILL_AT are saved, the processes meet at a
barrier and each one SIGKILLs itself, as a preempted pod would (0: run to the end). The barrier
makes the kill point the same on every process; what is on disk then is what a resume must use.
"""

import os
import signal
import sys


def main() -> None:
  kill_at, argv = int(sys.argv[1]), sys.argv[2:]
  import smoa_jax
  from smoa_jax.app import cli

  train = smoa_jax.train

  def killed_after_save(*args, on_save, **kwargs):
    def save_then_die(step: int) -> None:
      on_save(step)
      if step == kill_at:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"killed after step {step}")
        os.kill(os.getpid(), signal.SIGKILL)
    return train(*args, on_save=save_then_die, **kwargs)

  smoa_jax.train = killed_after_save  # the CLI calls smoa_jax.train
  sys.exit(cli.main(argv))


if __name__ == "__main__":
  main()
