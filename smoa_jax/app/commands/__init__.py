"""The sub-commands of ``smoa-jax``, one module each; :mod:`smoa_jax.app.cli` assembles them.

Each module has ``register(add)``, which adds its sub-command(s) and flags through
``add(name, run, help)``, and the ``run(args) -> exit status`` functions it registers.
"""
