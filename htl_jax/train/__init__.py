"""Training: train state, pure steps, data parallelism, checkpoints and the run loop.

Entry point: :func:`htl_jax.train.loop.train_and_evaluate`.
"""
