"""What a run writes while training: TensorBoard events next to metrics.jsonl, read back."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from conftest import tiny_config
from htl_jax.train import loop as loop_lib
from htl_jax.train.writers import defined_metrics


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """Every scalar in the workdir's event files: tag -> {step: value} (TFRecord framing)."""
  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_events_match_metrics_jsonl(cache_dir, tmp_path):
  config = tiny_config(cache_dir)
  loop_lib.train_and_evaluate(config, str(tmp_path))
  scalars = read_scalars(str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [4, 8]
  for record in records:
    step = record['step']
    assert scalars['valid/watch_time/nrmse'][step] == pytest.approx(
        record['valid']['watch_time']['nrmse'])
    assert scalars['grad/click/norm_processed'][step] == pytest.approx(
        record['grad']['click']['norm_processed'])
    assert scalars['train/loss/long_view'][step] == pytest.approx(
        record['task_losses']['long_view'], rel=1e-6)
  assert set(scalars['train/tau']) == {4, 8} and scalars['train/examples_per_s'][8] > 0


def test_defined_metrics_replaces_non_finite_values():
  metrics = {'click': {'auc': float('nan'), 'logloss': 0.5}, 'y': {'nrmse': float('inf')}}
  warned: set = set()
  out = defined_metrics(metrics, 'test', warned)
  assert out == {'click': {'auc': None, 'logloss': 0.5}, 'y': {'nrmse': None}}
  assert warned == {('click', 'test', 'auc'), ('y', 'test', 'nrmse')}
  json.dumps(out, allow_nan=False)
