"""How a config becomes a train setup: the paper's protocol per model (docs/design.md).

Gradient process defaults ('htl' for HTLNet only), one learning rate (``alpha`` is never a
step size), DNN's independent tables, the core head's initial bias, and the one-line config
errors for settings a model cannot take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htl_jax.configs.base import get_base_config
from htl_jax.spec import HybridSpec
from htl_jax.losses import CoreTransform
from htl_jax.errors import ConfigError
from htl_jax.train.checks import check_config
from htl_jax.train import gradient_path
from htl_jax.train import optimizer as optimizer_lib
from htl_jax.train import step as step_lib
from conftest import trainer_gradient
from htl_jax.train.state import init_state, make_setup, resolve_grad_process

SPEC = HybridSpec(('user', 'item'), (7, 5), ('click', 'long_view'), 'watch_time')
B = 16


def _config(**overrides):
  config = get_base_config()
  config.hidden_dims, config.embed_dim, config.fusion_dim, config.label_embed_dim = (8, 4), 3, 4, 3
  config.num_experts = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  click = rng.random(B) < 0.6
  long_view = click & (rng.random(B) < 0.5)
  return {'x': jnp.asarray(np.stack([rng.integers(0, 7, B), rng.integers(0, 5, B)], 1),
                           jnp.int32),
          'y': jnp.asarray(np.stack([click, long_view], 1), jnp.float32),
          'core': jnp.asarray(30.0 + 20.0 * long_view + rng.random(B), jnp.float32),
          'index': jnp.arange(B, dtype=jnp.int32), 'weight': jnp.ones(B)}


def _gradients(config, core=CoreTransform('none')):
  setup = make_setup(config, SPEC, core)
  state = init_state(setup, config)
  return setup, state, trainer_gradient(setup, state, _batch())


@pytest.mark.parametrize('model,expected', [
    ('htlnet', 'htl'), ('shared_bottom', 'none'), ('mmoe', 'none'), ('dnn', 'none'),
    ('esmm', 'none'), ('aitm', 'none'), ('tafe', 'none'), ('ple', 'none'), ('adatt', 'none')])
def test_gradient_process_defaults_per_model(model, expected):
  config = _config(model=model)
  assert config.grad_process == 'auto'
  assert resolve_grad_process(config) == expected
  setup = make_setup(config, SPEC, CoreTransform('none'))
  state = init_state(setup, config)
  assert setup.grad_process == expected
  process = optimizer_lib.process_state(state.opt_state)
  assert (process == optax.EmptyState()) == (expected == 'none')


def test_shared_bottom_trains_without_a_process_unless_asked():
  """The baseline's gradient is the plain summed gradient; 'htl' changes the shared part."""
  setup, state, plain = _gradients(_config(model='shared_bottom'))
  assert setup.grad_process == 'none'
  assert optimizer_lib.process_state(state.opt_state) == optax.EmptyState()
  _, _, balanced = _gradients(_config(model='shared_bottom', grad_process='htl'))
  # The towers are not in theta_s: same gradient; the bottom and the table are.
  np.testing.assert_allclose(plain['model']['tower_0']['out']['kernel'],
                             balanced['model']['tower_0']['out']['kernel'], rtol=1e-6)
  assert not np.allclose(plain['model']['bottom']['dense_0']['kernel'],
                         balanced['model']['bottom']['dense_0']['kernel'], rtol=1e-4)


@pytest.mark.parametrize('model,process', [('htlnet', 'none'), ('shared_bottom', 'none'),
                                           ('htlnet', 'htl')])
def test_alpha_is_never_a_learning_rate(model, process):
  """One Adam for every parameter; alpha only enters Eq. 16 (nothing without a process)."""
  config = _config(model=model, grad_process=process, learning_rate=0.01)
  setup = make_setup(config, SPEC, CoreTransform('none'))
  adam = optax.adam(0.01)
  state = init_state(setup, config)
  params = state.params
  assert (jax.tree.structure(state.opt_state.inner_state[1])      # the chain's Adam
          == jax.tree.structure(adam.init(params)))
  assert float(state.opt_state.hyperparams['learning_rate']) == pytest.approx(0.01)
  steps = {}
  for alpha in (1e-6, 1.0):
    config.alpha = alpha
    setup = make_setup(config, SPEC, CoreTransform('none'))
    state = init_state(setup, config)
    new_state, _ = jax.pmap(lambda s, b: step_lib.train_step(setup, s, b), axis_name='batch')(
        *jax.tree.map(lambda v: v[None], (state, _batch())))
    steps[alpha] = jax.tree.map(lambda v: v[0], new_state.params)
    # Adam's first step moves every parameter with a gradient by about lr, whatever alpha.
    moved = np.abs(np.asarray(steps[alpha]['embedding']['table'])
                   - np.asarray(state.params['embedding']['table'])).max()
    assert moved == pytest.approx(0.01, rel=1e-3)
  if process == 'none':    # alpha reaches nothing at all
    for a, b in zip(jax.tree.leaves(steps[1e-6]), jax.tree.leaves(steps[1.0])):
      np.testing.assert_array_equal(a, b)


def test_dnn_has_one_table_per_task_and_shares_nothing():
  config = _config(model='dnn')
  setup, state, grads = _gradients(config)
  vocab = SPEC.total_vocab
  assert setup.layout.copies == SPEC.num_tasks
  assert state.params['embedding']['table'].shape == (SPEC.num_tasks * vocab, 3)
  # Task t's loss reaches only rows [t * vocab, (t + 1) * vocab) of the table.
  batch = _batch()
  ids, rows = gradient_path.lookup(setup, state.params, batch)
  assert ids.shape == (B, SPEC.num_tasks * SPEC.num_fields)

  def task_losses(table):
    out = setup.model.apply({'params': state.params['model']},
                            (table[ids],) * SPEC.num_tasks, train=True, tau=state.tau,
                            example_index=batch['index'])
    return jnp.stack(setup.objective.loss_terms(out, batch))

  jacobian = np.asarray(jax.jacrev(task_losses)(state.params['embedding']['table']))
  for t in range(SPEC.num_tasks):
    block = np.zeros(SPEC.num_tasks, bool)
    block[t] = True
    per_row = np.abs(jacobian[t]).reshape(SPEC.num_tasks, vocab, -1).max(axis=(1, 2))
    assert np.all(per_row[~block] == 0) and per_row[t] > 0, (t, per_row)
  assert np.any(np.asarray(grads['embedding']['table']) != 0)


@pytest.mark.parametrize('bad,match', [
    ({'model': 'dnn', 'grad_process': 'htl'}, 'share no parameters'),
    ({'model': 'ziln', 'head': 'mse'}, "needs head='ziln'"),
    ({'model': 'mmoe', 'hidden_dims': (32,)}, 'at least 2 hidden_dims'),
    ({'alpha': 1.5}, r'config\.alpha=1\.5 is out of range: it may be float in \[0, 1\]'),
])
def test_impossible_model_settings_are_config_errors(bad, match):
  with pytest.raises(ConfigError, match=match):
    check_config(_config(**bad))


@pytest.mark.parametrize('model', ['htlnet', 'shared_bottom', 'dnn', 'aitm', 'mmoe'])
@pytest.mark.parametrize('kind', ['none', 'log1p'])
def test_core_head_starts_at_the_training_mean(model, kind):
  """With a raw-scale target (mean ~40 here), the initial prediction is already the mean."""
  core_train = np.asarray(_batch()['core'])
  transform = CoreTransform.fit(kind, core_train)
  expected = np.mean(core_train if kind == 'none' else np.log1p(core_train))
  assert transform.target_mean == pytest.approx(expected)
  config = _config(model=model, core_transform=kind)
  setup = make_setup(config, SPEC, transform)
  state = init_state(setup, config)
  batch = _batch(1)
  _, rows = gradient_path.lookup(setup, state.params, batch)
  out = setup.model.apply({'params': state.params['model']}, (rows,) * SPEC.num_tasks,
                          train=False, tau=state.tau, example_index=batch['index'])
  # Within 0.5 of a mean of ~3.5 (log1p) or ~34 (raw): the towers' initial output is small
  # next to the mean (with a zero bias every prediction would be the whole mean off).
  np.testing.assert_allclose(out.core[:, 0], expected, atol=0.5)
