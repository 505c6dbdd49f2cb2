"""Tests for the serving export (:mod:`htl_jax.serve.export`).

The exported file is loaded in a fresh Python process that imports only jax and numpy, and
must give the outputs of the trainer's eval step (:func:`htl_jax.train.step.eval_step`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from conftest import REPO
from htl_jax.serve import export as export_lib
from htl_jax.serve.run import load_run
from htl_jax.train import step as step_lib

# Run in a fresh interpreter, outside the repository, with only jax and numpy.
_LOADER = textwrap.dedent('''
    import sys
    import numpy as np
    from jax import export
    with open(sys.argv[1], 'rb') as f:
      exported = export.deserialize(f.read())
    ids = np.load(sys.argv[2])
    outputs = {}
    for size in (3, ids.shape[0]):               # two batch sizes: the dimension is symbolic
      probs, core = exported.call(ids[:size])
      outputs[f'probs_{size}'], outputs[f'core_{size}'] = np.asarray(probs), np.asarray(core)
    np.savez(sys.argv[3], platforms=np.array(exported.platforms), **outputs)
    assert not any(name.startswith('htl_jax') for name in sys.modules), 'htl_jax imported'
''')


def _eval_step_outputs(run, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The trainer's eval step on ``ids`` (all rows real)."""
  batch = {'x': ids, 'index': np.arange(ids.shape[0], dtype=np.int32),
           'weight': np.ones(ids.shape[0], np.float32)}
  out = jax.jit(functools.partial(step_lib.eval_step, run.setup))(run.state, batch)
  return np.asarray(out['probs']), np.asarray(out['core'])


def _random_ids(vocab_sizes, rows: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  return np.stack([rng.integers(0, v, rows) for v in vocab_sizes], axis=1).astype(np.int32)


def test_export_runs_in_a_fresh_process_without_htl_jax(trained_run, tmp_path):
  run = load_run(trained_run)
  summary = export_lib.export_run(trained_run, str(tmp_path / 'served'), run=run)
  assert summary.platforms == ('cpu', 'cuda')
  with open(summary.signature_path) as f:
    contract = json.load(f)
  spec = run.preprocessing.spec
  assert contract['input']['shape'] == ['b', spec.num_fields]
  assert contract['input']['fields'] == list(spec.fields)
  assert contract['outputs'][0]['tasks'] == list(spec.binary_tasks)
  assert contract['preprocessing'] == run.preprocessing.to_dict()

  ids = _random_ids(spec.vocab_sizes, 41)
  np.save(tmp_path / 'ids.npy', ids)
  (tmp_path / 'load.py').write_text(_LOADER)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
      [sys.executable, str(tmp_path / 'load.py'), summary.model_path,
       str(tmp_path / 'ids.npy'), str(tmp_path / 'out.npz')],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  served = np.load(tmp_path / 'out.npz')
  assert tuple(served['platforms']) == ('cpu', 'cuda')
  for size in (3, 41):
    probs, core = _eval_step_outputs(run, ids[:size])
    assert served[f'probs_{size}'].shape == (size, spec.num_binary)
    np.testing.assert_allclose(served[f'probs_{size}'], probs, rtol=1e-6, atol=0)
    np.testing.assert_allclose(served[f'core_{size}'], core, rtol=1e-6, atol=0)


def test_cli_without_a_finished_run_is_one_line_with_exit_code_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.export', f'--workdir={tmp_path}',
       f'--out={tmp_path / "out"}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'no finished run' in errors[0]
  assert not os.path.exists(tmp_path / 'out')
