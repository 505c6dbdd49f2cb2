"""Tests for the serving export (:mod:`htl_jax.serve.export`).

The exported file is loaded in a fresh Python process that imports only jax and numpy, and
must give the outputs of the trainer's eval step (:func:`htl_jax.train.step.eval_step`).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
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


def _run_alone(folder, script: str, *args) -> None:
  """``script`` in a fresh interpreter, in ``folder``, without the repository on its path."""
  path = folder / f'script_{abs(hash(script))}.py'
  path.write_text(script)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, str(path), *map(str, args)], cwd=str(folder),
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr


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
  _run_alone(tmp_path, _LOADER, summary.model_path, tmp_path / 'ids.npy',
             tmp_path / 'out.npz')
  served = np.load(tmp_path / 'out.npz')
  assert tuple(served['platforms']) == ('cpu', 'cuda')
  for size in (3, 41):
    probs, core = _eval_step_outputs(run, ids[:size])
    assert served[f'probs_{size}'].shape == (size, spec.num_binary)
    np.testing.assert_allclose(served[f'probs_{size}'], probs, rtol=1e-6, atol=0)
    np.testing.assert_allclose(served[f'core_{size}'], core, rtol=1e-6, atol=0)


def test_cli_without_a_finished_run_is_one_line_with_exit_code_2(tmp_path):
  (tmp_path / 'run').mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.export', f'--workdir={tmp_path / "run"}',
       f'--out={tmp_path / "out"}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'no finished run' in errors[0]
  assert not os.path.exists(tmp_path / 'out')


def _raw_rows(encoder, rows: int) -> list[dict]:
  """Raw rows over every field: training values, unseen ones, nulls, NaN and infinities."""
  rng = np.random.default_rng(1)
  columns = {}
  for field in encoder.fields:
    if hasattr(field, 'values'):                       # categorical
      known = field.values.tolist()
      unseen = max(known) + 1000 if field.values.dtype.kind == 'i' else 'never seen'
      pool = known + [unseen, None]
    else:
      edges = list(field.edges) or [field.mean]
      pool = [float(v) for v in rng.normal(np.mean(edges), np.std(edges) + 1, 20)]
      pool += list(edges[:3]) + [None, float('nan'), float('inf'), -1e12, 1e12]
    columns[field.name] = [pool[i] for i in rng.integers(0, len(pool), rows)]
  return [{name: column[r] for name, column in columns.items()} for r in range(rows)]


def test_the_documented_raw_row_encoder_gives_the_trainers_ids(trained_run, tmp_path):
  """docs/serving.md's encoder, in a process with only jax and numpy, on raw rows of every
  kind, gives the ids of the trainer's encoder (htl_jax.data.encoding)."""
  import polars as pl  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  run = load_run(trained_run)
  summary = export_lib.export_run(trained_run, str(tmp_path / 'served'), run=run)
  encoder = run.preprocessing.encoder
  rows = _raw_rows(encoder, 300)
  (tmp_path / 'rows.json').write_text(json.dumps(rows))      # NaN / Infinity: Python's JSON
  doc = (pathlib.Path(REPO) / 'docs' / 'serving.md').read_text()
  snippet = next(b for b in re.findall(r'```python\n(.*?)```', doc, re.S)
                 if 'def make_encoder' in b)
  script = snippet + textwrap.dedent('''
      import sys
      ids = make_encoder(sys.argv[1])(json.load(open(sys.argv[2])))
      np.save(sys.argv[3], ids)
      assert not any(name.startswith(('htl_jax', 'polars')) for name in sys.modules)
  ''')
  _run_alone(tmp_path, script, summary.signature_path, tmp_path / 'rows.json',
             tmp_path / 'ids.npy')
  frame = pl.DataFrame({f.name: [r[f.name] for r in rows] for f in encoder.fields},
                       strict=False)
  expected = np.stack(encoder.encode(frame)[0], axis=1)
  np.testing.assert_array_equal(np.load(tmp_path / 'ids.npy'), expected)
