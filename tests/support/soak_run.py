"""Subprocess for tests/reliability/test_soak.py: train ToyLM for STEPS steps into OUTPUT_DIR (a
checkpoint every SAVE_EVERY steps), resuming from its latest checkpoint with ``--resume``; at the
end the adapter goes to OUTPUT_DIR/adapter.

Usage: python -m tests.support.soak_run OUTPUT_DIR STEPS SAVE_EVERY [--resume]
"""

import sys
from pathlib import Path

import smoa_jax
from tests.support.toy import lm_run


def main() -> None:
  output_dir, steps, save_every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
  model, _ = lm_run(output_dir, steps=steps, save_every=save_every, resume="--resume" in sys.argv)
  smoa_jax.save_adapter(model, output_dir / "adapter")


if __name__ == "__main__":
  main()
