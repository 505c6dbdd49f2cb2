"""htl-jax: multi-task learning with hybrid targets (HTLNet, RecSys 2024) in JAX/Flax.

Subpackages: ``data`` (loaders and pipeline), ``models`` (HTLNet and baselines, registry),
``optim`` (gradient processes as Optax transforms, per-task gradients), ``train`` (state,
steps, pmap, checkpoints, loop); modules ``losses`` and ``metrics``.
"""

__version__ = '0.1.0'
