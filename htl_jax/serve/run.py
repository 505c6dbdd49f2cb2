"""A finished training run, loaded back from its workdir for prediction and export.

A workdir written by :func:`htl_jax.train.loop.train_and_evaluate` holds the run's files
(:mod:`htl_jax.run_files`): ``config.json``, ``preprocessing.json``,
``checkpoints/best`` and, once the run finished, ``metrics.json``. :func:`load_run` rebuilds
the static setup through the trainer's own pieces (``make_setup``) and restores from the best
checkpoint only what inference reads, the parameters and the temperature
(:class:`htl_jax.train.state.ServingState`): no optimizer state is built or read, so the
model is exactly the one that was tested, at the memory of its parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from htl_jax.errors import RunError
from htl_jax import run_files
from htl_jax.train.checkpoint import restore_serving
from htl_jax.run_files import Preprocessing
from htl_jax.train.state import ServingState, TrainSetup, abstract_serving_state, make_setup


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedRun:
  """A finished run: config, preprocessing, the trainer's setup and the best parameters.

  Attributes:
    workdir: where the run lives.
    config: the run's config (from ``config.json``).
    preprocessing: what was fitted on the training rows.
    setup: the static half of training (model, objective), rebuilt by ``make_setup``.
    state: the best checkpoint's parameters and temperature (one copy, on the first device).
    best_step: the step of that checkpoint.
    metrics: the run's ``metrics.json``.
  """

  workdir: str
  config: ml_collections.ConfigDict
  preprocessing: Preprocessing
  setup: TrainSetup
  state: ServingState
  best_step: int
  metrics: dict[str, Any]


def load_run(workdir: str) -> TrainedRun:
  """Loads the finished run in ``workdir`` (module docstring).

  Raises:
    RunError: no directory, no finished run, no stored preprocessing (a run trained before
      preprocessing was stored: train it again), or no readable best checkpoint.
  """
  metrics = run_files.finished_metrics(workdir)
  config = run_files.load_config(workdir)
  preprocessing = run_files.load_preprocessing(workdir)
  setup = make_setup(config, preprocessing.spec, preprocessing.core_transform)
  restored = restore_serving(workdir, abstract_serving_state(setup, config))
  if restored is None:
    raise RunError(f'{workdir}: no best checkpoint ({run_files.CHECKPOINTS}/best is missing '
                   'or empty)')
  state, best_step = restored
  return TrainedRun(workdir=workdir, config=config, preprocessing=preprocessing, setup=setup,
                    state=state, best_step=best_step, metrics=metrics)
