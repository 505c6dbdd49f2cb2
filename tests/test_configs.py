"""Tests for the config files and their shared ``key=value`` argument parser."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os

import ml_collections
import pytest

from htl_jax import configs
from htl_jax.configs import hillstrom, overrides
from htl_jax.configs.base import get_base_config
from htl_jax.data import DATASETS
from htl_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = configs.BUILTIN


def test_apply_args_converts_to_the_field_type():
  config = overrides.apply_args(
      get_base_config(),
      'batch_size=64,learning_rate=1,use_label_embedding=false,model=mmoe,'
      'hidden_dims=(32,16,8),data.max_rows=100,data.tasks=a,b,alpha=0.5,gamma=2.5e-1')
  assert config.batch_size == 64 and isinstance(config.batch_size, int)
  assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
  assert config.use_label_embedding is False
  assert config.model == 'mmoe'
  assert config.hidden_dims == (32, 16, 8)
  assert config.alpha == 0.5
  assert config.data.max_rows == 100
  assert config.data.tasks == 'a,b'
  assert config.gamma == 0.25


@pytest.mark.parametrize('arg', [None, ''])
def test_apply_args_without_arguments_changes_nothing(arg):
  assert overrides.apply_args(get_base_config(), arg) == get_base_config()


def test_unknown_keys_are_all_listed():
  with pytest.raises(ValueError) as error:
    overrides.apply_args(get_base_config(), 'bogus=1,model=mmoe,data.nope=2,data=3')
  message = str(error.value)
  # 'data' is a block, not a field; 'model' is a known field.
  assert 'unknown config key(s) bogus, data.nope, data in' in message


@pytest.mark.parametrize('arg', ['batch_size=abc', 'use_label_embedding=maybe',
                                 'learning_rate=fast', 'hidden_dims=(16,x)', 'smoke=perhaps',
                                 'no_equals_sign', '=3'])
def test_bad_values_raise(arg):
  with pytest.raises(ValueError):
    overrides.apply_args(get_base_config(), arg)


def test_smoke_shrinks_and_explicit_keys_win():
  config = overrides.apply_args(get_base_config(), 'batch_size=32,smoke=True')
  assert config.batch_size == 32
  for key, value in overrides.SMOKE.items():
    if key != 'batch_size':
      assert config[key] == value, key
  assert config.data.max_rows == overrides.SMOKE_MAX_ROWS
  assert overrides.apply_args(get_base_config(), 'smoke=False') == get_base_config()


def test_smoke_leaves_max_rows_of_fileless_datasets():
  config = get_base_config()
  config.dataset = 'synthetic'
  assert overrides.apply_args(config, 'smoke=True').data.max_rows == 0


def test_builtin_configs_are_the_package_files():
  files = {os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(os.path.join(os.path.dirname(configs.__file__), '*.py'))}
  assert files - {'__init__', 'base', 'overrides'} == set(CONFIG_NAMES)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_builds(name):
  module = importlib.import_module(f'htl_jax.configs.{name}')
  assert module.__doc__ and f'htl-train --config={name}' in module.__doc__
  config = module.get_config()
  smoke = module.get_config('smoke=True')
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.dataset in DATASETS and smoke.dataset == config.dataset
  assert smoke.max_steps == overrides.SMOKE['max_steps'] and smoke.hidden_dims == (16, 8)
  with pytest.raises(ValueError, match='not_a_key'):
    module.get_config('not_a_key=1')


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_the_checkouts_config_files_load_the_package_configs(name):
  """``--config=configs/NAME.py`` (a checkout) and ``--config=NAME`` are the same config."""
  spec = importlib.util.spec_from_file_location('checkout_config',
                                                os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config('smoke=True') == importlib.import_module(
      f'htl_jax.configs.{name}').get_config('smoke=True')


def test_resolve_names_and_paths(tmp_path):
  assert configs.resolve('kuairand:smoke=True') == configs.path_of('kuairand') + ':smoke=True'
  assert configs.resolve('hillstrom') == configs.path_of('hillstrom')
  mine = str(tmp_path / 'mine.py')
  assert configs.resolve(mine + ':a=1') == mine + ':a=1'
  assert configs.resolve('configs/kuairand.py') == 'configs/kuairand.py'
  with pytest.raises(ConfigError, match='built-in configs: kuairand'):
    configs.resolve('kuairnd')


def test_dataset_configs_declare_their_columns(monkeypatch):
  product = importlib.import_module('htl_jax.configs.product').get_config()
  assert (product.data.tasks, product.data.core) == ('click,purchase', 'amount')
  monkeypatch.delenv('HTL_JAX_DATA', raising=False)
  config = hillstrom.get_config()
  assert config.data.path == 'hillstrom.csv'
  monkeypatch.setenv('HTL_JAX_DATA', '/data')
  assert hillstrom.get_config().data.path == '/data/hillstrom.csv'
  assert config.data.tasks == 'visit,conversion' and config.data.core == 'spend'
  assert config.data.time_column == ''
  assert importlib.import_module('htl_jax.configs.kaggle_revenue').get_config().dataset == (
      'kaggle_revenue')
