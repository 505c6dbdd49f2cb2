"""A run's files: what a workdir holds, written by training and read by serving and reports.

One home for their names and formats; :func:`htl_jax.train.loop.train_and_evaluate` writes
them and :mod:`htl_jax.serve` and :mod:`htl_jax.repro` read them:

- ``config.json``: the run's config (:func:`write_config`, :func:`load_config`);
- ``preprocessing.json``: what was fitted on the training rows (:class:`Preprocessing`);
- ``metrics.jsonl``: one line per evaluation (:mod:`htl_jax.train.writers`);
- ``metrics.json``: the best checkpoint's metrics, the mark of a finished run
  (:func:`finished_metrics`);
- ``checkpoints/{latest,best}`` (:mod:`htl_jax.train.checkpoint`);
- ``.lock``: one owner per workdir (:func:`owned`): the process that trains there holds an
  exclusive ``flock`` on it, which the operating system releases with the process (kill -9
  and a lost machine included), so a holder that died never blocks the restart.

Every JSON file is written atomically (a temporary name, then a rename) as strict JSON (NaN
or inf raise), so a reader never sees a partial or invalid file.

``preprocessing.json`` holds everything needed to turn raw rows into the model's inputs and
its outputs back into predictions, as JSON that round-trips every number exactly::

  {"format": 1,
   "dataset": "kuairand",
   "spec": {"fields": [...], "vocab_sizes": [...], "binary_tasks": [...], "core_task": "..."},
   "core_transform": {"kind": "none", "mean": 0.0, "std": 1.0, "target_mean": 6.9},
   "encoder": {"fields": [
     {"name": "user_id", "type": "categorical", "dtype": "int", "values": [3, 7, ...]},
     {"name": "duration_ms", "type": "numeric", "encoding": "quantile", "num_buckets": 20,
      "edges": [...], "mean": 0.0, "scale": 1.0}, ...]}}

A categorical field's id is ``1 +`` the position of the value in ``values`` (0 = OOV or
null); a numeric field's id follows :class:`htl_jax.data.encoding.NumericField`. The model
predicts the core on the transformed scale; ``core_transform`` maps it back (the eval step
already does, so predictions are on the original scale).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
from typing import Any, Iterator, Mapping, Optional

from absl import logging
import ml_collections

from htl_jax.data.encoding import Encoder
from htl_jax.data.schema import HybridData
from htl_jax.errors import RunError, WorkdirBusyError
from htl_jax.losses import CoreTransform
from htl_jax.spec import HybridSpec

CONFIG = 'config.json'
PREPROCESSING = 'preprocessing.json'
METRICS_LOG = 'metrics.jsonl'
METRICS = 'metrics.json'
CHECKPOINTS = 'checkpoints'
LOCK = '.lock'
PREPROCESSING_FORMAT = 1


def write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically: a temporary name of this process's in the same
  folder, then a rename, so a reader (or a signal) never sees a partial file. THE home of
  atomic writes: every output file of htl-jax is written through here."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """:func:`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str, obj: Any, indent: Optional[int] = 2) -> None:
  """Writes ``obj`` atomically as strict JSON (NaN or inf raise ValueError)."""
  write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


# ----------------------------------------------------------------------------- ownership


@contextlib.contextmanager
def owned(workdir: str) -> Iterator[None]:
  """Holds ``workdir`` for the block: one process trains in a workdir at a time.

  Raises:
    WorkdirBusyError: another live process holds it; the message names the workdir and the
      holder (host and pid). Nothing of the workdir is touched but its ``.lock`` file.
  """
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
      raise WorkdirBusyError(
          f'{workdir} is in use by {holder}: one run per workdir; wait for it to end, or '
          'give this run another --workdir') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{socket.gethostname()} pid {os.getpid()}\n'.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


# ----------------------------------------------------------------------------- config.json


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_json(os.path.join(workdir, CONFIG), json.loads(config.to_json_best_effort()))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config had (``hidden_dims``); dicts recursively."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from ``<workdir>/config.json`` (tuples restored)."""
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f'{workdir}: no readable {CONFIG} ({type(e).__name__}); is this the '
                   '--workdir of a training run?') from None
  config = ml_collections.ConfigDict(_tuples(stored))
  if 'data' in config and 'passthrough' not in config.data:
    config.data.passthrough = ''     # runs trained before the field existed
  return config


# ----------------------------------------------------------------------------- metrics.json


def write_metrics(workdir: str, result: dict[str, Any]) -> None:
  write_json(os.path.join(workdir, METRICS), result)


def read_metrics(workdir: str) -> dict[str, Any] | None:
  """``metrics.json``'s content, or None while the run has not finished."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def finished_metrics(workdir: str) -> dict[str, Any]:
  """``metrics.json``, the mark of a finished run; RunError when absent."""
  if not os.path.isdir(workdir):
    raise RunError(f'{workdir}: no such directory (--workdir)')
  result = read_metrics(workdir)
  if result is None:
    raise RunError(f'{workdir}: no finished run here (no {METRICS}; train it to the end '
                   'with experiments.main first)')
  return result


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
  """What a run fitted on its training rows, besides the model parameters.

  Attributes:
    dataset: ``config.dataset`` of the run (which loader reads the raw rows).
    spec: fields with their vocabulary sizes, binary tasks in order, core task.
    encoder: per field, the vocabulary or the numeric buckets.
    core_transform: the core target's transform fitted on train.
  """

  dataset: str
  spec: HybridSpec
  encoder: Encoder
  core_transform: CoreTransform

  def to_dict(self) -> dict[str, Any]:
    return {'format': PREPROCESSING_FORMAT, 'dataset': self.dataset,
            'spec': self.spec.to_dict(),
            'core_transform': dataclasses.asdict(self.core_transform),
            'encoder': self.encoder.to_dict()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Preprocessing':
    """Reads :meth:`to_dict`'s output; raises ValueError on another format or a mismatch."""
    if d.get('format') != PREPROCESSING_FORMAT:
      raise ValueError(f'preprocessing format {d.get("format")!r}, expected '
                       f'{PREPROCESSING_FORMAT}')
    spec = HybridSpec.from_dict(d['spec'])
    encoder = Encoder.from_dict(d['encoder'])
    if encoder.names != spec.fields or encoder.vocab_sizes != spec.vocab_sizes:
      raise ValueError('the stored encoder does not match the stored spec')
    transform = d['core_transform']
    return cls(dataset=str(d['dataset']), spec=spec, encoder=encoder,
               core_transform=CoreTransform(str(transform['kind']), float(transform['mean']),
                                            float(transform['std']),
                                            float(transform['target_mean'])))


def save_preprocessing(workdir: str, preprocessing: Preprocessing) -> str:
  """Writes ``<workdir>/preprocessing.json`` atomically; returns its path."""
  path = os.path.join(workdir, PREPROCESSING)
  write_json(path, preprocessing.to_dict(), indent=None)
  return path


def load_preprocessing(workdir: str) -> Preprocessing:
  """The run's stored preprocessing; RunError when absent or unreadable."""
  try:
    with open(os.path.join(workdir, PREPROCESSING)) as f:
      return Preprocessing.from_dict(json.load(f))
  except FileNotFoundError:
    raise RunError(f'{workdir}: no {PREPROCESSING} (the run predates stored '
                   'preprocessing; train it again)') from None
  except (OSError, ValueError, KeyError) as e:
    raise RunError(f'{workdir}: unreadable {PREPROCESSING}: {e}') from None


def save_run_preprocessing(workdir: str, config: Any, data: HybridData,
                           core_transform: CoreTransform) -> None:
  """The trainer's hook: stores the run's preprocessing next to its checkpoints.

  Never stops training: a vocabulary that JSON cannot hold (e.g. dates as categories, which
  no built-in loader produces) is logged and the file is not written.
  """
  if data.encoder is None:
    logging.warning('no fitted encoder with the data; %s not written', PREPROCESSING)
    return
  try:
    save_preprocessing(workdir, Preprocessing(dataset=str(config.dataset), spec=data.spec,
                                              encoder=data.encoder,
                                              core_transform=core_transform))
  except (TypeError, ValueError) as e:   # a vocabulary JSON cannot hold; training goes on
    logging.warning('%s not written (%s); this run cannot score new data', PREPROCESSING, e)
