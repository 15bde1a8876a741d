"""The application on top of the library: the ``smoa-jax`` command, the demo, the real assets
fetched from PyPI, their fixed data splits, and the analysis of learned updates."""
