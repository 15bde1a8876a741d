"""The mathematics, with no Flax in it: adapter configs, spectral blocks and the pure-jnp ops.

Nothing here imports from the rest of smoa_jax except :mod:`smoa_jax.errors` and the device-mesh
helpers of :mod:`smoa_jax.parallel.sharding` (spectral preprocessing runs where the kernels live).
"""
