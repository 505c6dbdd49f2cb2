"""``train_and_evaluate(config, workdir)``: the whole run, resumable (docs/design.md).

Writes the run's files into ``workdir`` (:mod:`htl_jax.train.run_files`): ``config.json``,
``preprocessing.json``, ``metrics.jsonl`` (one line per evaluation: train loss, temperature,
examples/s, validation metrics per task, and the per-task gradient norms on ``theta_s``
before and after the gradient process with their cosine to the core task's, the data of the
paper's Fig. 5), ``metrics.json`` (the best checkpoint's metrics),
``checkpoints/{latest,best}`` and TensorBoard events (the same numbers, and at the end the
config next to the final metrics for the HParams tab). A restarted run resumes from the
latest checkpoint and gives the same result as an uninterrupted one. Early stopping after
``patience`` evaluations without improvement of the core task's model-selection metric
(:func:`htl_jax.metrics.selection_metric`).

With several processes (``htl_jax.train.distributed``), every process prepares the same data,
feeds its part of each global batch and evaluates its part of each evaluation batch (the
predictions are gathered, so every row is evaluated once); all of them take part in the
orbax checkpoints, and only the primary process writes the JSON files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import zlib
from typing import Any, Callable, Optional

from absl import logging
import jax
import numpy as np

from htl_jax import metrics as metrics_lib
from htl_jax.data import default_cache_dir, load_dataset, pipeline
from htl_jax.data.schema import HybridData, Split
from htl_jax.errors import ConfigError, DataError, NonFiniteError, PreemptedError
from htl_jax.losses import CoreTransform
from htl_jax.train import feed as feed_lib
from htl_jax.train import malloc, parallel, preemption, run_files
from htl_jax.train import step as step_lib
from htl_jax.train.checkpoint import Checkpoints
from htl_jax.train.checks import check_config
from htl_jax.train.state import TrainSetup, init_state, make_setup
from htl_jax.train.writers import RunWriter, defined_metrics


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """The loop's model-selection state, saved with every checkpoint.

  Not ``flax.training.early_stopping``: ours has a direction (Gini is maximized), lets an
  undefined value neither improve nor count, and stops after exactly ``patience``
  evaluations without improvement.

  Attributes:
    best_value: the best validation value so far (None before the first defined one).
    best_step: the step of that value's checkpoint.
    bad_evals: evaluations since the last improvement.
    stopped: True once ``bad_evals`` reached the patience.
    train_seconds: training time so far (evaluations excluded), across restarts.
  """

  best_value: Optional[float] = None
  best_step: int = 0
  bad_evals: int = 0
  stopped: bool = False
  train_seconds: float = 0.0

  def update(self, step: int, value: Optional[float], metric: metrics_lib.SelectionMetric,
             patience: int) -> 'EarlyStopping':
    """After an evaluation: improved (new best), or one more bad evaluation."""
    if metric.better(value, self.best_value):
      return dataclasses.replace(self, best_value=float(value), best_step=step, bad_evals=0)
    if value is None:          # an undefined value neither improves nor counts
      return self
    bad = self.bad_evals + 1
    return dataclasses.replace(self, bad_evals=bad, stopped=bad >= patience)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'EarlyStopping':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- evaluation


def predict(p_eval, state, split: Split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Binary probabilities ``[N, T]`` and core predictions ``[N]`` of a whole split.

  Each process predicts its part of each batch; ``p_eval`` gathers the parts.
  """
  probs, core = [], []
  for batch in pipeline.batches(split, batch_size, shuffle=False, seed=0, epoch=0,
                                drop_remainder=False, part=parallel.process_part()):
    out = parallel.unreplicate(p_eval(state, parallel.shard(batch)))
    keep = out['weight'] > 0
    probs.append(out['probs'][keep])
    core.append(out['core'][keep])
  return np.concatenate(probs), np.concatenate(core)


def evaluate(setup: TrainSetup, p_eval, state, split: Split, batch_size: int,
             split_name: str, warned: set) -> dict[str, dict[str, Optional[float]]]:
  """Metrics of a whole split; undefined ones are ``None`` (see ``writers.defined_metrics``)."""
  probs, core_pred = predict(p_eval, state, split, batch_size)
  metrics = metrics_lib.evaluate_tasks(split.y, probs, split.core, core_pred,
                                       setup.spec.tasks)
  return defined_metrics(metrics, split_name, warned)


# ----------------------------------------------------------------------------- bookkeeping


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


def _check_window(pending: list[tuple[Any, dict]], ckpt: Checkpoints, window: '_Window'
                  ) -> dict[str, Any]:
  """One host transfer of the dispatches since the last log: raise on the first
  non-finite step, add the diagnostics to ``window``, return the last step's loss, task
  losses and temperature."""
  host = jax.device_get([m for _, m in pending])
  for (dispatch, _), m in zip(pending, host):
    finite = np.asarray(m['finite'])[:, :dispatch.num_steps]
    if not bool(np.all(finite)):
      bad = dispatch.first + 1 + int(np.argmin(np.all(finite, axis=0)))
      ckpt.flush_best()          # a best state waiting in memory was checked finite: keep it
      latest = ckpt.latest_step()
      raise NonFiniteError(
          f'non-finite loss or gradient at step {bad}; training stopped, last good '
          f'checkpoint: {"none" if latest is None else f"step {latest}"}')
    if dispatch.diagnosed:
      window.add(m, dispatch.num_steps)
  dispatch, m = pending[-1][0], host[-1]
  i = dispatch.num_steps - 1
  return {'loss': float(m['loss'][0][i]), 'tau': float(m['tau'][0][i]),
          'task_losses': [float(v) for v in m['task_losses'][0][i]]}


def _prepare(config, workdir: str) -> tuple[HybridData, TrainSetup]:
  """Checks, data and the static setup; nothing is written yet."""
  check_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is an existing file, not a directory')
  if parallel.platform() == 'cpu':
    malloc.keep_scratch_memory()    # reuse XLA:CPU's per-step scratch (see malloc.py)
  data = load_dataset(config, config.cache_dir or default_cache_dir())
  _check_same_data(data)
  if feed_lib.steps_per_epoch(data, config) < 1:
    raise ConfigError(f'the train split has {len(data.train)} rows, fewer than '
                      f'batch_size={config.batch_size}')
  setup = make_setup(config, data.spec,
                     CoreTransform.fit(config.core_transform, data.train.core))
  return data, setup


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config, workdir: str, *,
                       on_eval: Optional[Callable[[int, dict], None]] = None
                       ) -> dict[str, Any]:
  """Train, evaluate and test ``config.model`` on ``config.dataset``; see module doc.

  Args:
    config: the experiment config (``htl_jax/configs/*.py``).
    workdir: where checkpoints and metrics go; an existing run there is resumed.
    on_eval: called as ``on_eval(step, valid)`` after every validation evaluation (``valid``
      is ``{task: {metric: value}}``), after the latest checkpoint (when one was due); it may raise
      (e.g. ``optuna.TrialPruned``) to stop the run, and the exception propagates.

  Returns:
    What ``metrics.json`` holds.

  Raises:
    WorkdirBusyError: another process trains in ``workdir``.
    PreemptedError: SIGTERM / SIGINT stopped the run after saving a checkpoint.
  """
  data, setup = _prepare(config, workdir)
  primary = parallel.is_primary()
  with (run_files.owned(workdir) if primary else contextlib.nullcontext()), \
      preemption.watch():
    if primary:
      run_files.write_config(workdir, config)
      run_files.save_run_preprocessing(workdir, config, data, setup.objective.core_transform)
    return _train(config, workdir, data, setup, on_eval)


@dataclasses.dataclass
class _Window:
  """Fig. 5's per-task diagnostics summed over the steps since the last evaluation."""

  sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  steps: int = 0

  def add(self, metrics: dict, num_steps: int) -> None:
    """Adds the first ``num_steps`` steps of a dispatch's metrics (host, first device)."""
    for key in DIAGNOSTICS:
      if key in metrics:
        values = np.asarray(metrics[key][0][:num_steps], np.float64)
        self.sums[key] = self.sums.get(key, 0.0) + values.sum(axis=0)
    self.steps += num_steps

  def record(self, tasks) -> dict[str, dict[str, float]]:
    """Per task, the window's means (``metrics.jsonl``'s ``grad``); empty without steps."""
    if not self.steps:
      return {}
    names = {'task_grad_norm': 'norm', 'task_grad_norm_processed': 'norm_processed',
             'task_grad_cos_core': 'cos_core', 'eq16_fired': 'eq16_share',
             'eq17_factor': 'eq17_factor'}
    return {t: {names[k]: float(v[i] / self.steps) for k, v in self.sums.items()}
            for i, t in enumerate(tasks)}


# The per-step diagnostics of a train step's metrics (gradient_path._diagnostics).
DIAGNOSTICS = ('task_grad_norm', 'task_grad_norm_processed', 'task_grad_cos_core',
               'eq16_fired', 'eq17_factor')


class _Programs:
  """The compiled programs of one run, compiled (or loaded) before its first timed step."""

  def __init__(self, steps: step_lib.Steps, feeder: feed_lib.Feeder, rstate: Any,
               max_steps: int, diagnosed: bool, eval_example: dict):
    count = np.ones(parallel.local_device_count(), np.int32)
    self.train = self.diagnosed = None
    if feeder.has_dispatches:
      source = feeder.example_source()
      self.train = steps.compiled(steps.train(feeder.mode, max_steps), rstate, source, count)
      self.diagnosed = (steps.compiled(steps.train(feeder.mode, max_steps, True), rstate,
                                       source, count) if diagnosed else self.train)
    self.evaluate = steps.compiled(steps.evaluate, rstate, eval_example)

  def run(self, rstate: Any, dispatch: feed_lib.Dispatch, source: Any) -> tuple[Any, dict]:
    fn = self.diagnosed if dispatch.diagnosed else self.train
    return fn(rstate, source, np.full(parallel.local_device_count(), dispatch.num_steps,
                                      np.int32))


def _eval_example(split: Split, batch_size: int) -> dict:
  """The first evaluation batch of ``split``, sharded: the shapes of every one."""
  batch = next(pipeline.batches(split, batch_size, shuffle=False, seed=0, epoch=0,
                                drop_remainder=False, part=parallel.process_part()))
  return parallel.shard(batch)


def _train(config, workdir: str, data: HybridData, setup: TrainSetup,
           on_eval: Optional[Callable[[int, dict], None]]) -> dict[str, Any]:
  """The loop of :func:`train_and_evaluate`, in an owned workdir."""
  spec = data.spec
  per_epoch = feed_lib.steps_per_epoch(data, config)
  total_steps = int(config.max_steps) or int(config.num_epochs) * per_epoch
  metric = metrics_lib.selection_metric(config)
  # Several processes write every checkpoint together: each must make the same choice, so
  # no clock decides there.
  ckpt = Checkpoints(workdir, metric.mode, min_seconds=(
      config.checkpoint_seconds if parallel.process_count() == 1 else 0))
  writer = None
  try:
    state = init_state(setup, config)
    stopping = EarlyStopping()
    restored = ckpt.restore_latest(state)
    if restored is not None:
      # The config's hyperparameters win over the checkpoint's (a resumed run may change
      # them on purpose; the same config resumes the same run).
      state = restored[0].replace(hparams=state.hparams)
      stopping = EarlyStopping.from_json(restored[1])
      logging.info('resumed from step %d', int(state.step))
    start = int(state.step)
    writer = RunWriter(workdir, start, total_steps, primary=parallel.is_primary())
    logging.info('%s on %s: %d train / %d valid / %d test rows, %d fields, tasks %s, '
                 '%d steps (%d per epoch), %d device(s) in %d process(es), gradient '
                 'process: %s (%s path)', config.model, config.dataset, len(data.train),
                 len(data.valid), len(data.test), spec.num_fields, spec.tasks, total_steps,
                 per_epoch, parallel.device_count(), parallel.process_count(),
                 setup.grad_process, setup.grad_path)
    # One step per dispatch with several processes: JAX's preemption sync sees every step.
    max_steps = 1 if parallel.process_count() > 1 else int(config.steps_per_dispatch)
    at_eval = setup.grad_process == 'none' and config.grad_diagnostics == 'eval'
    dispatches = list(feed_lib.schedule(config, start, total_steps, per_epoch, max_steps,
                                        at_eval))
    feeder = feed_lib.Feeder(data, config, dispatches, max_steps)
    rstate = parallel.replicate(state)
    del state
    programs = _Programs(step_lib.compiled_steps(setup), feeder, rstate, max_steps,
                         at_eval or config.grad_diagnostics == 'every_step',
                         _eval_example(data.valid, config.eval_batch_size))
    warned: set = set()            # undefined metrics warned about once per run
    rstate, stopping = _loop(config, workdir, data, setup, feeder, programs, rstate,
                             stopping, ckpt, writer, metric, total_steps, per_epoch, on_eval,
                             warned)
    result = _final(config, workdir, data, setup, programs, rstate, stopping, ckpt, warned)
    writer.hparams(config, result)
  finally:
    if writer is not None:
      writer.close()
    ckpt.close()
  logging.info('test metrics (best step %d): %s', stopping.best_step,
               json.dumps(result['test']))
  return result


def _loop(config, workdir, data, setup, feeder, programs, rstate, stopping, ckpt, writer,
          metric, total_steps, per_epoch, on_eval, warned):
  """Dispatches until the last step, an early stop or a stop request (module docstring)."""
  spec = data.spec
  pending: list[tuple[feed_lib.Dispatch, dict]] = []
  window = _Window()
  last = None
  window_start, window_steps = time.perf_counter(), 0
  examples_per_s = 0.0
  train_start = time.perf_counter()
  if stopping.stopped:
    return rstate, stopping
  for dispatch, source in feeder:
    rstate, m = programs.run(rstate, dispatch, source)
    step = dispatch.last
    window_steps += dispatch.num_steps
    pending.append((dispatch, m))
    is_eval = feed_lib.is_eval_step(step, config, total_steps)
    stop_signal = preemption.stop_requested(step)
    if step % config.log_every == 0 or is_eval or stop_signal:
      last = _check_window(pending, ckpt, window)
      pending = []
      elapsed = time.perf_counter() - window_start
      examples_per_s = window_steps * config.batch_size / max(elapsed, 1e-9)
      writer.progress(step, last['loss'], last['tau'], examples_per_s)
      window_start, window_steps = time.perf_counter(), 0
    if stop_signal:
      stopping = dataclasses.replace(
          stopping, train_seconds=stopping.train_seconds + time.perf_counter() - train_start)
      ckpt.save_latest(step, parallel.unreplicate(rstate), stopping.to_json())
      raise PreemptedError(f'{stop_signal}: stopped after step {step} with a checkpoint in '
                           f'{workdir}; run the same command again to resume')
    if is_eval:
      stopping = dataclasses.replace(
          stopping, train_seconds=stopping.train_seconds + time.perf_counter() - train_start)
      valid = evaluate(setup, programs.evaluate, rstate, data.valid, config.eval_batch_size,
                       'valid', warned)
      value = metric.value(valid)
      improved = metric.better(value, stopping.best_value)
      stopping = stopping.update(step, value, metric, config.patience)
      # The state is copied to the host only for a checkpoint (a best one, or a due one).
      due = ckpt.due()
      host_state = parallel.unreplicate(rstate) if improved or due else None
      if improved:
        ckpt.save_best(step, host_state, stopping.to_json(), value)
      writer.evaluation({
          'step': step, 'epoch': step / per_epoch, 'train_loss': last['loss'],
          'task_losses': dict(zip(spec.tasks, last['task_losses'])), 'tau': last['tau'],
          'examples_per_s': examples_per_s, 'valid': valid,
          'grad': window.record(spec.tasks), 'grad_steps': window.steps})
      window = _Window()
      logging.info('eval step %d: valid %s %s = %s (best %s at step %d)', step,
                   spec.core_task, metric.name, value, stopping.best_value,
                   stopping.best_step)
      if due:
        ckpt.save_latest(step, host_state, stopping.to_json())
      if on_eval is not None:
        on_eval(step, valid)
      if stopping.stopped:
        logging.info('early stopping at step %d: no improvement in %d evaluations', step,
                     config.patience)
        break
      window_start = train_start = time.perf_counter()
    elif step % config.checkpoint_every == 0 and ckpt.due():
      ckpt.save_latest(step, parallel.unreplicate(rstate), stopping.to_json())
  if pending:
    _check_window(pending, ckpt, window)
  return rstate, stopping


def _final(config, workdir, data, setup, programs, rstate, stopping, ckpt, warned
           ) -> dict[str, Any]:
  """The last checkpoint, then the best one's validation and test metrics."""
  host_state = parallel.unreplicate(rstate)
  step = int(host_state.step)
  ckpt.save_latest(step, host_state, stopping.to_json())
  final = ckpt.restore_best(host_state)
  final_state = parallel.replicate(final[0]) if final is not None else rstate
  per_epoch = feed_lib.steps_per_epoch(data, config)
  result = {'valid': evaluate(setup, programs.evaluate, final_state, data.valid,
                              config.eval_batch_size, 'valid', warned),
            'test': evaluate(setup, programs.evaluate, final_state, data.test,
                             config.eval_batch_size, 'test', warned),
            'best_step': stopping.best_step, 'steps': step, 'epochs': step / per_epoch,
            'train_seconds': float(stopping.train_seconds)}
  if parallel.is_primary():
    run_files.write_metrics(workdir, result)
  return result
