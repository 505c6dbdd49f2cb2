"""The shared embedding table (``htl_jax.embedding``): lookup, sums by id, row-wise Adam.

Row-wise (lazy) Adam (``embedding_optimizer='lazy_adam'``) is checked

against float64 numpy references over several steps with repeated ids: the optimizer alone,
and the whole train step (per-task gradients by autodiff of the dense table, Algorithm 1 on
the rows of the batch, L2, then Adam on those rows only). Rows not in a batch keep their
values, moments and counts bit for bit. The step's XLA scratch memory does not grow with
the vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htl_jax import embedding
from htl_jax.optim import row_adam as row_adam_lib
from htl_jax.configs.base import get_base_config
from htl_jax.errors import ConfigError
from htl_jax.spec import HybridSpec
from htl_jax.losses import CoreTransform
from htl_jax.train import parallel
from htl_jax.train import step as step_lib
from htl_jax.train.checks import check_config
from htl_jax.train.state import init_state, make_setup
from conftest import row_adam_state
from test_transforms import ref_algorithm1

# One step of any setup, data-parallel (the setup static), no donation.
STEP = parallel.pmap_program(step_lib.train_step, static=(0,))

LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8
SPEC = HybridSpec(('user', 'item'), (40, 30), ('click', 'long_view'), 'watch_time')
B = 16


def ref_row_adam(table, mu, nu, count, grads: dict[int, np.ndarray], lr=LR):
  """Float64 Adam on the rows in ``grads`` (id -> summed gradient), per-row step counts."""
  table, mu, nu, count = (np.array(a, np.float64 if a.dtype.kind == 'f' else a.dtype)
                          for a in (table, mu, nu, count))
  for i, g in grads.items():
    mu[i] = B1 * mu[i] + (1 - B1) * g
    nu[i] = B2 * nu[i] + (1 - B2) * g * g
    count[i] += 1
    mu_hat = mu[i] / (1 - B1 ** count[i])
    nu_hat = nu[i] / (1 - B2 ** count[i])
    table[i] = table[i] - lr * mu_hat / (np.sqrt(nu_hat) + EPS)
  return table, mu, nu, count


def _sum_by_id(ids: np.ndarray, row_grads: np.ndarray) -> dict[int, np.ndarray]:
  out: dict[int, np.ndarray] = {}
  for i, g in zip(ids.reshape(-1), row_grads.reshape(len(ids.reshape(-1)), -1)):
    out[int(i)] = out.get(int(i), 0.0) + np.asarray(g, np.float64)
  return out


def _assert_rows(actual, expected, touched, previous):
  """Touched rows match the reference; every other row is bit-identical to before."""
  actual, expected, previous = map(np.asarray, (actual, expected, previous))
  rows = sorted(touched)
  np.testing.assert_allclose(actual[rows], expected[rows], rtol=2e-5, atol=1e-7)
  untouched = np.setdiff1d(np.arange(actual.shape[0]), rows)
  np.testing.assert_array_equal(actual[untouched], previous[untouched])


def test_row_adam_matches_float64_reference_over_steps():
  """Ids repeat within a step and across steps; rows outside a step are not touched."""
  rng = np.random.default_rng(0)
  vocab, dim, n = 50, 3, 24
  row_adam = row_adam_lib.row_adam(LR)
  table = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
  state = row_adam.init(table)
  scratch = embedding.new_id_scratch(vocab)

  @jax.jit
  def update(table, state, grads):
    updates, state = row_adam.update(grads, state)
    return row_adam_lib.apply_row_updates(table, updates), state

  for step in range(5):
    ids = rng.integers(0, 12 if step < 3 else vocab, n).astype(np.int32)
    row_grads = rng.normal(size=(n, dim)).astype(np.float32)
    first, scratch = embedding.first_occurrence_in(jnp.asarray(ids), scratch)
    summed = embedding.sum_rows_by_id(jnp.asarray(ids), (jnp.asarray(row_grads),), vocab,
                                      first=first).grads[0]
    grads = row_adam_lib.RowSums(jnp.asarray(ids), summed, first)
    new_table, new_state = update(table, state, grads)
    by_id = _sum_by_id(ids, row_grads)
    assert len(by_id) < n                                    # ids repeat
    expected = ref_row_adam(table, *state, by_id)
    for actual, ref, before in zip((new_table, *new_state), expected, (table, *state)):
      _assert_rows(actual, ref, by_id, before)
    table, state = new_table, new_state
  np.testing.assert_array_equal(scratch, embedding.new_id_scratch(vocab))


def test_first_step_count_gives_a_step_of_lr_for_a_late_row():
  """Per-row bias correction: a row first seen late moves by ``lr`` per coordinate."""
  row_adam = row_adam_lib.row_adam(LR)
  table = jnp.zeros((4, 2))
  state = row_adam.init(table)._replace(count=jnp.array([0, 9999, 0, 0], jnp.int32))
  grads = row_adam_lib.RowSums(jnp.array([2, 2], jnp.int32), jnp.array([[3.0, -0.5],
                                                                        [0.0, 0.0]]),
                               jnp.array([0, 0], jnp.int32))
  updates, state = row_adam.update(grads, state)
  table = row_adam_lib.apply_row_updates(table, updates)
  np.testing.assert_allclose(table[2], [-LR, LR], rtol=1e-5)
  np.testing.assert_array_equal(state.count, [0, 9999, 1, 0])
  np.testing.assert_array_equal(np.asarray(table)[[0, 1, 3]], 0.0)


# ----------------------------------------------------------------------------- train step


def _config(model: str, grad_process: str, optimizer: str = 'lazy_adam'):
  config = get_base_config()
  config.hidden_dims, config.embed_dim, config.fusion_dim, config.label_embed_dim = (
      (16, 8), 3, 4, 3)
  config.num_experts = 2
  config.model, config.grad_process, config.embedding_optimizer = model, grad_process, optimizer
  config.learning_rate, config.l2 = LR, 1e-2        # an L2 term large enough to matter
  return config


def _batch(seed: int) -> dict[str, np.ndarray]:
  """Ids drawn from a few values, so they repeat; most of the table stays untouched."""
  rng = np.random.default_rng(seed)
  click = rng.random(B) < 0.6
  long_view = click & (rng.random(B) < 0.5)
  x = np.stack([rng.integers(0, 6, B) + 6 * (seed % 3), rng.integers(0, 4, B)], 1)
  return {'x': x.astype(np.int32), 'y': np.stack([click, long_view], 1).astype(np.float32),
          'core': (30.0 + 20.0 * long_view + rng.random(B)).astype(np.float32),
          'index': np.arange(B, dtype=np.int32), 'weight': np.ones(B, np.float32)}


def _task_table_grads_fn(setup):
  """Reference per-task gradients of the dense table ``[K, M, d]``, by autodiff (jitted)."""
  @jax.jit
  def task_grads(state, batch):
    ids, _ = embedding.lookup(state.params['embedding']['table'], setup.layout, batch['x'])
    key = jax.random.fold_in(state.rng, state.step)

    def losses(table):
      out = setup.model.apply({'params': state.params['model']},
                              (table[ids],) * setup.spec.num_tasks, train=True,
                              tau=state.tau, example_index=batch['index'],
                              rngs={'gumbel': key})
      return jnp.stack(setup.objective.loss_terms(out, batch))

    return jax.jacrev(losses)(state.params['embedding']['table'])

  return task_grads


def _reference_step(setup, config, task_grads_fn, state, batch):
  """Float64: per-id task gradients -> Algorithm 1 (or the sum) -> + L2 -> row Adam."""
  ids = np.asarray(batch['x']) + np.asarray(setup.layout.offsets)
  touched = sorted(set(ids.reshape(-1).tolist()))
  task_grads = np.asarray(task_grads_fn(state, batch), np.float64)[:, touched]  # [K, R, d]
  k, r, d = task_grads.shape
  if setup.grad_process == 'none':
    combined = task_grads.sum(0)
  else:
    combined = ref_algorithm1(task_grads.reshape(k, r * d), k - 1, config.gamma,
                              config.clip, alpha=config.alpha).reshape(r, d)
  table = np.asarray(state.params['embedding']['table'], np.float64)
  counts = np.array([np.sum(ids == i) for i in touched])
  combined = combined + 2 * config.l2 / B * counts[:, None] * table[touched]
  return touched, ref_row_adam(table, *row_adam_state(state),
                               dict(zip(touched, combined)))


@pytest.mark.parametrize('model,grad_process', [('htlnet', 'htl'), ('shared_bottom', 'none')])
def test_lazy_step_matches_float64_reference(model, grad_process):
  """Several steps; the gradient process (HTLNet) or the summed gradient (Shared-Bottom)."""
  config = _config(model, grad_process)
  setup = make_setup(config, SPEC, CoreTransform('none'))
  state = init_state(setup, config)
  step = jax.pmap(functools.partial(step_lib.train_step, setup), axis_name='batch')
  task_grads_fn = _task_table_grads_fn(setup)
  diagnostics = np.array([True])
  for i in range(3):
    batch = _batch(i)
    touched, expected = _reference_step(setup, config, task_grads_fn, state, batch)
    new, metrics = jax.tree.map(lambda v: v[0], step(
        jax.tree.map(lambda v: v[None], state), jax.tree.map(lambda v: v[None], batch),
        diagnostics))
    before = (state.params['embedding']['table'], *row_adam_state(state))
    after = (new.params['embedding']['table'], *row_adam_state(new))
    for actual, ref, prev in zip(after, expected, before):
      _assert_rows(actual, ref, touched, prev)
    np.testing.assert_array_equal(new.id_scratch, embedding.new_id_scratch(setup.layout.rows))
    assert np.isfinite(metrics['update_norm']) and metrics['diagnostics'].norm[-1] > 0
    state = new


def test_first_lazy_step_equals_dense_adam():
  """From zero moments, Adam leaves rows without gradient alone: one step is the same.

  MMoE with MetaBalance: the general path, with shared dense layers in ``theta_s``.
  """
  model, grad_process = 'mmoe', 'metabalance'
  results = {}
  for optimizer in ('adam', 'lazy_adam'):
    config = _config(model, grad_process, optimizer)
    setup = make_setup(config, SPEC, CoreTransform('none'))
    state = parallel.replicate(init_state(setup, config))
    state, metrics = STEP(setup, state, parallel.shard(_batch(0)),
                          parallel.replicate(np.bool_(True)))
    results[optimizer] = parallel.unreplicate((state.params, metrics))
  (dense, dense_m), (lazy, lazy_m) = results['adam'], results['lazy_adam']
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(lazy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  for key in ('update_norm', 'loss'):
    np.testing.assert_allclose(dense_m[key], lazy_m[key], rtol=1e-5)
  for name in ('norm', 'cos_core'):
    np.testing.assert_allclose(getattr(dense_m['diagnostics'], name),
                               getattr(lazy_m['diagnostics'], name), rtol=1e-5)


def test_model_parameters_keep_dense_adam():
  """The non-embedding parameters get optax.adam with the same learning rate."""
  config = _config('shared_bottom', 'none')
  setup = make_setup(config, SPEC, CoreTransform('none'))
  state = init_state(setup, config)
  assert setup.sparse_table
  dense_state = state.opt_state.inner_state[1].inner_states['dense'].inner_state
  expected = optax.adam(LR).init(state.params['model'])
  assert ([x.shape for x in jax.tree.leaves(dense_state)]
          == [x.shape for x in jax.tree.leaves(expected)])


def test_unknown_embedding_optimizer_is_rejected():
  with pytest.raises(ConfigError, match="embedding_optimizer='sgd'"):
    check_config(_config('htlnet', 'htl', 'sgd'))
  with pytest.raises(ConfigError, match='embedding_optimizer'):
    make_setup(_config('htlnet', 'htl', 'sgd'), SPEC, CoreTransform('none'))


# ----------------------------------------------------------------------------- no O(vocab)


def _temp_bytes(model: str, grad_process: str, optimizer: str, vocab: int) -> int:
  """XLA's scratch bytes of the compiled (pmapped) train step at a ``vocab``-row table."""
  spec = HybridSpec(('user', 'item'), (vocab - 30, 30), ('click', 'long_view'),
                    'watch_time')
  config = _config(model, grad_process, optimizer)
  setup = make_setup(config, spec, CoreTransform('none'))
  state = parallel.replicate(init_state(setup, config))
  compiled = STEP.lower(setup, state, parallel.shard(_batch(0)),
                        parallel.replicate(np.bool_(False))).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('model,grad_process', [('htlnet', 'htl'), ('shared_bottom', 'none')])
def test_lazy_step_scratch_memory_is_vocabulary_independent(model, grad_process):
  """No temporary of the step grows with the table: not the per-id sums, the gradient
  process, the optimizer, the L2 term or the diagnostics branch (compiled in the same
  program), and no dense ``[vocab, d]`` gradient."""
  small = _temp_bytes(model, grad_process, 'lazy_adam', 100_000)
  large = _temp_bytes(model, grad_process, 'lazy_adam', 1_000_000)
  assert small == large
  assert small < 1_000_000          # far below one int32 per row of the small table


def test_dense_adam_scratch_memory_grows_with_the_vocabulary():
  """The measurement sees O(vocab) temporaries: dense Adam's table gradient."""
  small = _temp_bytes('shared_bottom', 'none', 'adam', 100_000)
  large = _temp_bytes('shared_bottom', 'none', 'adam', 1_000_000)
  assert large - small >= 900_000 * 3 * 4       # at least one [vocab, d] float32 array
