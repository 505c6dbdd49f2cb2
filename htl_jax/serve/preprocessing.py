"""The preprocessing a run fitted at training time, stored in its workdir.

``<workdir>/preprocessing.json`` holds everything needed to turn raw rows into the model's
inputs and its outputs back into predictions, as JSON that round-trips every number exactly::

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

import dataclasses
import json
import os
from typing import Any, Mapping

from absl import logging

from htl_jax.data.encoding import Encoder
from htl_jax.data.schema import HybridData
from htl_jax.losses import CoreTransform
from htl_jax.spec import HybridSpec

FILE_NAME = 'preprocessing.json'
FORMAT = 1


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
    return {'format': FORMAT, 'dataset': self.dataset, 'spec': self.spec.to_dict(),
            'core_transform': dataclasses.asdict(self.core_transform),
            'encoder': self.encoder.to_dict()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Preprocessing':
    """Reads :meth:`to_dict`'s output; raises ValueError on another format or a mismatch."""
    if d.get('format') != FORMAT:
      raise ValueError(f'preprocessing format {d.get("format")!r}, expected {FORMAT}')
    spec = HybridSpec.from_dict(d['spec'])
    encoder = Encoder.from_dict(d['encoder'])
    if encoder.names != spec.fields or encoder.vocab_sizes != spec.vocab_sizes:
      raise ValueError('the stored encoder does not match the stored spec')
    transform = d['core_transform']
    return cls(dataset=str(d['dataset']), spec=spec, encoder=encoder,
               core_transform=CoreTransform(str(transform['kind']), float(transform['mean']),
                                            float(transform['std']),
                                            float(transform['target_mean'])))


def save(workdir: str, preprocessing: Preprocessing) -> str:
  """Writes ``<workdir>/preprocessing.json`` atomically; returns its path."""
  text = json.dumps(preprocessing.to_dict(), allow_nan=False)
  path = os.path.join(workdir, FILE_NAME)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def load(workdir: str) -> Preprocessing:
  """Reads ``<workdir>/preprocessing.json`` (FileNotFoundError when absent)."""
  with open(os.path.join(workdir, FILE_NAME)) as f:
    return Preprocessing.from_dict(json.load(f))


def save_for_run(workdir: str, config: Any, data: HybridData,
                 core_transform: CoreTransform) -> None:
  """The trainer's hook: stores the run's preprocessing next to its checkpoints.

  Never stops training: a vocabulary that JSON cannot hold (e.g. dates as categories, which
  no built-in loader produces) is logged and the file is not written.
  """
  if data.encoder is None:
    logging.warning('no fitted encoder with the data; %s not written', FILE_NAME)
    return
  try:
    save(workdir, Preprocessing(dataset=str(config.dataset), spec=data.spec,
                                encoder=data.encoder, core_transform=core_transform))
  except (TypeError, ValueError) as e:   # a vocabulary JSON cannot hold; training goes on
    logging.warning('%s not written (%s); this run cannot score new data', FILE_NAME, e)
