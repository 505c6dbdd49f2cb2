"""``train_and_evaluate(config, workdir)``: the whole run, resumable (DESIGN section 8).

Writes to ``workdir``: ``config.json``; ``preprocessing.json`` (what was fitted on train,
:mod:`htl_jax.serve.preprocessing`); ``metrics.jsonl`` (one line per evaluation: train
loss, temperature, examples/s, validation metrics per task, and per task the norm of its
gradient on ``theta_s`` before and after the gradient process with its cosine to the core
task's, the data of the paper's Fig. 5, taken in the train step itself); ``metrics.json``
(``{"valid": {...}, "test": {task: {metric: value}}, "best_step", "steps", "epochs",
"train_seconds"}`` of the best checkpoint); and ``checkpoints/{latest,best}``. A restarted run resumes from the latest
checkpoint and gives the same result as an uninterrupted one. Early stopping after
``patience`` evaluations without improvement of the core task's validation metric.

With several processes (``htl_jax.train.distributed``), every process prepares the same data,
feeds its part of each global batch and evaluates its part of each evaluation batch (the
predictions are gathered, so every row is evaluated once); all of them take part in the
orbax checkpoints, and only the primary process writes ``config.json``, ``metrics.jsonl``
and ``metrics.json``.
"""

from __future__ import annotations

import functools
import json
import os
import time
import zlib
from typing import Any, Callable, Iterator, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

from htl_jax import metrics as metrics_lib
from htl_jax.data import load_dataset, pipeline
from htl_jax.data.schema import DataError, HybridData, Split
from htl_jax.losses import CORE_TRANSFORMS, CoreTransform
from htl_jax.models import MODELS, model_class
from htl_jax.serve import preprocessing as serve_preprocessing
from htl_jax.train import malloc, parallel, step as step_lib
from htl_jax.train.checkpoint import Checkpoints
from htl_jax.train.writers import RunWriter, defined_metrics
from htl_jax.train.state import (EMBEDDING_OPTIMIZERS, GRAD_PROCESSES, TrainSetup,
                                  init_state, make_setup, resolve_grad_process)


class ConfigError(ValueError):
  """A config value that cannot work; reported as one line by ``experiments.main``."""


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


def check_config(config) -> None:
  """Reject impossible settings before any data is read."""
  choices = {'model': tuple(MODELS), 'grad_process': GRAD_PROCESSES,
             'head': ('mse', 'ziln'), 'core_transform': CORE_TRANSFORMS,
             'fusion': ('attention', 'concat'), 'embedding_optimizer': EMBEDDING_OPTIMIZERS,
             'feed': ('auto', 'device', 'host')}
  for key, allowed in choices.items():
    if config[key] not in allowed:
      raise ConfigError(f'config.{key}={config[key]!r} is not one of {list(allowed)}')
  for key in ('batch_size', 'eval_batch_size', 'num_epochs', 'eval_every',
              'checkpoint_every', 'tau_decay_steps', 'log_every', 'patience', 'embed_dim'):
    if int(config[key]) < 1:
      raise ConfigError(f'config.{key} must be >= 1, got {config[key]}')
  n = parallel.device_count()
  if config.batch_size % n or config.eval_batch_size % n:
    raise ConfigError(f'batch_size={config.batch_size} and eval_batch_size='
                      f'{config.eval_batch_size} must be divisible by the {n} devices '
                      f'(of all processes)')
  if config.best_metric and config.best_metric not in metrics_lib.CORE_METRICS:
    raise ConfigError(f'config.best_metric must be one of {metrics_lib.CORE_METRICS}')
  _check_model_config(config)


def _check_model_config(config) -> None:
  """Settings that the chosen model cannot take (its class facts)."""
  model = model_class(config.model)
  grad_process = resolve_grad_process(config)
  if model.independent_tasks and grad_process != 'none':
    raise ConfigError(f'config.grad_process={config.grad_process!r} does not apply to '
                      f'model {config.model!r}: its tasks share no parameters (one '
                      'independent model per task); use grad_process=none or auto')
  if config.model == 'ziln' and config.head != 'ziln':
    raise ConfigError("model 'ziln' (single-task ZILN) needs head='ziln', got "
                      f'head={config.head!r}')
  if not config.hidden_dims or min(config.hidden_dims) < 1:
    raise ConfigError(f'config.hidden_dims must be positive layer sizes, got '
                      f'{tuple(config.hidden_dims)}')
  if model.splits_hidden_dims and len(config.hidden_dims) < 2:
    raise ConfigError(f'model {config.model!r} needs at least 2 hidden_dims (shared layers, '
                      f'then the tower layer), got {tuple(config.hidden_dims)}')
  if not 0.0 <= config.alpha <= 1.0:
    raise ConfigError(f'config.alpha (the projection relax factor of Eq. 16) must be in '
                      f'[0, 1], got {config.alpha}')


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'htl_jax')


class Steps(NamedTuple):
  """The compiled, data-parallel steps of one setup (see :func:`compiled_steps`).

  ``train(state, batch)`` and ``train_on_rows(state, epoch_rows, resident)`` leave out
  Fig. 5's per-task diagnostics, which a run without a gradient process takes only at
  evaluations, through the ``diagnosed`` variants: a second program rather than a
  ``lax.cond`` in one, because XLA:CPU pays for an untaken branch (MMoE: 29 ms a step with
  the cond, 22 ms without). With a gradient process the diagnostics come free, and each
  ``diagnosed`` variant is the same program as its plain one.
  """

  train: Callable[..., Any]
  train_diagnosed: Callable[..., Any]
  train_on_rows: Callable[..., Any]
  train_on_rows_diagnosed: Callable[..., Any]
  evaluate: Callable[..., Any]


@functools.lru_cache(maxsize=16)
def compiled_steps(setup: TrainSetup) -> Steps:
  """The data-parallel steps of ``setup``, each compiled once, at its first call."""
  def pmapped(step_fn, with_diagnostics: bool):
    return parallel.pmap_step(functools.partial(step_fn, setup,
                                                with_diagnostics=with_diagnostics))

  train = pmapped(step_lib.train_step, False)
  on_rows = pmapped(step_lib.train_step_on_rows, False)
  free = setup.balance is not None        # diagnostics come with the gradient process
  return Steps(train=train,
               train_diagnosed=train if free else pmapped(step_lib.train_step, True),
               train_on_rows=on_rows,
               train_on_rows_diagnosed=(on_rows if free else
                                        pmapped(step_lib.train_step_on_rows, True)),
               evaluate=parallel.pmap_gathered(functools.partial(step_lib.eval_step, setup)))


# feed='auto' keeps the training split on the devices up to this many bytes.
RESIDENT_SPLIT_LIMIT = 1 << 30


def resolve_feed(config, train: Split) -> str:
  """``config.feed`` with 'auto' resolved: 'device' when the training split's arrays fit in
  :data:`RESIDENT_SPLIT_LIMIT` bytes, else 'host'."""
  if config.feed != 'auto':
    return config.feed
  size = train.x.nbytes + train.y.nbytes + train.core.nbytes
  return 'device' if size <= RESIDENT_SPLIT_LIMIT else 'host'


# ----------------------------------------------------------------------------- evaluation


def predict(setup: TrainSetup, p_eval, state, split: Split, batch_size: int
            ) -> tuple[np.ndarray, np.ndarray]:
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
  probs, core_pred = predict(setup, p_eval, state, split, batch_size)
  metrics = metrics_lib.evaluate_tasks(split.y, probs, split.core, core_pred,
                                       setup.spec.tasks)
  return defined_metrics(metrics, split_name, warned)


# ----------------------------------------------------------------------------- bookkeeping


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` atomically as strict JSON (NaN or inf raise), from the primary process."""
  if not parallel.is_primary():
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, allow_nan=False)
  os.replace(tmp, path)


def train_batches(data: HybridData, config, start_step: int) -> Iterator[dict]:
  """Endless epochs of shuffled training batches (this process's part), from ``start_step``."""
  per_epoch = pipeline.num_batches(len(data.train), config.batch_size, drop_remainder=True)
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    for i, batch in enumerate(pipeline.batches(data.train, config.batch_size, shuffle=True,
                                               seed=config.seed, epoch=epoch,
                                               drop_remainder=True,
                                               part=parallel.process_part())):
      if i >= skip:
        yield batch
    epoch, skip = epoch + 1, 0


def epoch_rows(data: HybridData, config, epoch: int) -> np.ndarray:
  """``[local devices, steps per epoch, B / devices]``: the rows of every batch of an epoch
  that each local device trains on (the same rows :func:`train_batches` gathers)."""
  rows = np.stack([index for index, _ in pipeline.batch_rows(
      len(data.train), config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
      drop_remainder=True, part=parallel.process_part())])
  n = parallel.local_device_count()
  return rows.reshape(rows.shape[0], n, -1).transpose(1, 0, 2)


def _feeder(data: HybridData, config, setup: TrainSetup, start_step: int
            ) -> Callable[[Any, int, bool], tuple[Any, dict]]:
  """``train(state, step, diagnosed) -> (state, metrics)``: one training step, fed.

  ``feed='host'``: each batch gathered on the host and put on the devices two steps ahead.
  ``feed='device'``: the training split stays on every device; each epoch's row numbers go
  there once (:func:`epoch_rows`) and each step gathers its own batch.
  """
  steps = compiled_steps(setup)
  if resolve_feed(config, data.train) == 'host':
    batches = parallel.prefetch(train_batches(data, config, start_step))

    def train_on_host_batches(state, step: int, diagnosed: bool):
      fn = steps.train_diagnosed if diagnosed else steps.train
      return fn(state, next(batches))

    return train_on_host_batches
  resident = parallel.put_replicated(step_lib.resident_split(data.train))
  per_epoch = pipeline.num_batches(len(data.train), config.batch_size, drop_remainder=True)
  current: dict[int, Any] = {}

  def train_on_device_rows(state, step: int, diagnosed: bool):
    epoch = step // per_epoch
    if epoch not in current:
      current.clear()
      current[epoch] = parallel.put_sharded(epoch_rows(data, config, epoch))
    fn = steps.train_on_rows_diagnosed if diagnosed else steps.train_on_rows
    return fn(state, current[epoch], resident)

  return train_on_device_rows


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


def _grad_record(tasks, metrics: dict) -> dict[str, dict[str, float]]:
  """Fig. 5's data from a train step's metrics (first device's copy, host numpy)."""
  return {t: {'norm': float(metrics['task_grad_norm'][0][i]),
              'norm_processed': float(metrics['task_grad_norm_processed'][0][i]),
              'cos_core': float(metrics['task_grad_cos_core'][0][i])}
          for i, t in enumerate(tasks)}


def _check_finite(pending: list[tuple[int, dict]], ckpt: Checkpoints) -> Optional[dict]:
  """Raise on the first non-finite step among ``pending``; return the last metrics."""
  finite = jax.device_get([m['finite'] for _, m in pending])   # one transfer for all
  for (step, m), ok in zip(pending, finite):
    if not bool(np.all(ok)):
      raise NonFiniteError(
          f'non-finite loss or gradient at step {step} '
          f'(loss={float(jax.device_get(m["loss"])[0])}); '
          f'training stopped, last good checkpoint: step {ckpt.latest_step()}')
  return jax.device_get(pending[-1][1]) if pending else None


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config, workdir: str, *,
                       on_eval: Optional[Callable[[int, dict], None]] = None
                       ) -> dict[str, Any]:
  """Train, evaluate and test ``config.model`` on ``config.dataset``; see module doc.

  Args:
    config: the experiment config (``configs/*.py``).
    workdir: where checkpoints and metrics go; an existing run there is resumed.
    on_eval: called as ``on_eval(step, valid)`` after every validation evaluation (``valid``
      is ``{task: {metric: value}}``), once the latest checkpoint is saved; it may raise
      (e.g. ``optuna.TrialPruned``) to stop the run, and the exception propagates.

  Returns:
    What ``metrics.json`` holds.
  """
  check_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is an existing file, not a directory')
  malloc.keep_scratch_memory()      # reuse XLA:CPU's per-step scratch (see malloc.py)
  data = load_dataset(config, config.cache_dir or default_cache_dir())
  _check_same_data(data)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))
  spec = data.spec
  setup = make_setup(config, spec, CoreTransform.fit(config.core_transform, data.train.core))
  if parallel.is_primary():
    serve_preprocessing.save_for_run(workdir, config, data, setup.objective.core_transform)
  per_epoch = pipeline.num_batches(len(data.train), config.batch_size, drop_remainder=True)
  if per_epoch < 1:
    raise ConfigError(f'the train split has {len(data.train)} rows, fewer than '
                      f'batch_size={config.batch_size}')
  total_steps = int(config.max_steps) or int(config.num_epochs) * per_epoch
  best_metric = config.best_metric or 'nrmse'
  lower_better = best_metric in metrics_lib.LOWER_IS_BETTER
  ckpt = Checkpoints(workdir, 'min' if lower_better else 'max')

  state = init_state(setup, config)
  loop = {'best_value': None, 'best_step': 0, 'bad_evals': 0, 'stopped_early': False,
          'train_seconds': 0.0}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, loop = restored
    loop.setdefault('train_seconds', 0.0)
    logging.info('resumed from step %d', int(state.step))
  start = int(state.step)
  writer = RunWriter(workdir, start, total_steps, primary=parallel.is_primary())
  warned: set = set()
  logging.info('%s on %s: %d train / %d valid / %d test rows, %d fields, tasks %s, '
               '%d steps (%d per epoch), %d device(s) in %d process(es), gradient process: %s '
               '(%s path)',
               config.model, config.dataset, len(data.train), len(data.valid),
               len(data.test), spec.num_fields, spec.tasks, total_steps, per_epoch,
               parallel.device_count(), parallel.process_count(), setup.grad_process, setup.grad_path)

  p_eval = compiled_steps(setup).evaluate
  train = _feeder(data, config, setup, start)
  rstate = parallel.replicate(state)
  del state

  pending: list[tuple[int, dict]] = []
  window_start, window_steps = time.perf_counter(), 0
  examples_per_s = 0.0
  step = start
  stop = loop['stopped_early'] or step >= total_steps
  train_start = time.perf_counter()
  while not stop:
    is_eval = (step + 1) % config.eval_every == 0 or step + 1 == total_steps
    rstate, m = train(rstate, step, is_eval)
    step += 1
    window_steps += 1
    pending.append((step, m))
    if step % config.log_every == 0 or is_eval or step % config.checkpoint_every == 0:
      last = _check_finite(pending, ckpt)
      pending = []
      elapsed = time.perf_counter() - window_start
      examples_per_s = window_steps * config.batch_size / max(elapsed, 1e-9)
      writer.progress(step, float(last['loss'][0]), float(last['tau'][0]), examples_per_s)
      window_start, window_steps = time.perf_counter(), 0
    if is_eval:
      loop['train_seconds'] += time.perf_counter() - train_start
      host_state = parallel.unreplicate(rstate)
      valid = evaluate(setup, p_eval, rstate, data.valid, config.eval_batch_size, 'valid',
                       warned)
      value = valid[spec.core_task][best_metric]
      improved = value is not None and (loop['best_value'] is None or (
          value < loop['best_value'] if lower_better else value > loop['best_value']))
      if improved:
        loop.update(best_value=float(value), best_step=step, bad_evals=0)
        ckpt.save_best(step, host_state, loop, value)
      elif value is not None:        # an undefined value neither improves nor counts
        loop['bad_evals'] += 1
      loop['stopped_early'] = loop['bad_evals'] >= config.patience
      writer.evaluation({'step': step, 'epoch': step / per_epoch, 'train_loss': float(last['loss'][0]),
                 'task_losses': dict(zip(spec.tasks, map(float, last['task_losses'][0]))),
                 'tau': float(last['tau'][0]), 'examples_per_s': examples_per_s,
                 'valid': valid, 'grad': _grad_record(spec.tasks, last)})
      logging.info('eval step %d: valid %s %s = %s (best %s at step %d)', step,
                   spec.core_task, best_metric, value, loop['best_value'], loop['best_step'])
      ckpt.save_latest(step, host_state, loop)
      if on_eval is not None:
        on_eval(step, valid)
      stop = loop['stopped_early']
      if stop:
        logging.info('early stopping at step %d: no improvement in %d evaluations', step,
                     config.patience)
      window_start = train_start = time.perf_counter()
    elif step % config.checkpoint_every == 0:
      ckpt.save_latest(step, parallel.unreplicate(rstate), loop)
    stop = stop or step >= total_steps
  if pending:
    _check_finite(pending, ckpt)
  if step > start:
    ckpt.save_latest(step, parallel.unreplicate(rstate), loop)

  final = ckpt.restore_best(parallel.unreplicate(rstate))
  final_state = parallel.replicate(final[0]) if final is not None else rstate
  result = {'valid': evaluate(setup, p_eval, final_state, data.valid, config.eval_batch_size,
                              'valid', warned),
            'test': evaluate(setup, p_eval, final_state, data.test, config.eval_batch_size,
                             'test', warned),
            'best_step': loop['best_step'], 'steps': step, 'epochs': step / per_epoch,
            'train_seconds': float(loop['train_seconds'])}
  write_json(os.path.join(workdir, 'metrics.json'), result)
  writer.close()
  ckpt.close()
  logging.info('test metrics (best step %d): %s', loop['best_step'], json.dumps(result['test']))
  return result
