"""Model registry: ``MODELS[name](spec, model_config) -> flax.linen.Module``.

Every model follows :mod:`htl_jax.models.interface`. Pick one with ``--config.model=NAME``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from htl_jax.data.schema import HybridSpec
from htl_jax.models.adatt import AdaTT
from htl_jax.models.aitm import AITM
from htl_jax.models.dnn import DNN
from htl_jax.models.esmm import ESMM
from htl_jax.models.htlnet import HTLNet
from htl_jax.models.interface import ModelConfig, ModelOutput
from htl_jax.models.mmoe import MMoE
from htl_jax.models.ple import PLE
from htl_jax.models.shared_bottom import SharedBottom
from htl_jax.models.tafe import TAFE

ModelFactory = Callable[[HybridSpec, ModelConfig], nn.Module]

MODELS: dict[str, ModelFactory] = {
    'htlnet': lambda spec, cfg: HTLNet(spec=spec, cfg=cfg),
    'dnn': lambda spec, cfg: DNN(spec=spec, cfg=cfg),
    'shared_bottom': lambda spec, cfg: SharedBottom(spec=spec, cfg=cfg),
    'mmoe': lambda spec, cfg: MMoE(spec=spec, cfg=cfg),
    'ple': lambda spec, cfg: PLE(spec=spec, cfg=cfg),
    'adatt': lambda spec, cfg: AdaTT(spec=spec, cfg=cfg),
    'esmm': lambda spec, cfg: ESMM(spec=spec, cfg=cfg),
    'aitm': lambda spec, cfg: AITM(spec=spec, cfg=cfg),
    'tafe': lambda spec, cfg: TAFE(spec=spec, cfg=cfg),
}


def get_model(name: str, spec: HybridSpec, cfg: ModelConfig) -> nn.Module:
  """Build the model called ``name``; unknown names list the known ones."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(sorted(MODELS))}')
  return MODELS[name](spec, cfg)


def isolated_towers(model: nn.Module) -> bool:
  """True when each task's loss reaches the embedding only through ``embs[t]``."""
  return bool(getattr(model, 'isolated_towers', False))


__all__ = ['MODELS', 'ModelConfig', 'ModelOutput', 'get_model', 'isolated_towers']
