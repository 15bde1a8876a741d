"""``python -m smoa_jax``: the ``smoa-jax`` command (see :mod:`smoa_jax.cli`)."""

import sys

from smoa_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
