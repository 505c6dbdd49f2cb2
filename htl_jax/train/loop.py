"""``train_and_evaluate(config, workdir)``: the whole run, resumable (docs/design.md).

Writes the run's files into ``workdir`` (:mod:`htl_jax.run_files`): ``config.json``,
``preprocessing.json``, ``metrics.jsonl`` (one line per evaluation: train loss, temperature,
examples/s, validation metrics per task and the selection value, and per task the gradient
diagnostics on ``theta_s`` of the paper's Fig. 5, :class:`htl_jax.optim.TaskDiagnostics`),
``metrics.json`` (the best checkpoint's metrics, the final temperature and why training
ended), ``checkpoints/{latest,best}`` and TensorBoard events. A restarted run resumes from
the latest checkpoint and gives the same result as an uninterrupted one. The selection rule
(:func:`htl_jax.selection.selection`) picks the best checkpoint and stops the run early
after ``patience`` evaluations without improvement.

The loop is the shape of flax's examples: :meth:`Run.evaluations` runs the compiled steps
one dispatch at a time and hands the periodic work to small actions
(:mod:`htl_jax.train.hooks`: progress, evaluation with early stopping, checkpoints, a stop
request). It yields after every evaluation, so a caller can run several runs side by side
(the seeds of a tuning trial, :mod:`htl_jax.repro.tuning`) or stop one (a pruned trial).

With several processes (``htl_jax.runtime.distributed``), every process prepares the same
data, feeds its part of each global batch and evaluates its part of each evaluation batch
(the predictions are gathered, so every row is evaluated once); all of them take part in the
orbax checkpoints, and only the primary process writes the JSON files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import zlib
from typing import Any, Callable, Iterator, Optional

from absl import logging
import numpy as np

from htl_jax import metrics as metrics_lib
from htl_jax.data import default_cache_dir, load_dataset, pipeline
from htl_jax.data.schema import HybridData, Split
from htl_jax.errors import ConfigError, DataError, PreemptedError
from htl_jax.losses import CoreTransform
from htl_jax.runtime import determinism
from htl_jax.selection import Selection, selection
from htl_jax.train import feed as feed_lib
from htl_jax import run_files
from htl_jax.train import parallel
from htl_jax.train import step as step_lib
from htl_jax.train.checkpoint import Checkpoints
from htl_jax.train.checks import check_config
from htl_jax.train.hooks import EarlyStopping, Progress, preemption_signal
from htl_jax.train.state import TrainSetup, init_state, make_setup
from htl_jax.train.writers import RunWriter, defined_metrics

__all__ = ['EarlyStopping', 'Evaluation', 'Run', 'prepare', 'train_and_evaluate']


# ----------------------------------------------------------------------------- evaluation


def predict(programs: '_Programs', state, split: Split, batch_size: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Binary probabilities ``[N, T]`` and core predictions ``[N]`` of a whole split.

  Each process predicts its part of each batch; the program gathers the parts.
  """
  probs, core = [], []
  for batch in pipeline.batches(split, batch_size, shuffle=False, seed=0, epoch=0,
                                drop_remainder=False, part=parallel.process_part()):
    out = parallel.unreplicate(programs.evaluate(state, parallel.shard(batch)))
    keep = out['weight'] > 0
    probs.append(out['probs'][keep])
    core.append(out['core'][keep])
  return np.concatenate(probs), np.concatenate(core)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What :meth:`Run.evaluations` yields after each validation evaluation.

  Attributes:
    step: the step evaluated.
    valid: ``{task: {metric: value}}`` (None where undefined).
    value: the selection rule's value of ``valid`` (None where undefined).
    stopping: the early-stopping state after this evaluation (best value and step, and
      whether the run stops here).
  """

  step: int
  valid: dict[str, dict[str, Optional[float]]]
  value: Optional[float]
  stopping: EarlyStopping


# ----------------------------------------------------------------------------- preparation


def _check_same_data(data: HybridData) -> None:
  """Every process must have prepared the same splits (a collective with several)."""
  if parallel.process_count() == 1:
    return
  fingerprint = [len(data.train), len(data.valid), len(data.test), data.spec.total_vocab]
  for split in (data.train, data.valid, data.test):
    for array in (split.x, split.y, split.core):
      fingerprint.append(zlib.crc32(np.ascontiguousarray(array).data) & 0x7fffffff)
  if not parallel.same_on_all_processes(np.asarray(fingerprint)):
    raise DataError(f'process {parallel.process_index()} of {parallel.process_count()} '
                    'prepared different data than the others: every process must read the '
                    'same files with the same config')


def prepare(config, workdir: str) -> tuple[HybridData, TrainSetup]:
  """Checks, data and the static setup; nothing is written yet."""
  check_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is an existing file, not a directory')
  run_files.check_owner(workdir, config)
  data = load_dataset(config, config.cache_dir or default_cache_dir())
  _check_same_data(data)
  if feed_lib.steps_per_epoch(data, config) < 1:
    raise ConfigError(f'the train split has {len(data.train)} rows, fewer than '
                      f'batch_size={config.batch_size}')
  setup = make_setup(config, data.spec,
                     CoreTransform.fit(config.core_transform, data.train.core))
  return data, setup


class _Programs:
  """The compiled programs of one run (:data:`htl_jax.train.step.train_program`,
  :data:`~htl_jax.train.step.eval_program`), compiled or loaded before its first timed step.

  jit's cache keeps them: an ahead-of-time compile here is what the calls then run, and a
  later run of an equal setup finds them there. With several processes they compile at
  their first call (a pmap's ahead-of-time lowering there takes the global shapes).
  """

  def __init__(self, setup: TrainSetup, feeder: feed_lib.Feeder, rstate: Any,
               max_steps: int, diagnosed: bool, eval_example: dict):
    step_lib.bound_programs(setup)
    self.setup, self.mode, self.max_steps = setup, feeder.mode, max_steps
    self.diagnosed = diagnosed and setup.grad_process == 'none'
    count = np.ones(parallel.local_device_count(), np.int32)
    if parallel.process_count() == 1:
      if feeder.has_dispatches:
        source = feeder.example_source()
        for flag in {False, self.diagnosed}:
          step_lib.train_program.lower(*self._statics(flag), rstate, source, count).compile()
      step_lib.eval_program.lower(setup, rstate, eval_example).compile()

  def _statics(self, diagnosed: bool) -> tuple:
    return self.setup, self.max_steps, self.mode, diagnosed

  def run(self, rstate: Any, dispatch: feed_lib.Dispatch, source: Any) -> tuple[Any, dict]:
    # A run without a process takes Fig. 5's diagnostics in its own program, at evaluations.
    diagnosed = self.diagnosed and dispatch.diagnosed
    return step_lib.train_program(*self._statics(diagnosed), rstate, source, np.full(
        parallel.local_device_count(), dispatch.num_steps, np.int32))

  def evaluate(self, state: Any, batch: dict) -> dict:
    return step_lib.eval_program(self.setup, state, batch)


def _eval_example(split: Split, batch_size: int) -> dict:
  """The first evaluation batch of ``split``, sharded: the shapes of every one."""
  batch = next(pipeline.batches(split, batch_size, shuffle=False, seed=0, epoch=0,
                                drop_remainder=False, part=parallel.process_part()))
  return parallel.shard(batch)


# ----------------------------------------------------------------------------- the run


class Run:
  """One training run in its workdir, advanced one evaluation at a time.

  ::

    with Run(config, workdir) as run:
      for evaluation in run.evaluations():
        ...                                 # e.g. report to a pruner, or stop
      result = run.finish()                 # the best checkpoint's valid and test metrics

  Entering takes the workdir (one owner), writes ``config.json`` and
  ``preprocessing.json``, and builds or restores the state and compiles the programs;
  leaving releases everything, also when the loop was left early.

  Args:
    config: the experiment config (``htl_jax/configs/*.py``).
    workdir: where checkpoints and metrics go; an existing run there is resumed.
    prepared: ``(data, setup)`` from :func:`prepare` for this config, when the caller has
      them (runs of one trial share them); None prepares here.
  """

  def __init__(self, config, workdir: str,
               prepared: Optional[tuple[HybridData, TrainSetup]] = None):
    self.config, self.workdir = config, workdir
    self.data, self.setup = prepared or prepare(config, workdir)
    self.rule: Selection = selection(config)
    self.per_epoch = feed_lib.steps_per_epoch(self.data, config)
    self.total_steps = int(config.max_steps) or int(config.num_epochs) * self.per_epoch
    self.primary = parallel.is_primary()
    self._exit = contextlib.ExitStack()
    self.warned: set = set()            # undefined metrics warned about once per run

  # --------------------------------------------------------------------------- set-up

  def __enter__(self) -> 'Run':
    preprocessing = run_files.run_preprocessing(self.config, self.data,
                                                self.setup.objective.core_transform)
    try:
      if self.primary:
        self._exit.enter_context(run_files.owned(self.workdir))
        run_files.check_owner(self.workdir, self.config)      # again, with the lock held
        if preprocessing is not None:
          run_files.check_same_data(self.workdir, preprocessing)
        run_files.write_config(self.workdir, self.config)
        if preprocessing is not None:
          run_files.save_preprocessing(self.workdir, preprocessing)
      self._start()
    except BaseException:
      self._exit.close()
      raise
    return self

  def __exit__(self, *exc_info) -> None:
    self._exit.close()

  def _start(self) -> None:
    config = self.config
    self.ckpt = Checkpoints(self.workdir, self.rule.mode,
                            min_seconds=config.checkpoint_seconds)
    self._exit.callback(self.ckpt.close)
    state = init_state(self.setup, config)
    self.stopping = EarlyStopping()
    restored = self.ckpt.restore_latest(state)
    if restored is not None:          # the same config (run_files.check_owner): same values
      state = restored[0]
      self.stopping = EarlyStopping.from_json(restored[1])
      logging.info('resumed from step %d', int(state.step))
    start = int(state.step)
    self.writer = RunWriter(self.workdir, start, self.total_steps, primary=self.primary)
    self._exit.callback(self.writer.close)
    self._log_start()
    # One step per dispatch with several processes: JAX's preemption sync sees every step.
    max_steps = 1 if parallel.process_count() > 1 else int(config.steps_per_dispatch)
    at_eval = self.setup.grad_process == 'none' and config.grad_diagnostics == 'eval'
    dispatches = list(feed_lib.schedule(config, start, self.total_steps, self.per_epoch,
                                        max_steps, at_eval))
    self.feeder = feed_lib.Feeder(self.data, config, dispatches, max_steps)
    self.rstate = parallel.replicate(state)
    del state
    self.programs = _Programs(self.setup, self.feeder, self.rstate, max_steps,
                              at_eval or config.grad_diagnostics == 'every_step',
                              _eval_example(self.data.valid, config.eval_batch_size))
    self.progress = Progress(self.writer, int(config.batch_size))

  def _log_start(self) -> None:
    data, setup, config = self.data, self.setup, self.config
    logging.info('%s on %s: %d train / %d valid / %d test rows, %d fields, tasks %s, '
                 '%d steps (%d per epoch), %d device(s) in %d process(es), gradient '
                 'process: %s (%s path), %s', config.model, config.dataset, len(data.train),
                 len(data.valid), len(data.test), data.spec.num_fields, data.spec.tasks,
                 self.total_steps, self.per_epoch, parallel.device_count(),
                 parallel.process_count(), setup.grad_process, setup.grad_path,
                 self.rule.describe())
    if parallel.platform() == 'gpu':
      logging.info(determinism.describe())

  # --------------------------------------------------------------------------- the loop

  def evaluations(self) -> Iterator[Evaluation]:
    """Trains to the end (the last step or early stopping), yielding every evaluation.

    Raises:
      NonFiniteError: a step's loss or gradient is not finite (the best state kept).
      PreemptedError: SIGTERM / SIGINT arrived; a checkpoint was saved.
    """
    if self.stopping.stopped:
      return
    train_start = time.perf_counter()
    for dispatch, source in self.feeder:
      self.rstate, metrics = self.programs.run(self.rstate, dispatch, source)
      step = dispatch.last
      self.progress.add(dispatch, metrics)
      is_eval = feed_lib.is_eval_step(step, self.config, self.total_steps)
      signal = preemption_signal(step)
      if step % self.config.log_every == 0 or is_eval or signal:
        self.progress.report(step, self._keep_best)
      if signal:
        self.stopping = self.stopping.trained(time.perf_counter() - train_start)
        self._save_latest(step)
        raise PreemptedError(f'{signal}: stopped after step {step} with a checkpoint in '
                             f'{self.workdir}; run the same command again to resume')
      if is_eval:
        self.stopping = self.stopping.trained(time.perf_counter() - train_start)
        evaluation = self._evaluate(step)
        yield evaluation
        if evaluation.stopping.stopped:
          logging.info('early stopping at step %d: no improvement in %d evaluations', step,
                       self.config.patience)
          break
        train_start = time.perf_counter()
        self.progress.restart_timer()
      elif step % self.config.checkpoint_every == 0 and self.ckpt.due(step):
        self._save_latest(step)
    self.progress.drain(self._keep_best)

  def _evaluate(self, step: int) -> Evaluation:
    """Validation metrics, the selection value, early stopping, the best checkpoint and
    the ``metrics.jsonl`` line of ``step``; the latest checkpoint when one is due."""
    valid = self._metrics(self.rstate, 'valid')
    value = self.rule.value(valid)
    improved = self.rule.better(value, self.stopping.best_value)
    self.stopping = self.stopping.update(step, value, self.rule, self.config.patience,
                                         self.config.min_improvement)
    # The state is copied to the host only for a checkpoint (a best one, or a due one).
    due = self.ckpt.due(step)
    host_state = parallel.unreplicate(self.rstate) if improved or due else None
    if improved:
      self.ckpt.save_best(step, host_state, self.stopping.to_json(), value)
    last, window = self.progress.last, self.progress.take_window()
    self.writer.evaluation({
        'step': step, 'epoch': step / self.per_epoch, 'train_loss': last['loss'],
        'task_losses': dict(zip(self.data.spec.tasks, last['task_losses'])),
        'tau': last['tau'], 'examples_per_s': self.progress.examples_per_s, 'valid': valid,
        'selection': {'rule': self.rule.rule, 'metric': self.rule.metric, 'value': value},
        'grad': window.record(self.data.spec.tasks), 'grad_steps': window.steps})
    logging.info('eval step %d: valid %s = %s (best %s at step %d)', step, self.rule.metric,
                 value, self.stopping.best_value, self.stopping.best_step)
    if due:
      self.ckpt.save_latest(step, host_state, self.stopping.to_json())
    return Evaluation(step, valid, value, self.stopping)

  def _metrics(self, state: Any, split_name: str) -> dict[str, dict[str, Optional[float]]]:
    """Metrics of a whole split; undefined ones are None (``writers.defined_metrics``)."""
    split = getattr(self.data, split_name)
    probs, core_pred = predict(self.programs, state, split, self.config.eval_batch_size)
    metrics = metrics_lib.evaluate_tasks(split.y, probs, split.core, core_pred,
                                         self.setup.spec.tasks, group=split.group)
    return defined_metrics(metrics, split_name, self.warned)

  def _save_latest(self, step: int) -> None:
    self.ckpt.save_latest(step, parallel.unreplicate(self.rstate), self.stopping.to_json())

  def _keep_best(self) -> str:
    """Before a non-finite stop: a best state waiting in memory was checked finite, so it
    is written; returns the last good checkpoint's step for the message."""
    self.ckpt.flush_best()
    latest = self.ckpt.latest_step()
    return 'none' if latest is None else f'step {latest}'

  # --------------------------------------------------------------------------- the end

  def finish(self) -> dict[str, Any]:
    """The last checkpoint, then the best one's validation and test metrics.

    Writes ``metrics.json`` (what it returns) and the HParams of TensorBoard.
    """
    host_state = parallel.unreplicate(self.rstate)
    step = int(host_state.step)
    self.ckpt.save_latest(step, host_state, self.stopping.to_json())
    final = self.ckpt.restore_best(host_state)
    final_state = parallel.replicate(final[0]) if final is not None else self.rstate
    config = self.config
    result = {'valid': self._metrics(final_state, 'valid'),
              'test': self._metrics(final_state, 'test'),
              'best_step': self.stopping.best_step, 'steps': step,
              'epochs': step / self.per_epoch,
              'train_seconds': float(self.stopping.train_seconds),
              'stop': 'early_stopping' if self.stopping.stopped else 'cap',
              'final_tau': float(host_state.tau),
              'selection': {'rule': self.rule.rule, 'metric': self.rule.metric,
                            'best_value': self.stopping.best_value}}
    if self.primary:
      run_files.write_metrics(self.workdir, result)
    self.writer.hparams(config, result)
    logging.info('test metrics (best step %d): %s', self.stopping.best_step,
                 json.dumps(result['test']))
    return result


def train_and_evaluate(config, workdir: str, *,
                       on_eval: Optional[Callable[[int, dict], None]] = None
                       ) -> dict[str, Any]:
  """Train, evaluate and test ``config.model`` on ``config.dataset``; see module doc.

  Args:
    config: the experiment config (``htl_jax/configs/*.py``).
    workdir: where checkpoints and metrics go; an existing run there is resumed.
    on_eval: called as ``on_eval(step, valid)`` after every validation evaluation (``valid``
      is ``{task: {metric: value}}``), after the latest checkpoint (when one was due); it
      may raise (e.g. ``optuna.TrialPruned``) to stop the run, and the exception propagates.

  Returns:
    What ``metrics.json`` holds.

  Raises:
    WorkdirBusyError: another process trains in ``workdir``.
    PreemptedError: SIGTERM / SIGINT stopped the run after saving a checkpoint.
  """
  with Run(config, workdir) as run:
    for evaluation in run.evaluations():
      if on_eval is not None:
        on_eval(evaluation.step, evaluation.valid)
    return run.finish()

