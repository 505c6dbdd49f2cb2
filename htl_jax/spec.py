"""What a hybrid-target problem is: its fields and its tasks (docs/design.md).

:class:`HybridSpec` is read by the data pipeline (which produces it), the models (which build
their towers from it) and the trainer; it lives here so that models do not depend on the data
package.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping



@dataclasses.dataclass(frozen=True)
class HybridSpec:
  """Static description of a hybrid-target problem.

  Attributes:
    fields: feature field names, one int32 column each in ``Split.x``.
    vocab_sizes: per field, the number of ids including the OOV id 0.
    binary_tasks: binary task names in chain order (``y^1 >= y^2 >= ...``).
    core_task: name of the continuous core task (always the last task index).
  """

  fields: tuple[str, ...]
  vocab_sizes: tuple[int, ...]
  binary_tasks: tuple[str, ...]
  core_task: str

  def __post_init__(self):
    if len(self.fields) != len(self.vocab_sizes):
      raise ValueError(
          f'{len(self.fields)} fields but {len(self.vocab_sizes)} vocab sizes')
    if not self.binary_tasks:
      raise ValueError('a hybrid-target problem needs at least one binary task')

  @property
  def tasks(self) -> tuple[str, ...]:
    """All task names, binary tasks in order then the core task."""
    return self.binary_tasks + (self.core_task,)

  @property
  def num_tasks(self) -> int:
    return len(self.binary_tasks) + 1

  @property
  def num_binary(self) -> int:
    return len(self.binary_tasks)

  @property
  def num_fields(self) -> int:
    return len(self.fields)

  @property
  def total_vocab(self) -> int:
    return int(sum(self.vocab_sizes))

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form (:meth:`from_dict` reads it back)."""
    return {'fields': list(self.fields), 'vocab_sizes': list(self.vocab_sizes),
            'binary_tasks': list(self.binary_tasks), 'core_task': self.core_task}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'HybridSpec':
    return cls(fields=tuple(d['fields']), vocab_sizes=tuple(int(v) for v in d['vocab_sizes']),
               binary_tasks=tuple(d['binary_tasks']), core_task=d['core_task'])
