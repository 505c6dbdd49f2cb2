"""Shared fixtures: one tiny config and one data cache for the whole session.

JAX compiles dominate the suite's time, so tests share configs (runs with equal
step-shaping fields reuse compiled steps, see ``htl_jax.train.state.make_setup``).
"""

from __future__ import annotations

import os
import tempfile

import pytest

from htl_jax.configs import kuairand
from htl_jax.configs.base import get_base_config
from htl_jax.models import ModelConfig
from htl_jax.runtime import compilation_cache

# The ``postgres_url`` fixture (a real PostgreSQL server), for every test module.
pytest_plugins = ('postgres_server',)

# One persistent compilation cache for the whole suite (every xdist worker and every command
# a test starts): a program compiled by one test is loaded by the others.
os.environ.setdefault(compilation_cache.ENV,
                      os.path.join(tempfile.gettempdir(), 'htl_jax_tests_xla_cache'))
compilation_cache.enable()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real data beside the clone (tests that need it skip without it; users never see this path).
SHARED_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data')
HILLSTROM = os.path.join(SHARED_DATA, 'hillstrom.csv')

# A seconds-long HTLNet run on the embedded KuaiRand sample. The same overrides are given
# on the command line by the subprocess tests, so their runs match the in-process ones.
TINY_OVERRIDES = {
    'max_steps': 8, 'eval_every': 4, 'checkpoint_every': 4, 'log_every': 4,
    'batch_size': 128, 'eval_batch_size': 512, 'hidden_dims': (16, 8), 'fusion_dim': 8,
    'label_embed_dim': 4, 'embed_dim': 4, 'tau_decay_steps': 3, 'patience': 5,
}
TINY_ARG = 'smoke=True,data.max_rows=2000'


def tiny_config(cache_dir: str, **overrides):
  config = kuairand.get_config(TINY_ARG)
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    config[key] = value
  config.cache_dir = cache_dir
  return config


def model_config(**overrides) -> ModelConfig:
  """The model fields of ``configs/base.py``'s defaults with ``overrides``."""
  config = get_base_config()
  for key, value in overrides.items():
    config[key] = value
  return ModelConfig.from_config(config)


def cli_overrides(cache_dir: str) -> list[str]:
  """``TINY_OVERRIDES`` as ``--config.NAME=VALUE`` flags."""
  flags = []
  for key, value in TINY_OVERRIDES.items():
    text = ','.join(map(str, value)) if isinstance(value, tuple) else str(value)
    flags.append(f'--config.{key}={text}' if not isinstance(value, tuple)
                 else f'--config.{key}=({text})')
  return flags + [f'--config.cache_dir={cache_dir}']


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('htl_cache'))


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, cache_dir) -> str:
  """The workdir of one finished tiny KuaiRand run, shared by the predict and export tests."""
  from htl_jax.train.loop import train_and_evaluate  # here: only these tests need jax
  workdir = str(tmp_path_factory.mktemp('trained_run'))
  train_and_evaluate(tiny_config(cache_dir), workdir)
  return workdir


def row_adam_state(state):
  """The table's row-wise Adam state inside a train state's optax chain (lazy_adam runs):
  inject_hyperparams -> the chain's Adam -> partition 'rows' -> the table's."""
  rows = state.opt_state.inner_state[1].inner_states['rows'].inner_state
  return rows['embedding']['table']


def trainer_gradient(setup, state, batch):
  """The gradient the trainer's Adam gets for one batch (one device): the per-task gradients
  (``gradient_path.compute``) through the chain's gradient steps with the state's values."""
  import jax  # pylint: disable=g-import-not-at-top
  from htl_jax.train import gradient_path  # pylint: disable=g-import-not-at-top
  from htl_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top

  def one(state, batch):
    grads = gradient_path.compute(setup, state, batch)
    values = state.opt_state.hyperparams
    steps = optimizer_lib.gradient_steps(setup.chain_shape, values)
    combined, _ = steps.update(grads.stacked, state.opt_state.inner_state[0], state.params,
                               table_batch=grads.table_batch)
    return combined

  out = jax.pmap(one, axis_name='batch')(*jax.tree.map(lambda v: v[None], (state, batch)))
  return jax.tree.map(lambda v: v[0], out)


def snapshot(root) -> dict[str, bytes]:
  """Every file's bytes and every folder (as ``b'<dir>'``) under ``root``: what a refused
  command must leave as it was."""
  found = {}
  for folder, folders, files in os.walk(root):
    for name in folders:
      found[os.path.relpath(os.path.join(folder, name), root)] = b'<dir>'
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, root)] = f.read()
  return found
