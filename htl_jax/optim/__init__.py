"""Multi-task gradient processes for the shared parameters (``htl_jax.optim``).

Optax gradient transformations that take per-task gradients stacked on a leading task axis
and return one combined gradient (:mod:`htl_jax.optim.stacked` states the contract):
HTLNet's Algorithm 1 (:mod:`~htl_jax.optim.transforms`), PCGrad
(:mod:`~htl_jax.optim.gradient_surgery`) and MetaBalance
(:mod:`~htl_jax.optim.meta_balance`). They depend on jax and optax only, so other projects
can use them alone.
:mod:`~htl_jax.optim.per_task` takes those per-task gradients with autodiff.
"""

from __future__ import annotations

from htl_jax.optim import per_task
from htl_jax.optim.meta_balance import MetaBalanceState, metabalance
from htl_jax.optim.gradient_surgery import PCGradState, pcgrad, pcgrad_combine, pcgrad_task_orders
from htl_jax.optim.stacked import TaskDiagnostics, task_norms_and_cosines
from htl_jax.optim.transforms import HybridGradBalanceState, hybrid_grad_balance

__all__ = [
    'HybridGradBalanceState', 'MetaBalanceState', 'PCGradState', 'TaskDiagnostics',
    'hybrid_grad_balance',
    'metabalance', 'pcgrad', 'pcgrad_combine', 'pcgrad_task_orders', 'per_task',
    'task_norms_and_cosines',
]
