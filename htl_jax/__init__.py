"""htl-jax: multi-task learning with hybrid targets (HTLNet, RecSys 2024) in JAX/Flax.

Floors, each importing only the ones below it:

- ``cli`` (the commands) -> ``serve`` (predict, export), ``repro`` (the paper's experiments,
  tuning) -> ``train`` (state, steps, feed, pmap, checkpoints, the loop and a run's files)
  -> ``models``, ``losses``, ``data``, ``embedding`` (the shared table), ``configs`` ->
  ``optim`` (gradient processes as Optax transforms), ``metrics``, ``spec``, ``errors``.
"""

__version__ = '0.3.0'
