"""Tests of every registered model (and the HTLNet ablations) against the model interface.

Each case compiles ONE function: 30 Adam steps on a fixed batch in a ``lax.scan`` whose
step takes the per-task Jacobian (the isolation check) and sums it into the update, then an
eval-mode forward pass on fresh inputs. The test functions read the cached results. The loss
is written inline: BCE per binary task plus MSE on ``log1p(core)`` (ZILN for that head), and
the embedding is a plain learned ``[B, F, d]`` array.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htl_jax import losses
from htl_jax.spec import HybridSpec
from conftest import model_config
from htl_jax.models import MODELS, ModelOutput
from htl_jax.models.adatt import AdaTT

BATCH, FIELDS, DIM = 64, 4, 4
STEPS = 30
SPEC = HybridSpec(fields=tuple(f'f{i}' for i in range(FIELDS)), vocab_sizes=(5,) * FIELDS,
                  binary_tasks=('click', 'convert'), core_task='revenue')
TINY = model_config(hidden_dims=(16, 8), num_experts=2, fusion_dim=8, label_embed_dim=4)
HTLNET_ABLATIONS = {
    'no_label_embedding': {'use_label_embedding': False},
    'no_representation': {'use_representation': False},
    'concat_fusion': {'fusion': 'concat'},
    'no_stop_gradient': {'stop_gradient': False},
    'no_gumbel_noise': {'gumbel_noise': False},
    'ziln_head': {'head': 'ziln'},
}
BASELINES = ('dnn', 'shared_bottom', 'mmoe', 'ple', 'adatt', 'esmm', 'aitm', 'tafe', 'ziln')
# Models whose theta_s includes shared layers (docs/design.md), by registry name.
WITH_SHARED_LAYERS = ('shared_bottom', 'mmoe', 'ple', 'adatt')
MONOTONE = ('esmm', 'tafe')


def _cases() -> dict[str, tuple[str, Callable[[], nn.Module]]]:
  """Case id -> (registry name, model factory)."""
  cases = {name: (name, functools.partial(MODELS[name], spec=SPEC, cfg=TINY))
           for name in MODELS}
  ziln = dataclasses.replace(TINY, head='ziln')
  cases['ziln'] = ('ziln', functools.partial(MODELS['ziln'], spec=SPEC, cfg=ziln))
  for suffix, change in HTLNET_ABLATIONS.items():
    cfg = dataclasses.replace(TINY, **change)
    cases[f'htlnet-{suffix}'] = ('htlnet', functools.partial(MODELS['htlnet'], spec=SPEC,
                                                             cfg=cfg))
  # PLE and AdaTT stack one level per ``shared_dims`` entry: PLE and AdaTT's general variant
  # (with shared experts) are tested with two levels, AdaTT-sp with one.
  two_levels = dataclasses.replace(TINY, hidden_dims=(16, 8, 8))
  cases['ple'] = ('ple', functools.partial(MODELS['ple'], spec=SPEC, cfg=two_levels))
  cases['adatt-general'] = (
      'adatt', lambda: AdaTT(spec=SPEC, cfg=two_levels, num_shared_experts=2))
  return cases


CASES = _cases()


def _batch() -> tuple[np.ndarray, np.ndarray]:
  """Nested binary labels ``y2 <= y1`` and a lognormal-ish core that is 0 unless ``y2``."""
  rng = np.random.default_rng(0)
  click = rng.random(BATCH) < 0.5
  convert = click & (rng.random(BATCH) < 0.5)
  y = np.stack([click, convert], axis=1).astype(np.float32)
  core = (convert * np.exp(rng.normal(1.0, 0.5, BATCH))).astype(np.float32)
  return y, core


def _task_losses(out: ModelOutput, y: jax.Array, core: jax.Array, head: str) -> jax.Array:
  """Per-task losses ``[T + 1]``: BCE of each binary task, then the core loss."""
  probs = jnp.clip(out.probs, 1e-7, 1.0 - 1e-7)
  bce = -jnp.mean(y * jnp.log(probs) + (1.0 - y) * jnp.log1p(-probs), axis=0)
  if head == 'ziln':
    core_loss = losses.ziln_loss(out.core, core)
  else:
    core_loss = jnp.mean(jnp.square(out.core[:, 0] - jnp.log1p(core)))
  return jnp.concatenate([bce, core_loss[None]])


# Cheap XLA CPU compilation: these graphs are tiny, compile time dominates the test.
FAST_COMPILE = {
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
    'xla_cpu_use_fusion_emitters': False,
}


def _glorot_params(model: nn.Module, embs: tuple[jax.Array, ...], index: jax.Array):
  """Parameters of ``model`` drawn with numpy on the tree of ``model.init`` (traced only).

  Tracing ``init`` with ``jax.eval_shape`` checks that it runs; drawing the values outside
  the compiled function keeps every parameter's RNG out of the XLA program, which on CPU
  costs about as much compile time as the model itself. Kernels (and any parameter with two
  or more axes) get Glorot-uniform values over their last two axes, vectors zeros.
  """
  keys = {'params': jax.random.key(0), 'gumbel': jax.random.key(1)}
  shapes = jax.eval_shape(functools.partial(model.init, train=True, tau=1.0,
                                            example_index=index), keys, embs)['params']
  rng = np.random.default_rng(1)

  def draw(leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    if len(leaf.shape) < 2:
      return np.zeros(leaf.shape, leaf.dtype)
    limit = np.sqrt(6.0 / (leaf.shape[-2] + leaf.shape[-1]))
    return rng.uniform(-limit, limit, leaf.shape).astype(leaf.dtype)

  return jax.tree.map(draw, shapes)


@functools.lru_cache(maxsize=None)
def _run(case: str) -> dict[str, np.ndarray | bool]:
  """Everything the tests check for one case, from a single compiled function.

  ``train_losses[s]`` and ``train_out[s]`` are the loss and outputs (train mode) of the
  parameters after ``s`` Adam steps, ``s = 0..STEPS``; ``probe`` is the trained
  model's eval-mode output on fresh random embeddings; ``isolation[s, t, u]`` is
  ``max |d loss_t / d embs[u]|`` at step ``s`` with K distinct copies of the embedding (the
  training gradient is the sum of this per-task Jacobian, so the check comes for free).
  """
  model = CASES[case][1]()
  head = model.cfg.head
  num_tasks = SPEC.num_tasks
  index = jnp.arange(BATCH, dtype=jnp.int32)
  y, core = (jnp.asarray(a) for a in _batch())
  rng = np.random.default_rng(2)
  # A model with independent tasks reads its own table's copy of every field: K*F fields.
  fields = FIELDS * (num_tasks if model.independent_tasks else 1)
  emb, probe = (rng.normal(size=(BATCH, fields, DIM)).astype(np.float32) for _ in range(2))
  tx = optax.adam(1e-2)

  def apply(params, embs, key, train):
    return model.apply({'params': params}, embs, train=train, tau=1.0,
                       example_index=index, rngs={'gumbel': key})

  def task_losses(model_params, embs, key):
    """Per-task losses ``[K]`` in train mode; auxiliary output ``(losses, outputs)``."""
    out = apply(model_params, embs, key, True)
    per_task = _task_losses(out, y, core, head)
    return per_task, (per_task, out)

  def step(carry, key):
    """One Adam step on the summed loss; the per-task Jacobian gives the isolation check."""
    params, opt_state = carry
    copies = (params['emb'],) * num_tasks  # K distinct arguments: one per tower's read.
    (jac_model, jac_copies), (per_task, out) = jax.jacrev(
        task_losses, argnums=(0, 1), has_aux=True)(params['model'], copies, key)
    grads = {'model': jax.tree.map(lambda g: jnp.sum(g, axis=0), jac_model),
             'emb': sum(jnp.sum(g, axis=0) for g in jac_copies)}
    isolation = jnp.stack([jnp.max(jnp.abs(g), axis=(1, 2, 3)) for g in jac_copies], axis=1)
    # Per shared module: [K] largest |d loss_k / d param| over its parameters.
    reach = {name: jnp.max(jnp.stack([jnp.max(jnp.abs(g), axis=tuple(range(1, g.ndim)))
                                      for g in jax.tree.leaves(jac_model[name])]), axis=0)
             for name in shared_names}
    updates, opt_state = tx.update(grads, opt_state, params)
    new_carry = (optax.apply_updates(params, updates), opt_state)
    return new_carry, (jnp.sum(per_task), out, isolation, reach)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def everything(params, step_keys, probe):
    (trained, _), (train_losses, train_out, isolation, reach) = jax.lax.scan(
        step, (params, tx.init(params)), step_keys)
    return {
        'train_losses': train_losses,
        'train_out': train_out,
        'isolation': isolation,
        'shared_reach': reach,
        'probe': apply(trained['model'], (probe,) * num_tasks, step_keys[0], False),
    }

  params = {'model': _glorot_params(model, (emb,) * num_tasks, index), 'emb': emb}
  shared_names = [name for name in params['model']
                  if any(fnmatch.fnmatchcase(name, p) for p in model.shared)]
  step_keys = jax.random.split(jax.random.key(0), STEPS + 1)
  results = jax.device_get(everything(params, step_keys, probe))
  results['isolated_towers'] = model.isolated_towers
  results['shared_names'] = shared_names
  results['core_out_dim'] = model.cfg.core_out_dim
  return results


def test_registry_and_isolation_claims():
  assert set(BASELINES) | {'htlnet'} <= set(MODELS)
  for case, (_, factory) in CASES.items():
    expected = case == 'dnn' or (case.startswith('htlnet') and case != 'htlnet-no_stop_gradient')
    assert factory().isolated_towers == expected, case


@pytest.mark.parametrize('case', CASES)
def test_declared_shared_parameters_reach_every_task(case):
  """theta_s's shared layers (each model's ``shared`` patterns) get every task's gradient."""
  results = _run(case)
  name = CASES[case][0]
  assert bool(results['shared_names']) == (name in WITH_SHARED_LAYERS), case
  for module in results['shared_names']:
    reach = results['shared_reach'][module][0]
    assert reach.shape == (SPEC.num_tasks,)
    assert np.all(reach > 0.0), (case, module, reach)


@pytest.mark.parametrize('case', CASES)
def test_output_shapes_and_ranges(case):
  results = _run(case)
  outputs = {'probe': results['probe'], 'train_out': results['train_out']}
  for key, out in outputs.items():
    assert isinstance(out, ModelOutput), key
    lead = out.probs.shape[:-2]  # (STEPS + 1,) for the stacked training outputs.
    assert out.probs.shape == lead + (BATCH, SPEC.num_binary), key
    assert out.core.shape == lead + (BATCH, results['core_out_dim']), key
    assert out.probs.dtype == np.float32 and out.core.dtype == np.float32, key
    assert np.all(np.isfinite(out.core)), key
    assert np.all((out.probs >= 0.0) & (out.probs <= 1.0)), key


@pytest.mark.parametrize('case', CASES)
def test_loss_decreases_on_fixed_batch(case):
  losses_per_step = _run(case)['train_losses']
  assert losses_per_step.shape == (STEPS + 1,)
  assert np.all(np.isfinite(losses_per_step))
  before, after = float(losses_per_step[0]), float(losses_per_step[-1])
  assert after < before - 0.2 * abs(before), (before, after)


@pytest.mark.parametrize('case', CASES)
def test_isolated_towers_claim_matches_gradients(case):
  results = _run(case)
  grads = results['isolation']
  assert grads.shape == (STEPS + 1, SPEC.num_tasks, SPEC.num_tasks)
  off_diagonal = grads[:, ~np.eye(SPEC.num_tasks, dtype=bool)]
  if results['isolated_towers']:
    assert np.all(off_diagonal == 0.0), grads[0]
    assert np.all(np.diag(grads[0]) > 0.0), grads[0]
  else:
    # Shared modules (or HTLNet without Eq. 15) carry later tasks' gradients to other
    # copies: such a model must not claim isolation.
    assert np.any(off_diagonal[0] > 0.0), grads[0]


@pytest.mark.parametrize('name', MONOTONE)
def test_chain_probabilities_are_monotone(name):
  results = _run(name)
  for key in ('probe', 'train_out'):
    probs = results[key].probs
    assert np.all(np.diff(probs, axis=-1) <= 0.0), key
