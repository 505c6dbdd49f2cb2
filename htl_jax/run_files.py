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
from htl_jax.errors import ConfigError, DataError, RunError, WorkdirBusyError, first_line
from htl_jax.losses import CoreTransform
from htl_jax.spec import HybridSpec

CONFIG = 'config.json'
PREPROCESSING = 'preprocessing.json'
METRICS_LOG = 'metrics.jsonl'
METRICS = 'metrics.json'
CHECKPOINTS = 'checkpoints'
LOCK = '.lock'
# The marks of the other kinds of workdir: an htl-tune study, an htl-reproduce experiment.
STUDY = 'study.json'
REPRODUCTION = 'reproduction.json'
_KINDS = {CONFIG: 'a training run', STUDY: 'a tuning study', REPRODUCTION: 'a reproduction'}
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

# Config fields a resumed run may change: its budget, patience, cadence and logging, how the
# steps are fed and dispatched (the same run by design), and where things are on this
# machine (the data are checked by their fitted preprocessing instead). Every other field
# decides the trained state, so a workdir belongs to one value of each (docs/training.md).
MAY_CHANGE = frozenset({
    'num_epochs', 'max_steps', 'patience', 'eval_every', 'checkpoint_every',
    'checkpoint_seconds', 'log_every', 'steps_per_dispatch', 'feed', 'grad_diagnostics',
    'eval_batch_size', 'cache_dir', 'data_dir', 'data.path', 'data.passthrough'})


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_json(os.path.join(workdir, CONFIG), json.loads(config.to_json_best_effort()))


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def differing_fields(stored: Mapping[str, Any], config: ml_collections.ConfigDict
                     ) -> list[tuple[str, Any, Any]]:
  """``(field, stored value, config's value)`` of every field that decides the trained
  state and differs (a field one side lacks counts, as ``None`` there)."""
  old = _flat(stored)
  new = _flat(json.loads(config.to_json_best_effort()))
  return [(name, old.get(name), new.get(name)) for name in sorted(set(old) | set(new))
          if name not in MAY_CHANGE and old.get(name) != new.get(name)]


# The workdirs this process has claimed (:func:`claim`): a command's log file goes into its
# workdir only once the workdir is its own (htl_jax.cli.common.log_to_workdir).
_CLAIMED: set[str] = set()


def claimed(workdir: str) -> bool:
  """Whether this process has claimed ``workdir`` (:func:`claim` succeeded)."""
  return os.path.realpath(workdir) in _CLAIMED


def claim(workdir: str, mark: str, identity: Mapping[str, Any]) -> None:
  """``workdir`` holds one thing: a training run (``config.json``), a tuning study
  (``study.json``) or a reproduction (``reproduction.json``). Writes ``mark`` with
  ``identity`` (e.g. the study's name) the first time; ConfigError, one line and nothing
  changed, when it holds another kind of thing or another ``identity``. A key the stored
  mark lacks (written by an older release) is accepted and added."""
  _refuse_other_kinds(workdir, mark)
  path = os.path.join(workdir, mark)
  wanted = json.loads(json.dumps(dict(identity)))
  if os.path.isfile(path):
    with open(path) as f:
      stored = json.load(f)
    known = {k: v for k, v in wanted.items() if k in stored}
    if stored != known:
      diffs = '; '.join(f'{k}: {stored.get(k)!r} there, {wanted.get(k)!r} here'
                        for k in sorted(set(stored) | set(known))
                        if stored.get(k) != wanted.get(k))
      theirs = stored.get('storage')        # a study's folder belongs to its storage
      hint = (f'pass --storage={theirs} to go on with that study, or use another folder'
              if theirs is not None and theirs != wanted.get('storage')
              else 'use another --workdir')
      raise ConfigError(f'{workdir} holds {_KINDS[mark]} of its own ({diffs}); {hint}')
    if known != wanted:
      write_json(path, {**stored, **wanted})
  else:
    os.makedirs(workdir, exist_ok=True)
    write_json(path, wanted)
  _CLAIMED.add(os.path.realpath(workdir))


def _refuse_nesting(workdir: str) -> None:
  """ConfigError when ``workdir`` lies inside another training run's workdir (a slip such as
  ``--workdir=runs/a/checkpoints/b``: the run would live among that run's checkpoints)."""
  path = os.path.dirname(os.path.realpath(workdir))
  while True:
    if (os.path.isfile(os.path.join(path, CONFIG))
        and os.path.isdir(os.path.join(path, CHECKPOINTS))):     # a run, not any config.json
      raise ConfigError(f'--workdir {workdir}: lies inside the training run {path}; give '
                        'this run a workdir of its own')
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent


def _refuse_other_kinds(workdir: str, mark: str) -> None:
  for other, kind in _KINDS.items():
    if other != mark and os.path.isfile(os.path.join(workdir, other)):
      raise ConfigError(f'{workdir} holds {kind} ({other}); use another --workdir')


_UNREADABLE = object()


def _stored(path: str) -> Any:
  """The JSON in ``path``: None without the file, ``_UNREADABLE`` when it does not read."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return _UNREADABLE


def check_owner(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir belongs to one config: ConfigError (one line naming the fields that differ)
  when ``workdir`` holds a run of another config, or is a study's or a reproduction's.
  Reads only; nothing is changed."""
  _refuse_other_kinds(workdir, CONFIG)
  _refuse_nesting(workdir)
  stored = _stored(os.path.join(workdir, CONFIG))
  if stored is None:
    return
  if stored is _UNREADABLE:
    raise ConfigError(f'{workdir}: its {CONFIG} does not read; this is not a run this '
                      'command can resume (give it another --workdir)')
  diffs = differing_fields(stored, config)
  if diffs:
    shown = '; '.join(f'{name}: {old!r} there, {new!r} here' for name, old, new in diffs[:6])
    more = f' (and {len(diffs) - 6} more)' if len(diffs) > 6 else ''
    raise ConfigError(f'{workdir} holds a run of another config ({shown}{more}); resume it '
                      'with its own config, or use another --workdir')


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
                   'with htl-train first)')
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


def check_same_data(workdir: str, preprocessing: Preprocessing) -> None:
  """ConfigError when ``workdir``'s run fitted other preprocessing (other data under the
  same names: another file, other rows): its checkpoints would mean other values."""
  stored = _stored(os.path.join(workdir, PREPROCESSING))
  if stored is None or stored is _UNREADABLE:
    return                      # unreadable: the run is resumed and the file written again
  fitted = json.loads(json.dumps(preprocessing.to_dict()))
  if stored != fitted:
    what = ('its fields and vocabulary sizes' if stored.get('spec') != fitted['spec']
            else 'its vocabularies, numeric buckets or core transform')
    raise ConfigError(f'{workdir} holds a run trained on other data ({what} differ from what '
                      'this data fits: another file or other rows); resume it with its own '
                      'data, or use another --workdir')


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


def run_preprocessing(config: Any, data: HybridData, core_transform: CoreTransform
                      ) -> Optional[Preprocessing]:
  """What a run stores for scoring, checked to be storable before training starts.

  Returns None only for data built by hand without an encoder (tests).

  Raises:
    DataError: a fitted value that JSON cannot hold exactly (an infinite bucket edge or
      statistic from extreme values, a category of another type), naming the column: a
      run that trains has everything ``htl-predict`` needs.
  """
  if data.encoder is None:
    logging.warning('no fitted encoder with the data; %s not written', PREPROCESSING)
    return None
  preprocessing = Preprocessing(dataset=str(config.dataset), spec=data.spec,
                                encoder=data.encoder, core_transform=core_transform)
  record = preprocessing.to_dict()
  parts = [(f'column {f["name"]!r}', f) for f in record['encoder']['fields']]
  parts.append((f'the core {data.spec.core_task!r} (its transform)', record['core_transform']))
  for name, part in parts:
    try:
      json.dumps(part, allow_nan=False)
    except (TypeError, ValueError) as error:
      source = config.data.path or config.data_dir or config.dataset
      raise DataError(f'{source}: {name}: its encoding fitted on the training rows cannot '
                      f'be stored ({first_line(error)}): values too large, or of a type JSON '
                      'cannot hold; clip or convert that column') from None
  return preprocessing
