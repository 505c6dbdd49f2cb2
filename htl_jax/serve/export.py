"""Export a trained run for serving: its eval function, parameters baked in, via ``jax.export``.

:func:`export_run` writes two files into the output directory:

* ``model.jax_export``: ``jax.export.Exported.serialize()`` of the trainer's eval step
  (:func:`htl_jax.train.step.eval_step`) with the best checkpoint's parameters as constants,
  lowered to StableHLO for CPU and, where it lowers (it does without a GPU), CUDA. Input:
  ``ids``, int32 ``[b, F]`` with a symbolic batch dimension ``b``; outputs ``(probs, core)``:
  float32 ``[b, T]`` binary-task probabilities (chain order) and float32 ``[b]`` core
  predictions on the original scale.
* ``serving.json``: the contract: the input signature (field order, vocabulary sizes), the
  outputs, the platforms, the jax version, and the preprocessing that turns raw rows into
  ``ids`` (the run's ``preprocessing.json``, :class:`htl_jax.run_files.Preprocessing`):
  ``ids[:, j]`` is field ``fields[j]``'s id, ``0 <= ids[:, j] < vocab_sizes[j]`` (0 = null /
  unseen in training).

Loading needs only ``jax`` (and ``flatbuffers``), not htl_jax::

  from jax import export
  exported = export.deserialize(open('model.jax_export', 'rb').read())
  probs, core = exported.call(ids)            # ids: int32 [b, F], any b >= 1
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
from jax import export as jax_export
import jax.numpy as jnp

from htl_jax.errors import ConfigError, first_line
from htl_jax.serve.run import TrainedRun, load_run
from htl_jax import run_files
from htl_jax.train import step as step_lib

MODEL_FILE = 'model.jax_export'
SIGNATURE_FILE = 'serving.json'
DEFAULT_PLATFORMS = ('cpu', 'cuda')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')     # what jax.export lowers for
FORMAT = 1


def serving_function(run: TrainedRun) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """``ids [b, F] -> (probs [b, T], core [b])``: the eval step with the run's state bound."""
  setup, state = run.setup, run.state

  def serve(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch_size = ids.shape[0]
    batch = {'x': ids, 'index': jnp.arange(batch_size, dtype=jnp.int32),
             'weight': jnp.ones((batch_size,), jnp.float32)}
    out = step_lib.eval_step(setup, state, batch)
    return out['probs'], out['core']

  return serve


def export_function(run: TrainedRun, platforms: Sequence[str]) -> jax_export.Exported:
  """Lowers :func:`serving_function` for ``platforms`` with a symbolic batch dimension."""
  (batch,) = jax_export.symbolic_shape('b')
  ids = jax.ShapeDtypeStruct((batch, run.preprocessing.spec.num_fields), jnp.int32)
  return jax_export.export(jax.jit(serving_function(run)), platforms=tuple(platforms))(ids)


def _lower(run: TrainedRun, platforms: Sequence[str]) -> tuple[jax_export.Exported, str]:
  """Exports for ``platforms``; falls back to CPU alone when another platform fails."""
  try:
    return export_function(run, platforms), ''
  except Exception as error:  # pylint: disable=broad-except
    if tuple(platforms) == ('cpu',) or 'cpu' not in platforms:
      raise
    reason = f'{type(error).__name__}: {first_line(error)}'
    logging.warning('lowering for %s failed (%s); exporting for cpu only', platforms, reason)
    return export_function(run, ('cpu',)), reason


def signature(run: TrainedRun, exported: jax_export.Exported, fallback: str = ''
              ) -> dict[str, Any]:
  """The ``serving.json`` contract of an export (module docstring)."""
  spec = run.preprocessing.spec
  return {
      'format': FORMAT,
      'model_file': MODEL_FILE,
      'platforms': list(exported.platforms),
      'platform_fallback': fallback,
      'jax_version': jax.__version__,
      'run': {'workdir': os.path.abspath(run.workdir), 'model': run.config.model,
              'dataset': run.preprocessing.dataset, 'best_step': run.best_step},
      'input': {
          'name': 'ids', 'dtype': 'int32', 'shape': ['b', spec.num_fields],
          'fields': list(spec.fields), 'vocab_sizes': list(spec.vocab_sizes),
          'contract': ('ids[:, j] is the id of fields[j] given by the preprocessing below; '
                       '0 <= ids[:, j] < vocab_sizes[j]; 0 = null or unseen in training; an '
                       'id outside that range is read as 0, as htl-predict reads it'),
      },
      'outputs': [
          {'name': 'probs', 'dtype': 'float32', 'shape': ['b', spec.num_binary],
           'tasks': list(spec.binary_tasks)},
          {'name': 'core', 'dtype': 'float32', 'shape': ['b'], 'task': spec.core_task,
           'scale': 'original'},
      ],
      'preprocessing': run.preprocessing.to_dict(),
  }


@dataclasses.dataclass
class ExportSummary:
  """What :func:`export_run` wrote: the two paths, the platforms and the model's bytes."""

  model_path: str
  signature_path: str
  platforms: tuple[str, ...]
  model_bytes: int


def check_out_dir(out_dir: str, workdir: str) -> None:
  """ConfigError (one line) unless ``out_dir`` can take the export: not an existing file, not
  the training run's workdir nor inside it (a read command never changes a run)."""
  if os.path.isfile(out_dir):
    raise ConfigError(f'--out {out_dir}: is an existing file; --out names the directory of '
                      f'{MODEL_FILE} and {SIGNATURE_FILE}')
  target, run = os.path.realpath(out_dir), os.path.realpath(workdir)
  if target == run or target.startswith(run.rstrip(os.sep) + os.sep):
    raise ConfigError(f'--out {out_dir}: lies in the training run {workdir}, which export '
                      'never changes; give another --out')


def export_run(workdir: str, out_dir: str, *, platforms: Sequence[str] = DEFAULT_PLATFORMS,
               run: Optional[TrainedRun] = None) -> ExportSummary:
  """Exports the best checkpoint of ``workdir`` into ``out_dir`` (module docstring).

  Args:
    workdir: a finished training run.
    out_dir: where ``model.jax_export`` and ``serving.json`` go (created if needed).
    platforms: ``jax.export`` platforms; if one besides 'cpu' fails to lower, the export
      is for CPU alone and ``serving.json`` says why.
    run: an already loaded run (skips :func:`load_run`).

  Returns:
    An :class:`ExportSummary`.

  Raises:
    RunError: ``workdir`` holds no finished run.
    ConfigError: ``out_dir`` is a file, or lies in the training run; an unknown platform.
  """
  check_out_dir(out_dir, workdir)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ConfigError(f'--platforms: {", ".join(map(repr, unknown)) or "none given"}; '
                      f'jax.export lowers for {", ".join(PLATFORMS)}')
  run = run or load_run(workdir)
  exported, fallback = _lower(run, platforms)
  os.makedirs(out_dir, exist_ok=True)
  model_path = os.path.join(out_dir, MODEL_FILE)
  signature_path = os.path.join(out_dir, SIGNATURE_FILE)
  payload = bytes(exported.serialize())
  run_files.write_bytes(model_path, payload)
  run_files.write_json(signature_path, signature(run, exported, fallback), indent=1)
  logging.info('exported %s (best step %d) for %s: %s (%d bytes), %s', run.workdir,
               run.best_step, list(exported.platforms), model_path, len(payload),
               signature_path)
  return ExportSummary(model_path, signature_path, tuple(exported.platforms), len(payload))
