"""Tests for the config files and their shared ``key=value`` argument parser."""

from __future__ import annotations

import glob
import importlib
import os

import ml_collections
import pytest

from configs import common
from configs import hillstrom
from configs.base import get_base_config
from htl_jax.data import DATASETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_DATASET_CONFIGS = ('__init__', 'base', 'common')
CONFIG_NAMES = sorted(
    name for name in (os.path.splitext(os.path.basename(p))[0]
                      for p in glob.glob(os.path.join(REPO, 'configs', '*.py')))
    if name not in _NOT_DATASET_CONFIGS)


def test_apply_args_converts_to_the_field_type():
  config = common.apply_args(
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
  assert common.apply_args(get_base_config(), arg) == get_base_config()


def test_unknown_keys_are_all_listed():
  with pytest.raises(ValueError) as error:
    common.apply_args(get_base_config(), 'bogus=1,model=mmoe,data.nope=2,data=3')
  message = str(error.value)
  # 'data' is a block, not a field; 'model' is a known field.
  assert 'unknown config key(s) bogus, data.nope, data in' in message


@pytest.mark.parametrize('arg', ['batch_size=abc', 'use_label_embedding=maybe',
                                 'learning_rate=fast', 'hidden_dims=(16,x)', 'smoke=perhaps',
                                 'no_equals_sign', '=3'])
def test_bad_values_raise(arg):
  with pytest.raises(ValueError):
    common.apply_args(get_base_config(), arg)


def test_smoke_shrinks_and_explicit_keys_win():
  config = common.apply_args(get_base_config(), 'batch_size=32,smoke=True')
  assert config.batch_size == 32
  for key, value in common.SMOKE.items():
    if key != 'batch_size':
      assert config[key] == value, key
  assert config.data.max_rows == common.SMOKE_MAX_ROWS
  assert common.apply_args(get_base_config(), 'smoke=False') == get_base_config()


def test_smoke_leaves_max_rows_of_fileless_datasets():
  config = get_base_config()
  config.dataset = 'synthetic'
  assert common.apply_args(config, 'smoke=True').data.max_rows == 0


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_builds(name):
  module = importlib.import_module(f'configs.{name}')
  assert module.__doc__ and 'python -m experiments.main' in module.__doc__
  config = module.get_config()
  smoke = module.get_config('smoke=True')
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.dataset in DATASETS and smoke.dataset == config.dataset
  assert smoke.max_steps == common.SMOKE['max_steps'] and smoke.hidden_dims == (16, 8)
  with pytest.raises(ValueError, match='not_a_key'):
    module.get_config('not_a_key=1')


def test_dataset_configs_declare_their_columns():
  assert set(CONFIG_NAMES) >= {'hillstrom', 'kaggle_revenue', 'product', 'tabular'}
  product = importlib.import_module('configs.product').get_config()
  assert (product.data.tasks, product.data.core) == ('click,purchase', 'amount')
  config = hillstrom.get_config()
  assert config.data.path == os.path.normpath(
      os.path.join(REPO, '..', 'shared', 'data', 'hillstrom.csv'))
  assert config.data.tasks == 'visit,conversion' and config.data.core == 'spend'
  assert config.data.time_column == ''
  assert importlib.import_module('configs.kaggle_revenue').get_config().dataset == (
      'kaggle_revenue')
