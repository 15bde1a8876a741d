"""Flax shells over :mod:`smoa_jax.core`: the NNX and Linen adapter layers, their injection into
any NNX model, and the trainable/frozen partition of parameters for optax."""
