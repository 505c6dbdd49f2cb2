"""Multi-task gradient processes for the shared parameters (``htl_jax.optim``).

``transforms`` holds the Optax gradient transformations (HTLNet's Algorithm 1,
PCGrad, MetaBalance); they take per-task gradients stacked on a leading task
axis and depend on jax and optax only. ``per_task`` computes those per-task
gradients for an embedding table from the looked-up rows.
"""

from __future__ import annotations

from htl_jax.optim.transforms import HybridGradBalanceState
from htl_jax.optim.transforms import MetaBalanceState
from htl_jax.optim.transforms import PCGradState
from htl_jax.optim.transforms import hybrid_grad_balance
from htl_jax.optim.transforms import metabalance
from htl_jax.optim.transforms import pcgrad
from htl_jax.optim.transforms import pcgrad_combine
from htl_jax.optim.transforms import pcgrad_task_orders
from htl_jax.optim.transforms import task_norms_and_cosines

# Per-task gradients of the shared embedding, sparse by id (needs no other htl_jax module).
from htl_jax.optim import per_task


__all__ = [
    'HybridGradBalanceState', 'MetaBalanceState', 'PCGradState', 'hybrid_grad_balance',
    'metabalance', 'pcgrad', 'pcgrad_combine', 'pcgrad_task_orders', 'per_task',
    'task_norms_and_cosines',
]
