"""Subprocess of tests/training/test_loop.py: train ToyLM, SIGKILL this process right after a save.

Usage: python -m tests.support.kill_run OUTPUT_DIR KILL_AT_STEP
"""

import os
import signal
import sys

from tests.support.toy import lm_run


def main() -> None:
  output_dir, kill_at = sys.argv[1], int(sys.argv[2])

  def on_save(step: int) -> None:
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  lm_run(output_dir, on_save=on_save)


if __name__ == "__main__":
  main()
