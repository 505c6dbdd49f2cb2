"""tools/compare.py: runs (model, seed) pairs and summarizes mean +- std per test metric."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_OVERRIDES
from tools import compare


def _test(auc, nrmse):
  return {'click': {'auc': auc}, 'watch_time': {'nrmse': nrmse}}


def test_summarize_and_markdown():
  table = compare.summarize({'htlnet': [(_test(0.7, 0.9), 100.0), (_test(0.8, 1.1), 300.0)],
                             'dnn': [(_test(0.6, 1.0), 50.0)]})
  assert table['htlnet']['click']['auc'] == pytest.approx((0.75, 0.05))
  assert table['htlnet']['watch_time']['nrmse'] == pytest.approx((1.0, 0.1))
  assert table['htlnet']['examples_per_s'] == 200.0
  text = compare.markdown(table)
  assert '| htlnet | 0.7500 ± 0.0500 | 1.0000 ± 0.1000 | 200 |' in text
  assert text.splitlines()[0] == '| model | click auc | watch_time nrmse | examples/s |'


def test_run_one_trains_and_reports_speed(cache_dir, tmp_path):
  overrides = [f'{k}={",".join(map(str, v)) if isinstance(v, tuple) else v}'
               for k, v in {**TINY_OVERRIDES, 'max_steps': 4}.items()]
  test, speed = compare.run_one('configs/kuairand.py:smoke=True,data.max_rows=2000',
                                'shared_bottom', 1, overrides + [f'cache_dir={cache_dir}'],
                                str(tmp_path))
  assert set(test) == {'click', 'long_view', 'watch_time'}
  assert np.isfinite(speed) and speed > 0
