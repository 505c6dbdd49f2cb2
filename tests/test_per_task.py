"""Per-task gradients of the shared embedding (htl_jax.optim.per_task).

The sparse, by-id path (per-task row gradients summed by ``htl_jax.embedding``) must give
exactly what Algorithm 1 gives on the dense table gradients, including batches that repeat
ids; the one-backward-pass (isolated towers) and the vmap-over-cotangents paths must agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htl_jax import embedding, optim
from htl_jax.spec import HybridSpec
from conftest import model_config, trainer_gradient
from htl_jax.models import get_model
from htl_jax.optim import per_task

SPEC = HybridSpec(('user', 'item', 'hour'), (6, 5, 4), ('click', 'long_view'), 'watch_time')
CFG = dict(hidden_dims=(8, 4), label_embed_dim=3, fusion_dim=4)
K, B, D = SPEC.num_tasks, 12, 3


def _setup(stop_gradient=True):
  model = get_model('htlnet', SPEC, model_config(**CFG, stop_gradient=stop_gradient))
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  # Few distinct values per field so that ids repeat within the batch.
  x = jnp.stack([jax.random.randint(keys[i], (B,), 0, 3) for i in range(3)], axis=1)
  y0 = jax.random.bernoulli(keys[3], 0.6, (B,)).astype(jnp.float32)
  y1 = y0 * jax.random.bernoulli(keys[4], 0.5, (B,)).astype(jnp.float32)
  batch = {'x': x, 'y': jnp.stack([y0, y1], 1), 'core': 3.0 * y1 + y0,
           'index': jnp.arange(B), 'weight': jnp.ones(B)}
  table = jax.random.normal(keys[5], (SPEC.total_vocab, D))
  params = model.init({'params': jax.random.PRNGKey(1), 'gumbel': jax.random.PRNGKey(2)},
                      (jnp.zeros((B, 3, D)),) * K, train=True, tau=2.0,
                      example_index=batch['index'])['params']
  ids, _ = embedding.lookup(table, embedding.TableLayout(SPEC.vocab_sizes), x)

  def loss_vector(model_params, embs):
    out = model.apply({'params': model_params}, embs, train=True, tau=2.0,
                      example_index=batch['index'], rngs={'gumbel': jax.random.PRNGKey(3)})
    bce = -(batch['y'] * jnp.log(out.probs) + (1 - batch['y']) * jnp.log1p(-out.probs))
    mse = (out.core[:, 0] - batch['core']) ** 2
    return jnp.concatenate([bce.mean(0), mse.mean()[None]])

  return model, params, table, ids, loss_vector


def _dense_task_grads(params, table, ids, loss_vector):
  """Reference: Jacobian of the task losses w.r.t. the dense table, ``[K, M, d]``."""
  return jax.jacrev(lambda t: loss_vector(params, (t[ids],) * K))(table)


def test_batch_repeats_ids():
  _, _, _, ids, _ = _setup()
  assert len(np.unique(np.asarray(ids))) < ids.size


@pytest.mark.parametrize('path,dense', [('general', False), ('isolated', False),
                                        ('isolated', True)])
def test_row_grads_summed_by_id_equal_dense(path, dense):
  _, params, table, ids, loss_vector = _setup()
  fn = per_task.row_grads_general if path == 'general' else per_task.row_grads_isolated
  losses, row_grads, _, _ = fn(loss_vector, params, table[ids], K)
  id_grads = embedding.sum_rows_by_id(ids, row_grads, SPEC.total_vocab, dense=dense)
  if dense:   # already the [K, M, d] table gradients
    rebuilt = id_grads
  else:
    rebuilt = jax.vmap(lambda g: embedding.scatter_to_table(
        table, id_grads._replace(grads=g)))(id_grads.grads)
  expected = _dense_task_grads(params, table, ids, loss_vector)
  np.testing.assert_allclose(rebuilt, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses, loss_vector(params, (table[ids],) * K), rtol=1e-6)


def test_isolated_and_general_agree_including_tower_grads():
  _, params, table, ids, loss_vector = _setup()
  a = per_task.row_grads_general(loss_vector, params, table[ids], K)
  b = per_task.row_grads_isolated(loss_vector, params, table[ids], K)
  np.testing.assert_allclose(a.rows, b.rows, rtol=1e-5, atol=1e-7)
  assert a.shared == {} and b.shared == {}       # HTLNet's theta_s is the embedding alone
  for x, y in zip(jax.tree.leaves(a.rest), jax.tree.leaves(b.rest)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_isolated_path_is_wrong_without_stop_gradient():
  """Without Eq. 15 tasks share the embedding path, so only the general path is valid."""
  model, params, table, ids, loss_vector = _setup(stop_gradient=False)
  assert not model.isolated_towers
  a = per_task.row_grads_general(loss_vector, params, table[ids], K).rows
  b = per_task.row_grads_isolated(loss_vector, params, table[ids], K).rows
  assert not np.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('transform', ['htl', 'pcgrad', 'metabalance'])
def test_sparse_process_equals_process_on_dense_table(transform):
  """Algorithm 1 (and the others) on by-id slots == on the dense table gradients.

  The sparse branch is forced: this vocabulary is small enough for the dense one.
  """
  _, params, table, ids, loss_vector = _setup()
  make = {'htl': lambda: optim.hybrid_grad_balance(gamma=0.3, weight_bound=2.0),
          'pcgrad': lambda: optim.pcgrad(seed=3),
          'metabalance': lambda: optim.metabalance(K)}[transform]
  tx = make()
  row_grads = per_task.row_grads_isolated(loss_vector, params, table[ids], K).rows
  id_grads = embedding.sum_rows_by_id(ids, row_grads, SPEC.total_vocab, dense=False)
  assert id_grads.ids is not None
  sparse, _ = tx.update({'e': id_grads.grads}, tx.init({'e': table}))
  sparse_table = embedding.scatter_to_table(table, id_grads._replace(grads=sparse['e']))
  dense = _dense_task_grads(params, table, ids, loss_vector)
  dense_out, _ = tx.update({'e': dense}, tx.init({'e': table}))
  np.testing.assert_allclose(sparse_table, dense_out['e'], rtol=1e-5, atol=1e-7)


TRAINER_CASES = {
    # name: (model, grad_process, vocab sizes); a 15-row table is summed densely, a 150-row
    # one by id (it has more rows than the batch has lookups).
    'htlnet-htl-dense': ('htlnet', 'htl', (6, 5, 4)),
    'htlnet-htl-by_id': ('htlnet', 'htl', (60, 50, 40)),
    'shared_bottom-htl-by_id': ('shared_bottom', 'htl', (60, 50, 40)),
    'shared_bottom-metabalance-dense': ('shared_bottom', 'metabalance', (6, 5, 4)),
    'mmoe-htl-dense': ('mmoe', 'htl', (6, 5, 4)),
    'mmoe-pcgrad-by_id': ('mmoe', 'pcgrad', (60, 50, 40)),
    'ple-metabalance-by_id': ('ple', 'metabalance', (60, 50, 40)),
    'adatt-htl-dense': ('adatt', 'htl', (6, 5, 4)),
    # The pairwise ranking loss reads every binary task's probability: the per-task terms
    # are then tied through ``probs`` while their BCE terms read ``task_probs``.
    'mmoe-pcgrad-pairwise-dense': ('mmoe', 'pcgrad', (6, 5, 4), {'lambda_pair': 0.5}),
}


@pytest.mark.parametrize('case', sorted(TRAINER_CASES))
def test_trainer_gradient_is_the_process_on_the_full_jacobian(case):
  """The train step's gradient of theta_s = the gradient process on its dense Jacobian.

  theta_s is the table, plus the shared bottom / experts of Shared-Bottom, MMoE, PLE and
  AdaTT; the reference differentiates the task losses with respect to the dense table and
  the shared layers with ``jax.jacrev`` and applies the transformation to that. Batches repeat
  ids, the L2 term (on the looked-up rows, after the process) is on, and every other parameter gets
  the gradient of the summed loss.
  """
  from htl_jax.configs.base import get_base_config
  from htl_jax.losses import CoreTransform
  from htl_jax.train import optimizer as optimizer_lib
  from htl_jax.train.state import init_state, make_setup

  model_name, grad_process, vocab, *overrides = TRAINER_CASES[case]
  spec = HybridSpec(SPEC.fields, vocab, SPEC.binary_tasks, SPEC.core_task)
  config = get_base_config()
  config.model, config.grad_process = model_name, grad_process
  config.update(*overrides)
  config.hidden_dims, config.fusion_dim, config.label_embed_dim = (8, 4), 4, 3
  config.embed_dim, config.l2, config.gamma, config.clip = D, 0.05, 0.3, 2.0
  config.alpha, config.num_experts = 0.7, 2
  setup = make_setup(config, spec, CoreTransform('none'))
  state = init_state(setup, config)
  table = jax.random.normal(jax.random.PRNGKey(7), state.params['embedding']['table'].shape)
  state = state.replace(params={**state.params, 'embedding': {'table': table}})
  keys = jax.random.split(jax.random.PRNGKey(8), 3)
  x = jnp.stack([jax.random.randint(keys[i], (B,), 0, 3) for i in range(3)], axis=1)
  y0 = jax.random.bernoulli(keys[1], 0.6, (B,)).astype(jnp.float32)
  batch = {'x': x, 'y': jnp.stack([y0, y0 * (x[:, 0] > 0)], 1), 'core': 2.0 * y0 + x[:, 1],
           'index': jnp.arange(B), 'weight': jnp.ones(B)}

  got = trainer_gradient(setup, state, batch)

  ids, _ = embedding.lookup(table, setup.layout, x)
  key = jax.random.fold_in(state.rng, state.step)
  shared, rest = per_task.split_shared(state.params['model'], setup.shared)
  assert bool(shared) == (model_name != 'htlnet')

  def task_losses(t, shared, rest):
    out = setup.model.apply({'params': {**shared, **rest}}, (t[ids],) * K, train=True,
                            tau=state.tau, example_index=batch['index'], rngs={'gumbel': key})
    return jnp.stack(setup.objective.loss_terms(out, batch))

  jac_table, jac_shared = jax.jacrev(task_losses, argnums=(0, 1))(table, shared, rest)
  theta_s = {'embedding': table, 'shared': shared}
  balance = optimizer_lib.gradient_process(setup.chain_shape, config)
  combined, _ = balance.update({'embedding': jac_table, 'shared': jac_shared},
                               balance.init(theta_s))
  l2 = jax.grad(lambda t: config.l2 * jnp.mean(jnp.sum(t[ids] ** 2, axis=(1, 2))))(table)
  np.testing.assert_allclose(got['embedding']['table'], combined['embedding'] + l2,
                             rtol=1e-5, atol=1e-6)
  summed_rest = jax.grad(lambda r: jnp.sum(task_losses(table, shared, r)))(rest)
  for name in state.params['model']:
    expected = combined['shared'][name] if name in shared else summed_rest[name]
    for a, b in zip(jax.tree.leaves(got['model'][name]), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_task_backward_pass_skips_the_other_towers():
  """Each task's term transposed alone: the other towers and gates are left out.

  MMoE keeps its tasks' probabilities apart (``ModelOutput.task_probs``), so task k's
  backward pass reaches its own tower and gate and the shared experts only. Stacking the
  terms first (one dense cotangent per task, as a ``vjp`` of the loss vector would take)
  gives the same gradients with more matmuls: every tower and gate, for every task.
  """
  model = get_model('mmoe', SPEC, model_config(hidden_dims=(8, 4), num_experts=2))
  rows = jax.random.normal(jax.random.PRNGKey(0), (B, 3, D))
  params = model.init(jax.random.PRNGKey(1), (rows,) * K)['params']
  y = (jnp.arange(B)[:, None] % (2 + jnp.arange(2))[None, :] == 0).astype(jnp.float32)

  def terms(model_params, embs):
    out = model.apply({'params': model_params}, embs)
    return (*(-jnp.mean(y[:, t] * jnp.log(p) + (1 - y[:, t]) * jnp.log1p(-p))
              for t, p in enumerate(out.task_probs)), jnp.mean(out.core[:, 0] ** 2))

  def stacked(model_params, embs):
    return jnp.stack(terms(model_params, embs))

  def run(fn):
    return per_task.row_grads_general(fn, params, rows, K, shared=model.shared)

  def matmuls(fn):
    jaxpr = jax.make_jaxpr(lambda: run(fn))()
    return str(jaxpr).count('dot_general')

  a, b = run(terms), run(stacked)
  for got, want in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Per task, the stacked version also runs the other K-1 tasks' parts backwards: the
  # tower (2 dense layers, 2 matmuls each: input and kernel), the gate's mix of the expert
  # outputs (2: gate weights and experts) and the gate (2).
  assert matmuls(stacked) - matmuls(terms) == K * (K - 1) * (4 + 2 + 2)
