"""What a run writes: TensorBoard events next to metrics.jsonl and the HParams summary, read
back from the event files with tensorboardX's protobufs (no TensorBoard needed)."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2

from conftest import tiny_config
from htl_jax.train import loop as loop_lib
from htl_jax.train.writers import defined_metrics, final_metrics, flat_hparams


def read_events(workdir: str) -> list[event_pb2.Event]:
  """Every event of the workdir's own event files, in order (TFRecord framing)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """Every scalar in the workdir's event files: tag -> {step: value}."""
  scalars: dict[str, dict[int, float]] = {}
  for event in read_events(workdir):
    for value in event.summary.value:
      if not value.metadata.plugin_data.plugin_name:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def read_hparams(workdir: str) -> dict[str, plugin_hparams_pb2.HParamsPluginData]:
  """The HParams plugin's summaries in the workdir's event files, by tag."""
  found = {}
  for event in read_events(workdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == 'hparams':
        found[value.tag] = plugin_hparams_pb2.HParamsPluginData.FromString(
            value.metadata.plugin_data.content)
  return found


@pytest.fixture(scope='module')
def finished_run(cache_dir, tmp_path_factory):
  """A finished tiny run: its config, workdir and ``metrics.json``."""
  workdir = tmp_path_factory.mktemp('writers_run')
  config = tiny_config(cache_dir)
  result = loop_lib.train_and_evaluate(config, str(workdir))
  return config, workdir, result


def test_tensorboard_events_match_metrics_jsonl(finished_run):
  _, tmp_path, _ = finished_run
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


def test_hparams_summary_holds_the_config_and_the_final_metrics(finished_run):
  """TensorBoard's HParams tab: the run's config next to metrics.json's numbers, in the
  run's own event files (no sub-run folder), each metric also a scalar at the last step."""
  config, workdir, result = finished_run
  found = read_hparams(str(workdir))
  assert set(found) == {'_hparams_/experiment', '_hparams_/session_start_info',
                        '_hparams_/session_end_info'}
  session = found['_hparams_/session_start_info'].session_start_info.hparams
  assert session['model'].string_value == 'htlnet'
  assert session['data.max_rows'].number_value == 2000
  assert session['learning_rate'].number_value == pytest.approx(config.learning_rate)
  assert session['hidden_dims'].string_value == '(16, 8)'
  assert session['gpu_determinism'].bool_value is True
  assert set(session) == set(flat_hparams(config))
  experiment = found['_hparams_/experiment'].experiment
  tags = {info.name.tag for info in experiment.metric_infos}
  assert tags == set(final_metrics(result))
  assert 'final/test/watch_time/nrmse' in tags and 'final/valid/click/auc' in tags
  scalars = read_scalars(str(workdir))
  with open(workdir / 'metrics.json') as f:
    saved = json.load(f)
  assert scalars['final/test/watch_time/nrmse'] == {
      8: pytest.approx(saved['test']['watch_time']['nrmse'])}
  assert scalars['final/valid/long_view/logloss'][8] == pytest.approx(
      saved['valid']['long_view']['logloss'])
  assert not [p for p in workdir.iterdir() if p.is_dir() and p.name != 'checkpoints']


def test_flat_hparams_and_final_metrics_leave_out_none():
  config = tiny_config('/tmp/cache')
  flat = flat_hparams(config)
  assert flat['data.numeric_buckets'] == 20 and flat['cache_dir'] == '/tmp/cache'
  assert 'data' not in flat and all(v is not None for v in flat.values())
  result = {'valid': {'click': {'auc': None, 'logloss': 0.5}},
            'test': {'y': {'nrmse': 0.9, 'gini': None}}, 'steps': 3}
  assert final_metrics(result) == {'final/valid/click/logloss': 0.5,
                                   'final/test/y/nrmse': 0.9}
