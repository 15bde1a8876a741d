"""``python -m smoa_jax``: the ``smoa-jax`` command (see :mod:`smoa_jax.app.cli`)."""

import sys

from smoa_jax.app.cli import main

if __name__ == "__main__":
  sys.exit(main())
