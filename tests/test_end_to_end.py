"""Every model, head, extra loss and gradient process trains end to end (a few steps).

Each case runs ``train_and_evaluate`` on the embedded KuaiRand sample with the tiny config
and checks the run finished with finite metrics for every task.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import tiny_config
from htl_jax.models import MODELS
from htl_jax.train import loop as loop_lib

# Every model with its default gradient process ('auto': htl for HTLNet, none otherwise).
CASES = [{'model': name, 'grad_process': 'auto', **({'head': 'ziln'} if name == 'ziln' else {})}
         for name in sorted(MODELS)] + [
    {'model': 'htlnet', 'grad_process': 'pcgrad'},
    {'model': 'htlnet', 'grad_process': 'metabalance'},
    {'model': 'htlnet', 'grad_process': 'htl', 'grad_conflict': False, 'per_leaf': True},
    {'model': 'shared_bottom', 'grad_process': 'htl'},          # "w/o Architecture"
    {'model': 'mmoe', 'grad_process': 'htl', 'head': 'ziln', 'lambda_pair': 0.5},
    {'model': 'aitm', 'grad_process': 'htl', 'best_metric': 'gini'},
]


def _case_id(case):
  return '-'.join(f'{v}' for v in case.values())


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_trains_end_to_end(case, cache_dir, tmp_path):
  config = tiny_config(cache_dir, max_steps=4, eval_every=4, **case)
  result = loop_lib.train_and_evaluate(config, str(tmp_path))
  assert result['steps'] == 4
  for split in ('valid', 'test'):
    assert set(result[split]) == {'click', 'long_view', 'watch_time'}
    for task, values in result[split].items():
      assert all(math.isfinite(v) for v in values.values()), (task, values)
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    record = json.loads(f.readline())
  grad = record['grad']
  assert grad['watch_time']['cos_core'] == pytest.approx(1.0, abs=1e-4)
  assert grad['watch_time']['norm'] > 0
  process = case['grad_process']
  if process == 'auto':
    process = 'htl' if case['model'] == 'htlnet' else 'none'
  # Fig. 5's data: Algorithm 1 and MetaBalance leave the core's gradient as it is (PCGrad
  # projects it too); the binary tasks' norms change exactly when a process runs.
  if process != 'pcgrad':
    assert grad['watch_time']['norm_processed'] == pytest.approx(grad['watch_time']['norm'])
  changed = [not math.isclose(g['norm'], g['norm_processed'], rel_tol=1e-6)
             for t, g in grad.items() if t != 'watch_time']
  if process == 'none':
    assert not any(changed), grad
  elif process in ('htl', 'metabalance'):     # PCGrad changes only conflicting tasks
    assert any(changed), grad
