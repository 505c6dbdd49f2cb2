"""A finished training run, loaded back from its workdir for prediction and export.

A workdir written by :func:`htl_jax.train.loop.train_and_evaluate` holds ``config.json``
(the run's config), ``preprocessing.json`` (:mod:`htl_jax.serve.preprocessing`),
``checkpoints/best`` and, once the run finished, ``metrics.json``. :func:`load_run` rebuilds
the static setup through the trainer's own pieces (``make_setup`` / ``init_state``) and
restores the best checkpoint into it, so the model is exactly the one that was tested.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from htl_jax import metrics as metrics_lib
from htl_jax.serve import preprocessing as preprocessing_lib
from htl_jax.train.checkpoint import Checkpoints
from htl_jax.train.state import TrainSetup, TrainState, init_state, make_setup


class RunError(ValueError):
  """A workdir that holds no finished run; reported as one line (exit code 2)."""


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config had (``hidden_dims``); dicts recursively."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from ``<workdir>/config.json`` (tuples restored)."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f'{workdir}: no readable config.json ({type(e).__name__}); is this the '
                   '--workdir of a training run?') from None
  config = ml_collections.ConfigDict(_tuples(stored))
  if 'data' in config and 'passthrough' not in config.data:
    config.data.passthrough = ''     # runs trained before the field existed
  return config


def best_mode(config: Any) -> str:
  """'min' or 'max': how the trainer ranked its best checkpoint (core metric)."""
  metric = config.best_metric or 'nrmse'
  return 'min' if metric in metrics_lib.LOWER_IS_BETTER else 'max'


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedRun:
  """A finished run: config, preprocessing, the trainer's setup and the best state.

  Attributes:
    workdir: where the run lives.
    config: the run's config (from ``config.json``).
    preprocessing: what was fitted on the training rows.
    setup: the static half of training (model, objective), rebuilt by ``make_setup``.
    state: the best checkpoint's train state (host arrays, one copy).
    best_step: the step of that checkpoint.
    metrics: the run's ``metrics.json``.
  """

  workdir: str
  config: ml_collections.ConfigDict
  preprocessing: preprocessing_lib.Preprocessing
  setup: TrainSetup
  state: TrainState
  best_step: int
  metrics: dict[str, Any]


def finished_metrics(workdir: str) -> dict[str, Any]:
  """``metrics.json``, the mark of a finished run; RunError when absent."""
  if not os.path.isdir(workdir):
    raise RunError(f'{workdir}: no such directory (--workdir)')
  path = os.path.join(workdir, 'metrics.json')
  if not os.path.isfile(path):
    raise RunError(f'{workdir}: no finished run here (no metrics.json; train it to the end '
                   'with experiments.main first)')
  with open(path) as f:
    return json.load(f)


def load_preprocessing(workdir: str) -> preprocessing_lib.Preprocessing:
  """The run's stored preprocessing; RunError when absent or unreadable."""
  try:
    return preprocessing_lib.load(workdir)
  except FileNotFoundError:
    raise RunError(f'{workdir}: no {preprocessing_lib.FILE_NAME} (the run predates stored '
                   'preprocessing; train it again)') from None
  except (OSError, ValueError, KeyError) as e:
    raise RunError(f'{workdir}: unreadable {preprocessing_lib.FILE_NAME}: {e}') from None


def load_run(workdir: str) -> TrainedRun:
  """Loads the finished run in ``workdir`` (module docstring).

  Raises:
    RunError: no directory, no finished run, no stored preprocessing (a run trained before
      preprocessing was stored: train it again), or no best checkpoint.
  """
  metrics = finished_metrics(workdir)
  config = load_config(workdir)
  preprocessing = load_preprocessing(workdir)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', 'best')):
    raise RunError(f'{workdir}: no best checkpoint (checkpoints/best is missing)')
  setup = make_setup(config, preprocessing.spec, preprocessing.core_transform)
  checkpoints = Checkpoints(workdir, best_mode(config))
  try:
    restored = checkpoints.restore_best(init_state(setup, config))
  finally:
    checkpoints.close()
  if restored is None:
    raise RunError(f'{workdir}: no best checkpoint (checkpoints/best is empty)')
  state, loop = restored
  return TrainedRun(workdir=workdir, config=config, preprocessing=preprocessing, setup=setup,
                    state=state, best_step=int(loop.get('best_step', int(state.step))),
                    metrics=metrics)
