"""Scale-out: device meshes, batch and parameter sharding, multi-process start-up
(:mod:`smoa_jax.parallel.sharding`) and the per-family sharding rules applied to NNX models
(:mod:`smoa_jax.parallel.spmd`)."""
