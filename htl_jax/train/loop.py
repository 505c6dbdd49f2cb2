"""``train_and_evaluate(config, workdir)``: the whole run, resumable (DESIGN section 8).

Writes to ``workdir``: ``config.json``; ``metrics.jsonl`` (one line per evaluation: train
loss, temperature, examples/s, validation metrics per task, and per-task gradient norms of
the shared embedding with their cosine to the core task's, the data of the paper's Fig. 5);
``metrics.json`` (``{"valid": {...}, "test": {task: {metric: value}}}`` of the best
checkpoint); and ``checkpoints/{latest,best}``. A restarted run resumes from the latest
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
from typing import Any, Iterator, Optional

from absl import logging
import jax
import numpy as np

from htl_jax import metrics as metrics_lib
from htl_jax.data import load_dataset, pipeline
from htl_jax.data.schema import DataError, HybridData, Split
from htl_jax.models import MODELS
from htl_jax.models.heads import CORE_TRANSFORMS, CoreTransform
from htl_jax.train import malloc, parallel, step as step_lib
from htl_jax.train.checkpoint import Checkpoints
from htl_jax.train.state import GRAD_PROCESSES, TrainSetup, init_state, make_setup


class ConfigError(ValueError):
  """A config value that cannot work; reported as one line by ``experiments.main``."""


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


def check_config(config) -> None:
  """Reject impossible settings before any data is read."""
  choices = {'model': tuple(MODELS), 'grad_process': GRAD_PROCESSES,
             'head': ('mse', 'ziln'), 'core_transform': CORE_TRANSFORMS,
             'fusion': ('attention', 'concat')}
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


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'htl_jax')


@functools.lru_cache(maxsize=16)
def compiled_steps(setup: TrainSetup):
  """Data-parallel train, eval and diagnostic steps of ``setup`` (compiled once per setup)."""
  return (parallel.pmap_step(functools.partial(step_lib.train_step, setup)),
          parallel.pmap_gathered(functools.partial(step_lib.eval_step, setup)),
          parallel.pmap_step(functools.partial(step_lib.diagnostic_step, setup), False))


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


def evaluate(setup: TrainSetup, p_eval, state, split: Split, batch_size: int
             ) -> dict[str, dict[str, float]]:
  probs, core_pred = predict(setup, p_eval, state, split, batch_size)
  return metrics_lib.evaluate_tasks(split.y, probs, split.core, core_pred, setup.spec.tasks)


# ----------------------------------------------------------------------------- bookkeeping


class MetricsLog:
  """``metrics.jsonl``, truncated to the resumed step so a restart writes no duplicates.

  Only the primary process writes it; elsewhere :meth:`write` does nothing.
  """

  def __init__(self, path: str, resume_step: int):
    self.path = path if parallel.is_primary() else None
    if self.path is None:
      return
    lines = []
    if os.path.exists(path):
      with open(path) as f:
        lines = [line for line in f if line.strip()
                 and json.loads(line).get('step', 0) <= resume_step]
    with open(path, 'w') as f:
      f.writelines(lines)

  def write(self, record: dict[str, Any]) -> None:
    if self.path is None:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically, from the primary process only."""
  if not parallel.is_primary():
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def train_batches(data: HybridData, config, start_step: int) -> Iterator[dict]:
  """Endless epochs of shuffled training batches, starting at ``start_step``."""
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


def _grad_record(tasks, diag) -> dict[str, dict[str, float]]:
  norms = parallel.unreplicate(diag['grad_norm'])
  cosines = parallel.unreplicate(diag['grad_cos_core'])
  return {t: {'norm': float(n), 'cos_core': float(c)}
          for t, n, c in zip(tasks, norms, cosines)}


def _check_finite(pending: list[tuple[int, dict]], ckpt: Checkpoints) -> Optional[dict]:
  """Raise on the first non-finite step among ``pending``; return the last metrics."""
  last = None
  for step, m in pending:
    m = jax.device_get(m)
    if not bool(np.all(m['finite'])):
      raise NonFiniteError(
          f'non-finite loss or gradient at step {step} (loss={float(m["loss"][0])}); '
          f'training stopped, last good checkpoint: step {ckpt.latest_step()}')
    last = m
  return last


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Train, evaluate and test ``config.model`` on ``config.dataset``; see module doc."""
  check_config(config)
  malloc.keep_scratch_memory()      # reuse XLA:CPU's per-step scratch (see malloc.py)
  data = load_dataset(config, config.cache_dir or default_cache_dir())
  _check_same_data(data)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))
  spec = data.spec
  setup = make_setup(config, spec, CoreTransform.fit(config.core_transform, data.train.core))
  per_epoch = pipeline.num_batches(len(data.train), config.batch_size, drop_remainder=True)
  if per_epoch < 1:
    raise ConfigError(f'the train split has {len(data.train)} rows, fewer than '
                      f'batch_size={config.batch_size}')
  total_steps = int(config.max_steps) or int(config.num_epochs) * per_epoch
  best_metric = config.best_metric or 'nrmse'
  lower_better = best_metric in metrics_lib.LOWER_IS_BETTER
  ckpt = Checkpoints(workdir, 'min' if lower_better else 'max')

  state = init_state(setup, config)
  loop = {'best_value': None, 'best_step': 0, 'bad_evals': 0, 'stopped_early': False}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, loop = restored
    logging.info('resumed from step %d', int(state.step))
  start = int(state.step)
  log = MetricsLog(os.path.join(workdir, 'metrics.jsonl'), start)
  logging.info('%s on %s: %d train / %d valid / %d test rows, %d fields, tasks %s, '
               '%d steps (%d per epoch), %d device(s) in %d process(es), gradient path: %s',
               config.model, config.dataset, len(data.train), len(data.valid),
               len(data.test), spec.num_fields, spec.tasks, total_steps, per_epoch,
               parallel.device_count(), parallel.process_count(), setup.grad_path)

  p_train, p_eval, p_diag = compiled_steps(setup)
  rstate = parallel.replicate(state)
  del state

  pending: list[tuple[int, dict]] = []
  window_start, window_steps = time.perf_counter(), 0
  examples_per_s = 0.0
  step = start
  batch = None
  stop = loop['stopped_early'] or step >= total_steps
  batch_iter = train_batches(data, config, start)
  while not stop:
    batch = parallel.shard(next(batch_iter))
    rstate, m = p_train(rstate, batch)
    step += 1
    window_steps += 1
    pending.append((step, m))
    is_eval = step % config.eval_every == 0 or step == total_steps
    if step % config.log_every == 0 or is_eval or step % config.checkpoint_every == 0:
      last = _check_finite(pending, ckpt)
      pending = []
      elapsed = time.perf_counter() - window_start
      examples_per_s = window_steps * config.batch_size / max(elapsed, 1e-9)
      logging.info('step %d/%d  loss %.4f  tau %.3g  %.0f examples/s', step, total_steps,
                   float(last['loss'][0]), float(last['tau'][0]), examples_per_s)
      window_start, window_steps = time.perf_counter(), 0
    if is_eval:
      host_state = parallel.unreplicate(rstate)
      valid = evaluate(setup, p_eval, rstate, data.valid, config.eval_batch_size)
      value = valid[spec.core_task][best_metric]
      improved = loop['best_value'] is None or (
          value < loop['best_value'] if lower_better else value > loop['best_value'])
      if improved:
        loop.update(best_value=float(value), best_step=step, bad_evals=0)
        ckpt.save_best(step, host_state, loop, value)
      else:
        loop['bad_evals'] += 1
      loop['stopped_early'] = loop['bad_evals'] >= config.patience
      diag = p_diag(rstate, batch)
      log.write({'step': step, 'epoch': step / per_epoch, 'train_loss': float(last['loss'][0]),
                 'task_losses': dict(zip(spec.tasks, map(float, last['task_losses'][0]))),
                 'tau': float(last['tau'][0]), 'examples_per_s': examples_per_s,
                 'valid': valid, 'grad': _grad_record(spec.tasks, diag)})
      logging.info('eval step %d: valid %s %s = %.4f (best %.4f at step %d)', step,
                   spec.core_task, best_metric, value, loop['best_value'], loop['best_step'])
      ckpt.save_latest(step, host_state, loop)
      stop = loop['stopped_early']
      if stop:
        logging.info('early stopping at step %d: no improvement in %d evaluations', step,
                     config.patience)
      window_start = time.perf_counter()
    elif step % config.checkpoint_every == 0:
      ckpt.save_latest(step, parallel.unreplicate(rstate), loop)
    stop = stop or step >= total_steps
  if pending:
    _check_finite(pending, ckpt)
  if step > start:
    ckpt.save_latest(step, parallel.unreplicate(rstate), loop)

  final = ckpt.restore_best(parallel.unreplicate(rstate))
  final_state = parallel.replicate(final[0]) if final is not None else rstate
  result = {'valid': evaluate(setup, p_eval, final_state, data.valid, config.eval_batch_size),
            'test': evaluate(setup, p_eval, final_state, data.test, config.eval_batch_size),
            'best_step': loop['best_step'], 'steps': step}
  write_json(os.path.join(workdir, 'metrics.json'), result)
  ckpt.close()
  logging.info('test metrics (best step %d): %s', loop['best_step'], json.dumps(result['test']))
  return result
